"""``ultraflux curate-stats IMAGE...``: one JSON object per image (flatness, entropy, bucket, keep decision)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str]) -> int:
    """Thresholds come from ./params.yaml (or ``--params``) when present, else the seed defaults (Sec. 2.1).
    Learned/percentile filters (quality, aesthetic) need the whole set and are not applied here.
    Exit status 2 on usage errors, else 0."""
    from ultraflux.config import load_params
    from ultraflux.data.curate import image_stats

    parser = argparse.ArgumentParser(prog="ultraflux curate-stats",
                                     description="Per-image curation statistics (seed Sec. 2.1) as JSON lines.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml if present)")
    args = parser.parse_args(argv)
    params = load_params(args.params) if Path(args.params).is_file() else {}
    for path in args.images:
        print(json.dumps(image_stats(path, params)), flush=True)
    return 0


__all__ = ["main"]
