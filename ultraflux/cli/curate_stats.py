"""``ultraflux curate-stats IMAGE...``: one JSON object per image (flatness, entropy, bucket, keep decision)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PARAMS = "params.yaml"


def main(argv: list[str]) -> int:
    """Settings come from ./params.yaml (or ``--params``), validated like a stage validates them; with no
    ./params.yaml (outside a repository) from the schema's defaults, which are the seed's (Sec. 2.1). The verdict
    is the stage's own rule (:mod:`ultraflux.data.rule`). Learned/percentile filters (quality, aesthetic) need the
    whole set and are not applied here.

    Every image gets its JSON line on stdout; an input that is missing or cannot be read also gets one line on
    stderr. Exit status: 0 when every input was read, 1 when any was missing or unreadable, 2 on usage or params
    errors (before any image is read)."""
    from ultraflux.config import ParamsError
    from ultraflux.data.curate import INPUT_ERRORS, image_stats

    parser = argparse.ArgumentParser(prog="ultraflux curate-stats",
                                     description="Per-image curation statistics (seed Sec. 2.1) as JSON lines.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--params", default=None, help=f"params file (default: ./{DEFAULT_PARAMS} if present, else "
                                                       "the schema's defaults)")
    args = parser.parse_args(argv)
    try:
        curate = _curate_settings(args.params)
    except ParamsError as err:
        print(f"curate-stats: {err}", file=sys.stderr)
        return 2
    bad = 0
    for path in args.images:
        record = image_stats(path, curate)
        print(json.dumps(record), flush=True)
        if record["reason"].startswith(INPUT_ERRORS):
            bad += 1
            print(f"curate-stats: {path}: {record['reason']}", file=sys.stderr, flush=True)
    if bad:
        print(f"curate-stats: {bad} of {len(args.images)} input(s) missing or unreadable", file=sys.stderr)
    return 1 if bad else 0


def _curate_settings(params_arg: str | None):
    """The validated ``curate`` section, saying on stderr where it came from."""
    from ultraflux.config import load_params, typed
    from ultraflux.schema import Curate

    path = Path(params_arg or DEFAULT_PARAMS)
    if params_arg is None and not path.is_file():
        curate = Curate.model_construct()  # only the per-image keys, which all have schema defaults, are read
        print(f"curate-stats: no ./{DEFAULT_PARAMS} here, using the schema's defaults: flat "
              f"{curate.flat.model_dump()}, entropy_min {curate.entropy_min}, gray {curate.gray}, max_upscale "
              f"{curate.max_upscale}, bucket scale {curate.buckets.scale}", file=sys.stderr)
        return curate
    curate = typed(load_params(path), path).curate
    print(f"curate-stats: settings from {path.resolve()} (validated)", file=sys.stderr)
    return curate


__all__ = ["main"]
