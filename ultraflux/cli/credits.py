"""``ultraflux credits``: a Markdown credits file (photographer, profile, work page) from a curation manifest."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ultraflux credits", description=__doc__)
    ap.add_argument("--manifest", default="outputs/curated/manifest.parquet")
    ap.add_argument("--out", default="CREDITS.md")
    ap.add_argument("--all", action="store_true", help="credit every listed image, not only the kept ones")
    args = ap.parse_args(argv)
    import pandas as pd

    from ultraflux.data.released import write_credits

    manifest = Path(args.manifest)
    if not manifest.is_file():
        print(f"--manifest {args.manifest}: no such file (run `dvc repro curate` first)", file=sys.stderr)
        return 2
    frame = pd.read_parquet(manifest)
    if "photographer" not in frame.columns:
        print(f"{args.manifest}: no attribution columns (a manifest from before the released-data path)",
              file=sys.stderr)
        return 2
    count = write_credits(frame, Path(args.out), kept_only=not args.all)
    print(f"{args.out}: {count} image(s) credited")
    return 0
