"""LoRA vs full fine-tune of the DiT on the tiny profile (params.yaml's tiny model, CPU), measured in one run.

For each variant (full fine-tune; LoRA rank R on to_q/to_k/to_v/to_out.0), ``--reps`` training runs of ``--steps``
steps, variants interleaved, each in its own process (so its peak RSS is its own) from one shared latent cache built
first: trainable parameters, median step time (steps 2.. of every run) and the process's peak RSS. Prints ratios
LoRA / full and the machine load.

    python benchmarks/bench_lora.py [--rank 16] [--steps 12] [--reps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

RUN = """
import json, sys
from pathlib import Path
from ultraflux.training.dit import train_dit
job = json.loads(Path(sys.argv[1]).read_text())
train_dit(job["params"], "dit_stage1", Path(job["d"]) / "curated", Path(job["d"]) / "vae", Path(job["out"]),
          Path(job["out"]) / "ckpt", Path(job["d"]) / "cache", progress=False)
"""


def lora_cfg(rank: int) -> dict:
    return {"rank": rank, "alpha": float(rank), "dropout": 0.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def trainable_counts(params: dict, rank: int) -> tuple[int, int]:
    from ultraflux.models.transformer import build_transformer
    from ultraflux.training.lora import apply_lora

    full = build_transformer(params["model"], params["rope"])
    n_full = sum(p.numel() for p in full.parameters())
    return n_full, apply_lora(build_transformer(params["model"], params["rope"]), lora_cfg(rank))


def run(d: Path, name: str, params: dict) -> dict:
    import pandas as pd

    job = d / f"{name}.json"
    out = d / name
    job.write_text(json.dumps({"params": params, "d": str(d), "out": str(out)}))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", RUN, str(job)], check=True, env=env, capture_output=True)
    loss = pd.read_csv(out / "loss.csv")
    return {"step_s": list(loss["step_time_s"].iloc[1:]), "rss_gb": float(loss["peak_host_rss_gb"].max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from training_fixtures import make_curated, save_vae, tiny_params

    from ultraflux.config import load_params

    base = load_params(ROOT / "params.yaml")
    common = dict(steps=args.steps, checkpoint_every=10_000, val_every=10_000, batch_size=1, global_batch=1)
    variants = {"full": tiny_params(base, **common, lora=None),
                f"lora_r{args.rank}": tiny_params(base, **common, lora=lora_cfg(args.rank))}
    for p in variants.values():
        p["validation"] = {**p["validation"], "prompts": [], "images": 1}
    n_full, n_lora = trainable_counts(base, args.rank)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_curated(d / "curated")
        save_vae(base, d / "vae")
        run(d, "warmup", tiny_params(base, **{**common, "steps": 1}, lora=None))   # builds the shared cache
        results = {k: {"step_s": [], "rss_gb": []} for k in variants}
        for rep in range(args.reps):
            for name, params in variants.items():
                r = run(d, f"{name}-{rep}", params)
                results[name]["step_s"] += r["step_s"]
                results[name]["rss_gb"].append(r["rss_gb"])
    full, lora = results["full"], results[f"lora_r{args.rank}"]
    med = {k: statistics.median(v["step_s"]) for k, v in results.items()}
    rss = {k: statistics.median(v["rss_gb"]) for k, v in results.items()}
    print(f"tiny profile, {args.steps} steps x {args.reps} runs per variant (interleaved), batch 1, CPU fp32")
    print(f"{'variant':<12} {'trainable params':>17} {'median step s':>14} {'peak RSS GB':>12}")
    print(f"{'full':<12} {n_full:>17,} {med['full']:>14.4f} {rss['full']:>12.3f}")
    name = f"lora_r{args.rank}"
    print(f"{name:<12} {n_lora:>17,} {med[name]:>14.4f} {rss[name]:>12.3f}")
    print(f"LoRA / full: params {n_lora / n_full:.4f}, step time {med[name] / med['full']:.3f}, "
          f"peak RSS {rss[name] / rss['full']:.3f}  (runs: full {len(full['step_s'])} steps, LoRA "
          f"{len(lora['step_s'])} steps)")
    print("load:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
