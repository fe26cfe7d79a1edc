"""Runs ``train_dit`` (or ``train_vae``) from a job file; tests launch it as a subprocess (python or accelerate launch).

usage: python tests/dit_worker.py JOB.json
JOB keys: params (dict), stage, curated, vae, out, ckpt, cache, init (or null), record (dir or null: each rank writes
record/rank-<r>.json with the image indices of every micro-batch and its result dict, and record/weights-<r>.pt with
its final weights), sleep (seconds per micro-batch / VAE step, to give a test time to kill the run mid-way; it
changes no number), log (path: logged metrics and images as JSON lines), kind ("dit", default, or "vae"),
nan_loss_at (step: a stand-in for a diverging run, the loss of that step's micro-batches is multiplied by NaN),
fill (path: at the last step a file is grown there until the disk is full; another writer filling the disk),
stage_cwd (folder: run through ``ultraflux.stage.run_stage`` there, with the job's params as its params.yaml).
"""
import json
import sys
import time
from pathlib import Path


class JsonLinesLogger:
    """The StageLogger interface the trainers use (MLflow in stages): metrics and image keys as JSON lines."""

    def __init__(self, path):
        self.path = path

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics, step=None):
        self._write({"step": step, **metrics})

    def log_image(self, image, key, step=0):
        self._write({"step": step, "image": key, "size": list(image.size)})

    def set_tags(self, tags):
        pass


def main(job_path):
    job = json.loads(Path(job_path).read_text())
    logger = JsonLinesLogger(job["log"]) if job.get("log") else None
    if job.get("kind") == "vae":
        from ultraflux.training.vae import train_vae

        def on_step(step):
            if job.get("sleep"):
                time.sleep(job["sleep"])

        train_vae(job["params"], Path(job["curated"]), Path(job["out"]), logger=logger, progress=False,
                  ckpt_dir=Path(job["ckpt"]), on_step=on_step)
        return
    if job.get("no_shm_op"):
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce kernel (~1 min, needs g++) the first time
        # it initialises; tests skip it so collectives go through the gloo process group (the same ZeRO-2 code path).
        import deepspeed.comm.torch as ds_comm_torch

        ds_comm_torch.build_shm_op = lambda: None
    import ultraflux.training.dit as dit
    from ultraflux.training.dit import train_dit

    seen = []

    def on_batch(step, micro, rank, indices):
        seen.append({"step": step, "micro": micro, "rank": rank, "indices": list(indices)})
        if job.get("sleep"):
            time.sleep(job["sleep"])
        if job.get("fill") and step + 1 == job["params"][job["stage"]]["steps"] and micro == 0:
            fill_disk(Path(job["fill"]))

    if job.get("nan_loss_at"):
        real_loss = dit.dit_loss

        def nan_loss(*args, **kwargs):   # stand-in for divergence: NaN from the given step on
            loss, logs = real_loss(*args, **kwargs)
            return (loss * float("nan"), logs) if seen[-1]["step"] + 1 >= job["nan_loss_at"] else (loss, logs)
        dit.dit_loss = nan_loss

    def on_end(rank, model):
        if job.get("record"):
            import torch

            out = Path(job["record"])
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / f"weights-{rank}.pt")

    def train(params, stage_logger=None):
        return train_dit(params, job["stage"], Path(job["curated"]), Path(job["vae"]), Path(job["out"]),
                         Path(job["ckpt"]), Path(job["cache"]), init_transformer=job.get("init"), progress=False,
                         on_batch=on_batch, on_end=on_end, logger=stage_logger or logger)

    if job.get("stage_cwd"):
        import os

        import yaml

        from ultraflux.stage import run_stage

        os.chdir(job["stage_cwd"])
        Path("params.yaml").write_text(yaml.safe_dump(job["params"]))
        sys.exit(run_stage(job["stage"], train))
    metrics = train(job["params"])
    if job.get("record"):
        rank = seen[0]["rank"] if seen else 0
        out = Path(job["record"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.json").write_text(json.dumps({"batches": seen, "metrics": metrics}))


def fill_disk(path: Path) -> None:
    """Grow ``path`` until the filesystem is full (ENOSPC is the point; the file stays)."""
    with open(path, "ab") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


if __name__ == "__main__":
    main(sys.argv[1])
