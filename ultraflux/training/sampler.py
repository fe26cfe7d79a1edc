"""Bucket-aware batch sampler: every batch holds one aspect-ratio bucket (seed Sec. 2.2, multi-AR training).

Each epoch, every bucket is shuffled with a seed shared by all ranks (``seed + epoch``) and cut into *global* batches
of ``batch_size * world_size`` indices (a remainder that does not fill a global batch is dropped for this epoch); the
global batches of all buckets are then shuffled together, so buckets mix across steps in proportion to their size.
Rank r takes slice r of each global batch: every rank sees the same bucket at the same step, a disjoint shard, and
the same number of batches. The position (epoch, batch) is part of the checkpoint, so a resumed run continues with
exactly the batches it would have seen.
"""
from __future__ import annotations

import random
from collections import defaultdict


class BucketBatchSampler:
    def __init__(self, buckets: list[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        if not self._epoch_batches(0):
            sizes = {b: self.buckets.count(b) for b in sorted(set(self.buckets))}
            raise ValueError(f"no bucket holds a full global batch of {batch_size * world_size} images "
                             f"(batch_size x processes); bucket sizes: {sizes}")

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        by_bucket: dict[str, list[int]] = defaultdict(list)
        for i, b in enumerate(self.buckets):
            by_bucket[b].append(i)
        g = self.batch_size * self.world_size
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            rng.shuffle(idx)
            batches += [idx[i:i + g] for i in range(0, len(idx) - g + 1, g)]
        rng.shuffle(batches)
        return [gb[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for gb in batches]

    def next_batch(self) -> list[int]:
        batches = self._epoch_batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
