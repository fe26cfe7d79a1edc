"""Peak host memory of the dit_stage1 training function with N and 10N cached samples (issue 10.3: must be <= 1.1x).

For each dataset size a curated set of smooth random JPEGs (``--size`` px, one aspect bucket; WebDataset shards, the
curated layout) is written, then ``train_dit(params, "dit_stage1", ...)`` runs twice, each time in a FRESH subprocess:

  cold  builds the latent cache (frozen encoders, batches, bf16 shards), then trains;
  warm  finds every sample cached, then trains.

Training runs the same number of steps for both sizes, enough for one full epoch of the larger set (every cached
sample is read once through the DataLoader), so a reader that kept what it read would show it. Each child reports:

  self_maxrss   peak RSS of the training process (getrusage RUSAGE_SELF)
  child_maxrss  peak RSS of its largest DataLoader worker (RUSAGE_CHILDREN)
  tree_peak     peak of (process + workers) PSS, sampled every 20 ms with psutil (PSS splits the pages that forked
                workers share with the parent, so the sum does not count them twice)

and the parent prints them side by side with the cache's size on disk (what the old design held in RAM, in fp32).
Children run with OMP_NUM_THREADS=1 (memory is measured, not speed; a shared CPU makes thread pools crawl).

    python benchmarks/bench_cache.py [--n 200] [--factor 10] [--size 512]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_set(root: Path, n: int, size: int, holdout: int = 4, seed: int = 0) -> Path:
    """``n`` training + ``holdout`` held-out JPEGs of ``size`` px in curated shards, and their manifest."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from ultraflux.data.shards import SHARD_DIR, ShardWriter

    rng = np.random.default_rng(seed)
    rows = []
    with ShardWriter(root / SHARD_DIR, "all", root, max_count=1000) as writer:
        for i in range(n + holdout):
            small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            key = f"b{i:06d}"
            loc = writer.write(key, {"jpg": buf.getvalue(), "txt": f"benchmark picture {i}".encode()})
            rows.append({"id": key, "caption": f"benchmark picture {i}", "bucket": "1:1", "width": size,
                         "height": size, "kept": True, "split": "holdout" if i >= n else "train", "stage2": False,
                         "texture_rank": 0.0, "shard": loc.shard, "key": loc.key, "offset": loc.offset,
                         "nbytes": loc.nbytes})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root


def child(job: dict) -> None:
    """Run the training function once and print its memory figures as JSON (the last line of stdout)."""
    import psutil

    from ultraflux.training.dit import train_dit

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                procs = [me] + me.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    metrics = train_dit(job["params"], "dit_stage1", Path(job["curated"]), Path(job["vae"]), Path(job["out"]),
                        Path(job["ckpt"]), Path(job["cache"]), progress=False)
    done.set()
    print(json.dumps({"self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "child_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "tree_peak_pss_mb": peak[0] / 2**20, "seconds": time.perf_counter() - t0,
                      "num_train_images": metrics["num_train_images"], **metrics["_timing"]}))


def run_child(job: dict, path: Path) -> dict:
    path.write_text(json.dumps(job))
    # one thread per process: memory is what is measured, and on a shared CPU torch's thread pool only adds contention
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="training images of the small set (the large: n x factor)")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--size", type=int, default=512, help="image side in px (multiple of 32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="latent_cache.num_workers")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return

    from ultraflux.config import load_params
    from ultraflux.models.vae import build_vae

    params = load_params(ROOT / "params.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    build_vae(params["model"], seed=params["seed"]).save_pretrained(tmp / "vae")
    sizes = [args.n, args.n * args.factor]
    steps = sizes[-1] // args.batch                        # one epoch of the larger set, the same for both
    stage = {**params["dit_stage1"], "steps": steps, "batch_size": args.batch, "global_batch": args.batch,
             "checkpoint_every": steps, "val_every": steps}
    cache_cfg = {**params["latent_cache"], "num_workers": args.workers}
    params = {**params, "dit_stage1": stage, "latent_cache": cache_cfg, "validation": {**params["validation"],
                                                                                        "images": 4}}
    results = {}
    for n in sizes:
        d = tmp / f"n{n}"
        t = time.perf_counter()
        make_set(d / "curated", n, args.size)
        print(f"[{n} images written in {time.perf_counter() - t:.0f} s]", flush=True)
        for run in ("cold", "warm"):
            job = {"params": params, "curated": str(d / "curated"), "vae": str(tmp / "vae"),
                   "out": str(d / f"out-{run}"), "ckpt": str(d / f"ckpt-{run}"), "cache": str(d / "cache")}
            results[(n, run)] = run_child(job, d / f"{run}.json")
            print(f"[{n} {run}: {json.dumps(results[(n, run)])}]", flush=True)
        results[(n, "disk_mb")] = sum(f.stat().st_size for f in (d / "cache").rglob("*.safetensors")) / 2**20

    small, large = sizes
    print(f"\ndit_stage1 training function, {args.size}x{args.size} px images -> {args.size // 16}x{args.size // 16} "
          f"latents, batch {args.batch}, {steps} steps (one epoch of {large} samples), "
          f"{args.workers} DataLoader workers, each run a fresh process; load: {os.getloadavg()[0]:.2f}")
    print(f"{'':24}{small:>10} samples{large:>10} samples{'ratio':>10}")
    for run in ("cold", "warm"):
        for k in ("self_maxrss_mb", "child_maxrss_mb", "tree_peak_pss_mb"):
            a, b = results[(small, run)][k], results[(large, run)][k]
            print(f"  {run} {k:<18}{a:>10.0f} MB  {b:>10.0f} MB  {b / a:>9.3f}x")
    a, b = results[(small, "disk_mb")], results[(large, "disk_mb")]
    print(f"  cache on disk (bf16)    {a:>10.1f} MB  {b:>10.1f} MB  (fp32, all in RAM per rank before: "
          f"{2 * a:.0f} / {2 * b:.0f} MB)")
    worst = max(results[(large, run)][k] / results[(small, run)][k] for run in ("cold", "warm")
                for k in ("self_maxrss_mb", "tree_peak_pss_mb"))
    print(f"  worst ratio {worst:.3f}x  (goal <= 1.1x)")


if __name__ == "__main__":
    main()
