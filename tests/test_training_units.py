"""Bucket sampler and flow-matching timestep conventions (seed Sec. 2.2, Table 3)."""
import pytest
import torch

from ultraflux.training.flow import pack, sample_sigmas, sigma_table, unpack
from ultraflux.training.sampler import BucketBatchSampler


def test_stage2_range_is_the_high_noise_end():
    # Index 0 of the scheduler's descending table is sigma = 1; index 459 is unshifted sigma 0.541 (Table 3: 0-459).
    unshifted = sigma_table(shift=1.0)
    assert unshifted[0] == 1.0
    assert unshifted[459] == pytest.approx(0.541)
    assert unshifted[999] == pytest.approx(0.001)
    shifted = sigma_table(shift=3.0)
    assert shifted[459] == pytest.approx(3 * 0.541 / (1 + 2 * 0.541))
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(4096, 0, 459, 3.0, g)
    assert s.min() >= shifted[459] - 1e-6 and s.max() <= 1.0
    other = sigma_table(shift=1.0, reading="sigma_ascending")
    assert other[0] == pytest.approx(0.001) and other[459] == pytest.approx(0.46)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(x), 6, 10), x)


def test_bucket_batches_single_bucket_disjoint_equal_across_ranks():
    buckets = ["1:1"] * 11 + ["16:9"] * 7 + ["2:1"] * 3
    ranks = [BucketBatchSampler(buckets, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [[], []]
    for _ in range(4):  # one epoch = 2 + 1 global batches of 4 (the 2:1 bucket is too small, remainders dropped)
        batches = [s.next_batch() for s in ranks]
        assert len({buckets[i] for b in batches for i in b}) == 1, "a step mixes buckets"
        assert set(batches[0]).isdisjoint(batches[1]), "ranks share images"
        for r in range(2):
            seen[r] += batches[r]
    assert all(len(s) == 8 for s in seen)
    assert ranks[0].epoch == ranks[1].epoch == 1


def test_bucket_sampler_resume_continues_exactly():
    buckets = ["a"] * 9 + ["b"] * 6
    ref = BucketBatchSampler(buckets, 3, seed=1)
    expected = [ref.next_batch() for _ in range(12)]
    s = BucketBatchSampler(buckets, 3, seed=1)
    first = [s.next_batch() for _ in range(5)]
    resumed = BucketBatchSampler(buckets, 3, seed=1)
    resumed.load_state_dict(s.state_dict())
    assert first + [resumed.next_batch() for _ in range(7)] == expected


def test_bucket_sampler_explains_too_small_buckets():
    with pytest.raises(ValueError, match="bucket sizes"):
        BucketBatchSampler(["a", "b", "c"], batch_size=2, seed=0)
