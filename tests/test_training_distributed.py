"""The real DeepSpeed ZeRO-2 path with two CPU processes (``accelerate launch`` of tests/dit_worker.py, gloo).

Checks: the latent cache is built by both ranks, each encoding its own share of the images; each rank trains on its
own shard (disjoint image indices, one bucket per step, equal counts) read through its DataLoader, both ranks end
with identical weights, the loss and validation curves match a one-process run with the same global batches
(global_batch = batch_size x processes x grad_accum), and a ZeRO-2 checkpoint (per-rank optimizer shards) resumes to the same
final weights.
"""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from test_training_resume import ENV, WORKER, job, tiny_set  # noqa: F401  (fixture)
from training_fixtures import tiny_params

deepspeed = pytest.importorskip("deepspeed")
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
STEPS, ACCUM = 4, 2


def launch(job_path, nproc=2, timeout=400):
    cmd = ACCELERATE + ["--config_file", str(ZERO2), "--num_processes", str(nproc), "--main_process_port", "0",
                        str(WORKER), str(job_path)]
    proc = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_deepspeed_zero2_two_cpu_processes(tiny_set):
    base, d = tiny_set
    lr = base["dit_stage1"]["lr"]
    two = dict(steps=STEPS, batch_size=1, global_batch=2 * ACCUM, checkpoint_every=2, keep_checkpoints=2, val_every=2)
    base = {**base, "latent_cache": {**base["latent_cache"], "shard_size": 3, "encode_batch_size": 2}}
    # The 1-process reference (micro-batch 2 = 1 x 2 processes, same grad_accum) runs beside the 2-process launch, each
    # with its own, empty latent cache.
    one = subprocess.Popen([sys.executable, str(WORKER), str(job(d, "single", tiny_params(base, **{**two, "batch_size": 2}),
                                                                  record=str(d / "single" / "rec"),
                                                                  cache=str(d / "single" / "cache")))],
                           env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launch(job(d, "zero2", tiny_params(base, **two), record=str(d / "zero2" / "rec"), no_shm_op=True,
               cache=str(d / "zero2" / "cache")))
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out[-3000:]

    recs = [json.loads((d / "zero2" / "rec" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((d / "single" / "rec" / "rank-0.json").read_text())
    assert [r["metrics"]["num_processes"] for r in recs] == [2, 2], "accelerate did not start 2 processes"
    manifest = pd.read_parquet(d / "curated" / "manifest.parquet")
    buckets = manifest.query("kept and split == 'train'")["bucket"].tolist()
    n_cached = len(buckets) + int(manifest["eval"].sum())   # train + validation

    # The cache was built by both ranks, each encoding its own share (round-robin over the missing samples).
    encoded = [r["metrics"]["_timing"]["cache_encoded"] for r in recs]
    print("samples encoded per rank:", encoded)
    assert sum(encoded) == n_cached and abs(encoded[0] - encoded[1]) <= 1
    by_rank = {0: set(), 1: set()}
    for shard in (d / "zero2" / "cache").glob("*/*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata()["world"] == "2"
            by_rank[int(f.metadata()["rank"])] |= {k.split(".")[0] for k in f.keys()}
    assert [len(by_rank[r]) for r in (0, 1)] == encoded and not by_rank[0] & by_rank[1]
    assert single["metrics"]["_timing"]["cache_encoded"] == n_cached
    assert len(recs[0]["batches"]) == len(recs[1]["batches"]) == STEPS * ACCUM      # equal batch counts per rank
    for b0, b1, ref in zip(recs[0]["batches"], recs[1]["batches"], single["batches"]):
        assert (b0["step"], b0["micro"]) == (b1["step"], b1["micro"]) == (ref["step"], ref["micro"])
        assert set(b0["indices"]).isdisjoint(b1["indices"]), f"ranks share images at {b0}"
        assert len({buckets[i] for i in b0["indices"] + b1["indices"]}) == 1, "a global batch mixes buckets"
        assert sorted(b0["indices"] + b1["indices"]) == sorted(ref["indices"])      # same global batch as 1 process
    print("rank shards:", [[b["indices"] for b in r["batches"]] for r in recs])

    # Both ranks end with the same weights (ZeRO-2 all-gathers the updated partitions after every step).
    w0, w1 = (torch.load(d / "zero2" / "rec" / f"weights-{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # ... and what rank 0 saved is that model.
    from safetensors.torch import load_file

    saved = load_file(d / "zero2" / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], w0[k]) for k in saved)

    # Same data, same per-sample noise and timesteps (keyed by image, not by rank): the runs differ only by float
    # summation order (gradient all-reduce over 2 ranks vs a batch-of-2 mean, ZeRO's flat buckets), ~1e-7 relative
    # per step, so the loss curves agree to 1e-4 relative; Adam (update ~ lr * m / sqrt(v), scale-free) keeps the
    # weight difference far below one lr-sized update.
    # Both caches hold the same bf16 latents up to the encoder's batch composition (1 vs 2 images per VAE call).
    l2, l1 = pd.read_csv(d / "zero2/out/loss.csv")["loss"], pd.read_csv(d / "single/out/loss.csv")["loss"]
    print("loss zero2:", list(l2), "single:", list(l1))
    assert len(l2) == len(l1) == STEPS
    assert ((l2 - l1).abs() <= 1e-4 * l1.abs() + 1e-7).all(), (list(l2), list(l1))
    v2, v1 = pd.read_csv(d / "zero2/out/val_loss.csv"), pd.read_csv(d / "single/out/val_loss.csv")
    print("val_loss zero2:", list(v2["val_loss"]), "single:", list(v1["val_loss"]))
    assert list(v2["step"]) == list(v1["step"]) == [0, 2, 4]           # images split over the ranks, sums reduced
    assert ((v2["val_loss"] - v1["val_loss"]).abs() <= 1e-4 * v1["val_loss"]).all()
    ws = torch.load(d / "single" / "rec" / "weights-0.pt")
    max_diff = max(float((ws[k] - w0[k]).abs().max()) for k in ws)
    print("max |w_zero2 - w_single|:", max_diff, "lr:", lr)
    assert max_diff < 0.05 * lr

    # Resume under ZeRO-2: drop the last checkpoint, re-launch: it resumes at step 2 from the per-rank shards
    # (load_state is collective) and ends with the very same weights.
    first = saved
    ck = d / "zero2" / "ckpt"
    shutil.rmtree(ck / f"step-{STEPS:08d}")
    shutil.rmtree(d / "zero2" / "out" / "transformer")
    out = launch(job(d, "zero2", tiny_params(base, **two), no_shm_op=True, cache=str(d / "zero2" / "cache"),
                     record=str(d / "zero2" / "rec2")))
    assert "resumed from" in out and "at step 2" in out
    again = load_file(d / "zero2" / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert [json.loads((d / "zero2" / "rec2" / f"rank-{r}.json").read_text())["metrics"]["_timing"]["cache_encoded"]
            for r in (0, 1)] == [0, 0]                                  # the resumed run reuses the cache
    assert pd.read_csv(d / "zero2/out/val_loss.csv").equals(v2)



def test_lora_with_ema_under_zero2_resumes_identically(tiny_set):
    """A LoRA adapter with EMA on two DeepSpeed ZeRO-2 processes: only the adapter trains, the merged weights, the
    adapter, the EMA and the EMA adapter are written, and a run resumed from the step-2 checkpoint (per-rank optimizer
    shards, the EMA with it) writes byte-identical files."""
    from safetensors.torch import load_file

    from test_training_lora_ema import EMA, LORA

    base, d = tiny_set
    base = {**base, "latent_cache": {**base["latent_cache"], "shard_size": 3, "encode_batch_size": 2}}
    params = tiny_params(base, steps=STEPS, batch_size=1, global_batch=2 * ACCUM, checkpoint_every=2,
                         keep_checkpoints=2, val_every=2, lr=3e-3, lora=LORA, ema=EMA)
    run = job(d, "lora2", params, no_shm_op=True, cache=str(d / "lora2" / "cache"))
    launch(run)
    out = d / "lora2" / "out" / "transformer"
    names = ("diffusion_pytorch_model.safetensors", "lora/pytorch_lora_weights.safetensors",
             "ema/diffusion_pytorch_model.safetensors", "ema/lora/pytorch_lora_weights.safetensors")
    first = {n: load_file(out / n) for n in names}
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in first[names[1]].items())   # the adapter trained
    assert any(not torch.equal(first[names[1]][k], first[names[3]][k]) for k in first[names[1]])  # EMA differs

    shutil.rmtree(d / "lora2" / "ckpt" / f"step-{STEPS:08d}")
    shutil.rmtree(out)
    log = launch(run)
    assert "resumed from" in log and "at step 2" in log
    for n in names:
        again = load_file(out / n)
        assert again.keys() == first[n].keys() and all(torch.equal(again[k], first[n][k]) for k in again), n
