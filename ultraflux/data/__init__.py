"""Data curation for UltraFlux (seed Sec. 2.1) and multi-aspect bucketing (Sec. 2.2).

Modules, one concept each: ``buckets`` (the aspect-bucket table), ``stats`` (S_flat and entropy, as the public
filtering tool computes them), ``decode`` (least-work, robust decoding: gray, small, RGB), ``ingest`` (listing a
source with captions), ``synthetic`` (the procedural tiny-profile set), ``scorers`` (quality/aesthetic scorers and
classical stand-ins), ``process`` (the two per-image passes and their cache), ``engines`` (local process pool / Ray
Data), ``select`` (keep/reject, stage 2, split, texture rank), ``shards`` (the WebDataset shards and random access
to one curated image), ``plots`` (histograms) and ``curate`` (``run_curation``, the minimum-size guard).
"""
