"""Runs ``train_dit`` from a job file; tests launch it as a subprocess (plain python or ``accelerate launch``).

usage: python tests/dit_worker.py JOB.json
JOB keys: params (dict), stage, curated, vae, out, ckpt, cache, init (or null), record (dir or null: each rank writes
record/rank-<r>.json with the image indices of every micro-batch), sleep (seconds per micro-batch, to give a test
time to kill the run mid-way; it does not change any number).
"""
import json
import sys
import time
from pathlib import Path

from ultraflux.training.dit import train_dit


def main(job_path):
    job = json.loads(Path(job_path).read_text())
    seen = []

    def on_batch(step, micro, rank, indices):
        seen.append({"step": step, "micro": micro, "rank": rank, "indices": list(indices)})
        if job.get("sleep"):
            time.sleep(job["sleep"])

    metrics = train_dit(job["params"], job["stage"], Path(job["curated"]), Path(job["vae"]), Path(job["out"]),
                        Path(job["ckpt"]), Path(job["cache"]), init_transformer=job.get("init"), progress=False,
                        on_batch=on_batch)
    if job.get("record"):
        rank = seen[0]["rank"] if seen else 0
        out = Path(job["record"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.json").write_text(json.dumps({"batches": seen, "metrics": metrics}))


if __name__ == "__main__":
    main(sys.argv[1])
