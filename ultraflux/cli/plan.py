"""``ultraflux plan --gpus N [--nodes M] [--step-time S | STAGE=S ...]``: what `dvc repro` runs on N GPUs
(commands, global batch layouts, per-GPU memory, wall time; ``ultraflux/plan.py``)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from ultraflux.config import ParamsError, load_validated
    from ultraflux.plan import parse_step_times, plan

    ap = argparse.ArgumentParser(prog="ultraflux plan", description="print the command, batch layout, per-GPU "
                                 "memory and wall time of every launched stage for the current params")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all (launch.processes x launch.num_machines)")
    ap.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    ap.add_argument("--step-time", action="append", default=[], metavar="[STAGE=]S",
                    help="seconds per optimizer step (all training stages, or one: dit_stage1=4.2); default: the "
                         "median of the stage's last loss.csv")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        params = load_validated(args.params, check_paths=False)   # planned before the data and weights are here
        print(plan(params, args.gpus, args.nodes, parse_step_times(args.step_time)))
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"ultraflux plan: {e}", file=sys.stderr)
        return 2
    return 0
