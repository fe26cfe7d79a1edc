"""The ``ultraflux`` command: one module per subcommand in this package (argument parsing and printing only; the
work is done by the library it calls). This file only dispatches.

  ultraflux generate ...        one image from a trained model            (cli/generate.py)
  ultraflux curate-stats IMG..  one image's curation statistics as JSON   (cli/curate_stats.py)
  ultraflux judge A B ...       Gemini pairwise preference of two folders (cli/judge.py)
  ultraflux ablation ...        the 2x2 co-design ablation                (cli/ablation.py)
  ultraflux plan --gpus N ...   commands, batch layout, memory, wall time (cli/plan.py)
  ultraflux exp show            experiments in a terminal-sized table     (cli/exp.py)
  ultraflux credits             photographers of the curated images       (cli/credits.py)
  ultraflux export DIR --out F  a transformer / VAE / LoRA as one BFL-layout file (cli/export.py)
  ultraflux profile apply F     rewrite params.yaml with a profile (e.g. configs/paper-4k.yaml)
  ultraflux params check        validate params.yaml and exit
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "generate": ("ultraflux.cli.generate", "main", "generate an image with a trained model"),
    "curate-stats": ("ultraflux.cli.curate_stats", "main", "print an image's curation statistics as JSON"),
    "judge": ("ultraflux.cli.judge", "main", "Gemini pairwise preference between two image folders"),
    "ablation": ("ultraflux.cli.ablation", "main", "run the 2x2 data-model co-design ablation (seed Table 1)"),
    "plan": ("ultraflux.cli.plan", "main", "what `dvc repro` runs on N GPUs: commands, batch layout, memory, time"),
    "exp": ("ultraflux.cli.exp", "main", "compare DVC experiments in a terminal-sized table"),
    "credits": ("ultraflux.cli.credits", "main", "write a credits file (photographers) from the curation manifest"),
    "export": ("ultraflux.cli.export", "main", "a transformer / VAE / LoRA as one safetensors file for ComfyUI"),
    "profile": ("ultraflux.cli", "cli_profile", "apply a parameter profile, e.g. configs/paper-4k.yaml"),
    "params": ("ultraflux.cli", "cli_params", "validate params.yaml"),
}


def cli_profile(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ultraflux profile")
    ap.add_argument("action", choices=["apply"])
    ap.add_argument("profile", help="a YAML file of params.yaml keys to overwrite, e.g. configs/paper-4k.yaml")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from ultraflux.config import ParamsError, apply_profile

    try:
        changed = apply_profile(args.profile, args.params)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.params}: {len(changed)} keys set from {args.profile}" + "".join(f"\n  {k}" for k in changed))
    return 0


def cli_params(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ultraflux params")
    ap.add_argument("action", choices=["check"])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from ultraflux.config import ParamsError, load_validated

    try:
        params = load_validated(args.params)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    from ultraflux.launch import machine_problems

    if problems := machine_problems(params):   # valid, but not for this machine
        print(f"{args.params}: valid, but not on this machine:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 3
    print(f"{args.params}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="ultraflux", description="UltraFlux: native-4K multi-aspect text-to-image, "
                                 "reproducible with DVC and tracked in MLflow. The pipeline itself runs with `dvc repro`.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        ap.error(f"unknown command {argv[0]!r}")
    module, func, _ = SUBCOMMANDS[argv[0]]
    from ultraflux.quiet import quiet_third_party

    quiet_third_party()
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
