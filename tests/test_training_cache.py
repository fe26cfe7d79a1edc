"""The latent cache (training/cache.py): keys, reuse, stored dtype, shards, bad images, streamed reads.

One process here; the 2-process build (each rank encodes its share) is in test_training_distributed.py.
"""
import copy
import itertools
import json

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from conftest import ROOT
from training_fixtures import make_curated, save_vae
from ultraflux.data.shards import load_image_tensor
from ultraflux.training import cache as tc
from ultraflux.training.sampler import BucketBatchSampler

CORRUPT = 3   # row number of the fixture's broken image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ultraflux.config import load_params

    base = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("cache")
    make_curated(d / "curated", corrupt=(CORRUPT,))
    save_vae(base, d / "vae")
    rows = pd.read_parquet(d / "curated" / "manifest.parquet").query("kept")
    enc = tc.load_encoders(base, d / "vae", torch.device("cpu"), "bf16")
    return base, d, rows, enc


def test_build_encodes_once_in_bf16_shards_and_skips_a_broken_image(setup):
    base, d, rows, enc = setup
    first = tc.build_cache(rows, d / "curated", enc, d / "c", batch_size=3, shard_size=4, num_workers=2,
                           progress=False)
    n = len(rows)
    assert first.stats["cache_encoded"] == n - 1 and first.stats["cache_failed"] == 1
    assert first.stats["cache_shards_written"] == -(-(n - 1) // 4)          # shard_size samples per file at most
    bad = first.keys[CORRUPT]
    assert not first.has(bad) and bad in first.failures                      # skipped, with its reason recorded
    assert "UnidentifiedImageError" in json.loads((first.root / "failed" / f"{bad}.json").read_text())["reason"]
    shards = sorted(first.root.glob("*.safetensors"))
    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.metadata()["rank"] == "0" and f.metadata()["world"] == "1"
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    # The stored latent is the VAE's latent of that image, rounded to bf16 (nothing else changed). It was encoded in
    # a batch of 3 and is compared with the image encoded alone: the CPU may pick other convolution kernels for the two
    # batch shapes, so the fp32 latents differ by float noise and their bf16 roundings by at most one bf16 step
    # (relative spacing <= eps(bf16) = 2^-7); bit equality holds only for the same computation repeated (below).
    i = 0
    expected = tc.encode_latents(enc.vae, load_image_tensor(d / "curated", rows.iloc[i].to_dict())[None])[0]
    got = first.dataset([first.keys[i]])[0]["latents"]
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=torch.finfo(torch.bfloat16).eps, atol=1e-5)
    assert not torch.equal(got.float(), torch.zeros_like(got.float()))
    alone = tc.build_cache(rows.iloc[[i]], d / "curated", enc, d / "c-alone", batch_size=1, progress=False)
    assert torch.equal(alone.dataset([first.keys[i]])[0]["latents"], expected.to(torch.bfloat16))  # same computation

    again = tc.build_cache(rows, d / "curated", enc, d / "c", batch_size=3, shard_size=4, progress=False)
    assert again.keys == first.keys and again.stats["cache_encoded"] == 0       # a second run reuses everything...
    assert again.stats["cache_reused"] == n - 1 and again.stats["cache_failed"] == 1   # ... and retries the broken one


def test_keys_follow_content_caption_and_encoder_version(setup):
    base, d, rows, enc = setup
    keys = tc.sample_keys(rows, d / "curated", enc.version, d / "c" / "content")
    assert len(set(keys)) == len(rows)
    recaptioned = rows.assign(caption=rows["caption"] + " (edited)")
    assert set(tc.sample_keys(recaptioned, d / "curated", enc.version, d / "c" / "content")).isdisjoint(keys)
    assert set(tc.sample_keys(rows, d / "curated", "other-version", d / "c" / "content")).isdisjoint(keys)
    fp32 = tc.load_encoders(base, d / "vae", torch.device("cpu"), "fp32")
    assert fp32.version != enc.version                                       # the stored dtype is part of the version
    other = copy.deepcopy(base)
    other["seed"] = 1                                                        # other (tiny) text-encoder weights
    assert tc.load_encoders(other, d / "vae", torch.device("cpu"), "bf16").version != enc.version


def test_dataloader_streams_bucket_batches_with_bounded_open_files(setup, monkeypatch):
    base, d, rows, enc = setup
    cache = tc.build_cache(rows, d / "curated", enc, d / "c", shard_size=4, progress=False)
    train = [(k, b) for k, b in zip(cache.keys, rows["bucket"]) if cache.has(k)]
    dataset = cache.dataset([k for k, _ in train])
    monkeypatch.setattr(tc, "MAX_OPEN_SHARDS", 2)
    assert len(dataset.shard_paths) > tc.MAX_OPEN_SHARDS
    for i in range(len(dataset)):   # random access over every shard keeps at most MAX_OPEN_SHARDS files open
        dataset[i]
        assert len(dataset._open) <= tc.MAX_OPEN_SHARDS
    sampler = BucketBatchSampler([b for _, b in train], batch_size=2, seed=0)
    sampler.seek(3)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    for n, batch in zip(range(3, 9), loader):
        assert batch["index"].tolist() == sampler.batch(n)                   # the sampler's order, from the seek
        assert len({train[i][1] for i in batch["index"].tolist()}) == 1      # one bucket per batch
        assert batch["latents"].dtype == torch.bfloat16 and batch["latents"].shape[0] == 2
        for j, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["prompt_embeds"][j], dataset[i]["prompt_embeds"])


def test_shards_of_another_process_must_be_visible(setup, monkeypatch):
    """A process that cannot see a sample another process encoded stops with a message naming the setting."""
    base, d, rows, enc = setup
    real_scan = tc.scan
    calls = itertools.count()
    monkeypatch.setattr(tc, "scan", lambda root: real_scan(root) if next(calls) == 0 else {})
    with pytest.raises(RuntimeError, match="latent_cache.dir must be on a filesystem shared"):
        tc.build_cache(rows, d / "curated", enc, d / "fresh", progress=False)
