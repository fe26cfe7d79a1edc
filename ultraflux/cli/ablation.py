"""``ultraflux ablation``: run the 2x2 co-design grid (seed Table 1) as four queued DVC experiments and summarise.

    ultraflux ablation [-j JOBS] [--timeout S] [--out outputs/ablation] [-S KEY=VALUE ...] [--suffix TAG]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ultraflux.codesign import CELLS, LETTERS
from ultraflux.config import ParamsError
from ultraflux.ablation.dvc_queue import DvcError
from ultraflux.ablation.run import SUFFIX_RE, run_ablation


def _parse_cell_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        letter, sep, kv = item.partition(":")
        if not sep or letter not in CELLS or "=" not in kv:
            raise SystemExit(f"--set-variant expects LETTER:KEY=VALUE with LETTER in ABCD, got {item!r}")
        out.setdefault(letter, []).append(kv)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ultraflux ablation",
        description="Run the 2x2 data-model co-design ablation (seed Table 1) as four queued DVC experiments "
                    "co-design-A..D, wait for them, and write the Table-1 summary (CSV, Markdown, PNG; logged to "
                    "MLflow). Exit status: 0 all four succeeded, 1 some failed, 3 --timeout passed, 128 + the signal "
                    "when stopped by SIGINT/SIGTERM (cells stopped, partial summary written).")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1; 2 keeps the "
                    "run-cache sharing of curate/vae, more may recompute them)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds to wait for the four experiments; "
                    "unfinished ones are then killed and reported (default 7200)")
    ap.add_argument("--poll", type=float, default=10, help="seconds between `dvc queue status` polls (default 10)")
    ap.add_argument("--out", default="outputs/ablation", help="summary folder (default outputs/ablation)")
    ap.add_argument("--suffix", default="", help="name the experiments co-design-<L>-SUFFIX (keeps an earlier "
                    "grid of the plain names); re-running with the same names replaces those experiments")
    ap.add_argument("-S", "--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="extra params override for all four cells, as `dvc exp run -S` (repeatable)")
    ap.add_argument("--set-variant", action="append", default=[], metavar="L:KEY=VALUE",
                    help="params override for one cell only, e.g. B:dit_stage1.steps=100 (repeatable)")
    ap.add_argument("--variants", default="ABCD", help="subset of cells to run (default ABCD)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the summary to MLflow")
    ap.add_argument("--repo", default=".", help="repository root (default: current directory)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if not set(args.variants) <= set(LETTERS) or not args.variants:
        ap.error("--variants must be letters from ABCD")
    if args.suffix and not SUFFIX_RE.fullmatch(args.suffix):
        ap.error(f"--suffix must be letters, digits, '.' or '_' (got {args.suffix!r})")
    try:
        code, _, _ = run_ablation(Path(args.repo), jobs=args.jobs, timeout=args.timeout, poll=args.poll,
                                  out=args.out, suffix=args.suffix, common=args.common,
                                  per_cell=_parse_cell_sets(args.set_variant), letters=args.variants,
                                  mlflow=not args.no_mlflow)
    except (DvcError, ParamsError) as e:
        print(f"ultraflux ablation: {e}", file=sys.stderr)
        return 2
    return code
