"""``ultraflux exp show [--changed]``: the experiments of this commit in a terminal-sized table (see
ultraflux/ablation/exp_view.py); ``dvc exp show`` remains the complete view."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ultraflux exp", description="Compare DVC experiments in <= 120 columns: the "
                                 "co-design axes and headline metrics, or with --changed every param and metric "
                                 "that differs between the rows (dependency hashes never shown).")
    ap.add_argument("action", choices=["show"])
    ap.add_argument("--changed", action="store_true", help="every param/metric that differs between the rows")
    ap.add_argument("--json-file", help="read `dvc exp show --json` output from this file instead of running DVC")
    ap.add_argument("--repo", default=".")
    args = ap.parse_args(argv)
    from ultraflux.ablation import dvc_queue, exp_view

    try:
        show = (json.loads(Path(args.json_file).read_text()) if args.json_file
                else dvc_queue.exp_show(Path(args.repo)))
    except (dvc_queue.DvcError, OSError, json.JSONDecodeError) as e:
        print(f"ultraflux exp show: {e}", file=sys.stderr)
        return 2
    rows = exp_view.rows_of(show)
    if not rows:
        print("no experiments (run `dvc repro` or `ultraflux ablation` first)")
        return 0
    table = exp_view.changed_table(rows) if args.changed else exp_view.headline_table(rows)
    print(exp_view.render(table))
    return 0
