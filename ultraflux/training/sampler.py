"""Bucket-aware batch sampler: every batch holds one aspect-ratio bucket (seed Sec. 2.2, multi-AR training).

Each epoch, every bucket is shuffled with a seed shared by all ranks (``seed + epoch``) and cut into *global* batches
of ``batch_size * world_size * accum`` indices, one optimizer step each (a remainder that does not fill a global batch
is dropped for this epoch); the global batches of all buckets are then shuffled together, so buckets mix across steps
in proportion to their size. Micro-batch m of a step on rank r takes positions ``(m * world_size + r) * batch_size``
onwards of its global batch: every rank sees the same bucket at the same step, a disjoint shard, the same number of
batches, and a step trains on the same images whatever the layout (``training/layout.py``) of its global batch.

Every epoch has the same number of batches, so batch number n is a pure function of (seed, n): the sampler is the
``batch_sampler`` of a DataLoader, iterating endlessly from ``seek(n)``; a resumed run seeks to the number of
micro-batches it has consumed (step x grad_accum, restored by accelerate's ``load_state``) and continues with exactly
the batches it would have seen, whatever the DataLoader had prefetched before the kill.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator, Sequence


class BucketBatchSampler:
    def __init__(self, buckets: Sequence[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accum: int = 1):
        self.batch_size, self.seed, self.rank, self.world_size, self.accum = batch_size, seed, rank, world_size, accum
        by_bucket: dict[str, list[int]] = defaultdict(list)
        for i, b in enumerate(buckets):
            by_bucket[b].append(i)
        self.by_bucket = {b: by_bucket[b] for b in sorted(by_bucket)}
        g = batch_size * world_size * accum
        self.batches_per_epoch = sum(len(v) // g for v in self.by_bucket.values()) * accum   # micro-batches
        if not self.batches_per_epoch:
            sizes = {b: len(v) for b, v in self.by_bucket.items()}
            raise ValueError(f"no bucket holds a full global batch of {g} images "
                             f"(batch_size x processes x grad_accum); bucket sizes: {sizes}")
        self.start = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (computed once per epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(self.seed * 100_003 + epoch)
        g, b = self.batch_size * self.world_size * self.accum, self.batch_size
        batches = []
        for idx in self.by_bucket.values():
            idx = list(idx)
            rng.shuffle(idx)
            batches += [idx[i:i + g] for i in range(0, len(idx) - g + 1, g)]
        rng.shuffle(batches)
        starts = [self.position(m) for m in range(self.accum)]
        mine = [gb[s:s + b] for gb in batches for s in starts]
        self._cached = (epoch, mine)
        return mine

    def position(self, micro: int) -> int:
        """Where this rank's micro-batch ``micro`` of a step starts within the step's global batch."""
        return (micro * self.world_size + self.rank) * self.batch_size

    def batch(self, n: int) -> list[int]:
        """Batch number ``n`` (0-based, counted over epochs) of this rank."""
        return self.epoch_batches(n // self.batches_per_epoch)[n % self.batches_per_epoch]

    def seek(self, n: int) -> None:
        """The next iteration starts at batch ``n``."""
        self.start = int(n)

    def __iter__(self) -> Iterator[list[int]]:
        n = self.start
        while True:
            yield self.batch(n)
            n += 1
