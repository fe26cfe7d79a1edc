"""Runs ``train_dit`` from a job file; tests launch it as a subprocess (plain python or ``accelerate launch``).

usage: python tests/dit_worker.py JOB.json
JOB keys: params (dict), stage, curated, vae, out, ckpt, cache, init (or null), record (dir or null: each rank writes
record/rank-<r>.json with the image indices of every micro-batch and record/weights-<r>.pt with its final weights), sleep (seconds per micro-batch, to give a test
time to kill the run mid-way; it does not change any number), log (path: logged metrics as JSON lines).
"""
import json
import sys
import time
from pathlib import Path

from ultraflux.training.dit import train_dit


def main(job_path):
    job = json.loads(Path(job_path).read_text())
    if job.get("no_shm_op"):
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce kernel (~1 min, needs g++) the first time
        # it initialises; tests skip it so collectives go through the gloo process group (the same ZeRO-2 code path).
        import deepspeed.comm.torch as ds_comm_torch

        ds_comm_torch.build_shm_op = lambda: None
    seen = []

    def on_batch(step, micro, rank, indices):
        seen.append({"step": step, "micro": micro, "rank": rank, "indices": list(indices)})
        if job.get("sleep"):
            time.sleep(job["sleep"])

    def on_end(rank, model):
        if job.get("record"):
            import torch

            out = Path(job["record"])
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / f"weights-{rank}.pt")

    class JsonLinesLogger:   # the StageLogger interface train_dit uses (MLflow in stages)
        def log_metrics(self, metrics, step=None):
            with open(job["log"], "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    metrics = train_dit(job["params"], job["stage"], Path(job["curated"]), Path(job["vae"]), Path(job["out"]),
                        Path(job["ckpt"]), Path(job["cache"]), init_transformer=job.get("init"), progress=False,
                        on_batch=on_batch, on_end=on_end, logger=JsonLinesLogger() if job.get("log") else None)
    if job.get("record"):
        rank = seen[0]["rank"] if seen else 0
        out = Path(job["record"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.json").write_text(json.dumps({"batches": seen, "metrics": metrics}))


if __name__ == "__main__":
    main(sys.argv[1])
