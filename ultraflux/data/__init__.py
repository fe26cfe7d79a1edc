"""Data curation for UltraFlux (seed Sec. 2.1) and multi-aspect bucketing (Sec. 2.2).

Modules, one concept each: ``buckets`` (the aspect-bucket table), ``stats`` (S_flat and entropy), ``decode``
(robust image decoding), ``ingest`` (listing a source with captions), ``synthetic`` (the procedural tiny-profile
set), ``scorers`` (quality/aesthetic scorers and classical stand-ins), ``process`` (the per-image function and its
cache), ``engines`` (local process pool / Ray Data), ``select`` (keep/reject, stage 2, split, texture rank),
``plots`` (histograms) and ``curate`` (``run_curation``, ``cli_curate_stats``).
"""
