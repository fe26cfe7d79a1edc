"""``ultraflux judge DIR_A DIR_B --prompts PROMPTS.jsonl``: the Gemini pairwise judge (seed Sec. 11) on two folders.

Argument parsing and printing only; the judging is :func:`ultraflux.evaluation.judge.judge_pairs`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ultraflux.config import load_params, validated_section
from ultraflux.evaluation._llm import default_cache_root
from ultraflux.evaluation.judge import judge_pairs, succeeded


def read_prompts_jsonl(path: Path) -> list[dict]:
    """``{"image": "<file name>", "prompt": "<text>"}`` per line (blank lines skipped); ValueError naming the line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected {{"image": "<file name>", "prompt": "<text>"}}')
        rows.append(obj)
    return rows


def judge_params(path: Path) -> dict:
    """The validated ``judge`` section of a params file (which may hold only that section), schema defaults filled
    in; the schema's defaults when the file does not exist. Raises ``ParamsError`` naming the file and key."""
    return validated_section(load_params(path, missing_ok=True), "judge", path)


def main(argv: list[str]) -> int:
    """Pairs are matched by file name (``image`` in each PROMPTS.jsonl line) in both folders. Prints the JSON summary
    on stdout; writes ``verdicts.jsonl`` + ``summary.json`` to ``--out`` (default: ``<parent of DIR_A>/judge_<A>_vs_<B>_
    <UTC timestamp>``). ``--cache`` defaults to ``$ULTRAFLUX_CACHE_DIR/judge`` (else ``~/.cache/ultraflux/judge``).
    Settings come from ``--params`` (default ``params.yaml``, section ``judge``), overridden by the flags.
    Exit status: 0 (``ok``, or skipped without a key), 1 (``failed``: no pair could be judged, or a fatal API
    error), 2 (bad arguments / inputs).
    """
    ap = argparse.ArgumentParser(prog="ultraflux judge", description="Gemini pairwise preference judge (seed Sec. 11).")
    ap.add_argument("dir_a", type=Path, help="folder of images from model A")
    ap.add_argument("dir_b", type=Path, help="folder of images from model B")
    ap.add_argument("--prompts", type=Path, required=True, help='JSONL: {"image": "<file name>", "prompt": "<text>"} per line')
    ap.add_argument("--base-url", default=None, help='endpoint (default: params judge.base_url; "" = official)')
    ap.add_argument("--model", default=None, help="model (default: params judge.model)")
    ap.add_argument("--out", type=Path, default=None, help="output folder for verdicts.jsonl + summary.json")
    ap.add_argument("--cache", type=Path, default=None, help="answer cache folder")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (section: judge)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    for d in (args.dir_a, args.dir_b):
        if not d.is_dir():
            print(f"ultraflux judge: not a folder: {d}", file=sys.stderr)
            return 2
    try:
        rows = read_prompts_jsonl(args.prompts)
        cfg = judge_params(args.params)
    except (OSError, ValueError) as e:   # ParamsError is a ValueError naming the file and key
        print(f"ultraflux judge: {e}", file=sys.stderr)
        return 2
    if args.base_url is not None:
        cfg["base_url"] = args.base_url
    if args.model is not None:
        cfg["model"] = args.model
    pairs = [{"id": str(r.get("id", r["image"])), "image_a": args.dir_a / r["image"], "image_b": args.dir_b / r["image"],
              "prompt": r["prompt"]} for r in rows]
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = args.dir_a.resolve().parent / f"judge_{args.dir_a.resolve().name}_vs_{args.dir_b.resolve().name}_{stamp}"
    cache = args.cache if args.cache is not None else default_cache_root() / "judge"
    summary = judge_pairs(pairs, cfg, cache, out, progress=not args.no_progress)
    summary["out"] = str(out)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if succeeded(summary) else 1
