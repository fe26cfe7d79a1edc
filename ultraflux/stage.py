"""What every DVC stage does around its library call: params, checks, MLflow child run, results and metrics files.

``run_stage(stage, fn)`` (used by every ``stages/*.py``):

1. validates the whole params file against the schema (``ultraflux.config``) and checks that the stage's declared
   outputs (dvc.yaml) are writable, all BEFORE any work; problems are printed together and the stage exits with 2
   (``run_stage`` returns the exit status; ``stages/*.py`` pass it to ``sys.exit``);
2. runs ``fn(params, logger)`` inside the stage's MLflow child run; an expected failure (``ultraflux.io.StageFailure``:
   a diverged run, a full disk, checkpoints of another world size) is printed as one line, the run ends FAILED with
   the reason as its ``ultraflux.error`` tag, nothing is written below and the stage exits with 1;
3. writes what ``fn`` returned: all of it to ``outputs/results/<stage>.json`` (and to MLflow: numbers as metrics,
   strings as tags), and only the stage's few headline numbers (``HEADLINE``) to ``metrics/<stage>.json``, the DVC
   metrics file, so ``dvc exp show`` stays a few dozen readable numeric columns. The headline numbers also go onto
   the pipeline's parent run as ``<stage>.<metric>`` (MLflow's Compare view of executions).

``STAGE_PARAMS`` lists the params.yaml keys each stage reads; dvc.yaml lists exactly these (a test checks), so
editing a DiT key re-runs only the DiT stages and what follows them.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ultraflux.config import ParamsError, get, load_validated, parse_yaml
from ultraflux.io import StageFailure, disk_full_message, is_disk_full, sha256_file, write_json
from ultraflux.quiet import quiet_third_party
from ultraflux.tracking import NullLogger, flatten, stage_run

STAGE_PARAMS: dict[str, list[str]] = {
    "params": ["*"],   # validates the whole file first, so that a bad edit stops DVC before it deletes any output
    "download": ["data", "download"],
    "curate": ["seed", "data", "curate"],
    "vae": ["seed", "model", "vae_train"],
    "diagnostics": ["model", "rope", "diagnostics"],
    "dit_stage1": ["seed", "model", "rope", "objective", "loss", "latent_cache", "validation", "dit_stage1"],
    "dit_stage2": ["seed", "model", "rope", "objective", "loss", "latent_cache", "validation", "dit_stage2"],
    "sample": ["seed", "model", "rope", "sample", "curate.buckets.scale", "dit_stage2.shift", "refiner"],
    "evaluate": ["model", "sample.aspects", "evaluate"],
    "judge": ["judge"],
    "report": ["*"],   # all of params.yaml (dvc.yaml: `- params.yaml:`): the report shows what differs from the commit
}
# The DVC metrics of each stage (dotted keys into what the stage returns): the numbers worth a column.
HEADLINE: dict[str, list[str]] = {
    "download": ["num_urls", "num_ok", "ok_fraction"],
    "curate": ["num_sources", "num_kept", "num_train", "num_holdout", "num_stage2", "kept_fraction"],
    "vae": ["final_loss", "holdout_psnr", "holdout_ssim"],
    "diagnostics": ["fig3_energy_share_LL", "fig1_max_closure_err_resonance"],
    "dit_stage1": ["final_loss", "final_val_loss"],
    "dit_stage2": ["final_loss", "final_val_loss"],
    "evaluate": ["vae.psnr", "vae.ssim", "vae.nmse"] + [f"generation_mean.{k}" for k in (
        "fid", "hpsv3", "qalign", "artimuse", "glcm_score", "compression_ratio", "standin_fd_thumb8")],
    "judge": ["judged", "win_rate_a", "tie_rate"],
}
# Stages that consume (or produce) the curated dataset log its manifest as an MLflow dataset input.
DATASET_CONTEXT = {"curate": "curation", "vae": "training", "dit_stage1": "training", "dit_stage2": "training",
                   "evaluate": "evaluation"}
MANIFEST = Path("outputs/curated/manifest.parquet")
METRICS_DIR = Path("metrics")
RESULTS_DIR = Path("outputs/results")
# Wall-clock figures vary run to run, so they stay out of the DVC metrics and results (same params -> same files)
# and go to MLflow (``wall_time_s`` of each stage run) and to the untracked timings/ folder that the report reads.
TIMINGS_DIR = Path("timings")
TIMING_KEY = "_timing"  # a stage returns its own timing figures under this key


def stage_params(params: dict, stage: str) -> dict:
    if STAGE_PARAMS[stage] == ["*"]:
        return params
    return {key: get(params, key) for key in STAGE_PARAMS[stage]}


def declared_outputs(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> list[str]:
    """The outs, metrics and plots dvc.yaml declares for ``stage`` ([] outside a DVC project)."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return []
    spec = (parse_yaml(path.read_text()).get("stages") or {}).get(stage) or {}
    return [next(iter(item)) if isinstance(item, dict) else str(item)
            for section in ("outs", "metrics", "plots") for item in (spec.get(section) or [])]


def unwritable(paths: list[str]) -> list[str]:
    """One problem per output this process could not create or replace (DVC deletes and recreates outputs, so the
    folder holding each must be a writable directory)."""
    problems = []
    for p in paths:
        path = Path(p).absolute()
        holder = path.parent if path.exists() else next(a for a in path.parents if a.exists())
        if not holder.is_dir():
            problems.append(f"output '{p}' cannot be created: {holder} is a file, not a folder")
        elif not os.access(holder, os.W_OK | os.X_OK):
            problems.append(f"output '{p}' cannot be written: {holder} is not writable")
    return problems


def headline(stage: str, result: dict) -> dict:
    """The stage's DVC metrics as a nested dict (only the HEADLINE keys that are numbers)."""
    flat = flatten(result)
    out: dict = {}
    for key in HEADLINE.get(stage, []):
        value = flat.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node = out
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return out


def check_params_stage(params_path: str = "params.yaml", checks: Sequence[Callable[[dict], list[str]]] = ()) -> int:
    """The ``params`` stage (dvc.yaml's first): validate the whole file. DVC removes a stage's outputs just before
    it runs that stage, so a typo must fail here, upstream of every other stage, or DVC would already have deleted
    curate's outputs when curate's own check refused the file. Its output never changes while the file is valid,
    so a valid edit re-runs only the stages whose own params changed. ``checks``: further checks of valid params
    (``stages/params.py``: every stage's launch, e.g. a global batch the processes cannot split), before curation."""
    quiet_third_party()
    try:
        params = load_validated(params_path)
        if problems := [p for check in checks for p in check(params)]:
            raise ParamsError(problems, params_path)
    except ParamsError as e:
        print("[params] nothing was run and no output was removed; fix the file and run again", file=sys.stderr)
        print(f"[params] {e}", file=sys.stderr)   # last: what a queued experiment's failure reason quotes
        return 2
    write_json(RESULTS_DIR / "params.json", {"params": "valid"})
    return 0


def run_stage(stage: str, fn: Callable[[dict, object], dict], params_path: str = "params.yaml",
              checks: Sequence[Callable[[dict], list[str]]] = ()) -> int:
    """Validate, run ``fn(params, logger)`` inside the stage's MLflow run, write results and metrics (module doc).
    Returns the exit status: 0 done, 2 bad params (nothing run), 1 an expected failure (one line printed).

    ``checks``: the stage's own cheap checks of valid params against the world (e.g. pretrained weights' RoPE),
    each returning problems that name their keys; they run with the validation, before any work."""
    quiet_third_party()
    try:
        params = load_validated(params_path)
        if problems := [p for check in checks for p in check(params)]:
            raise ParamsError(problems, params_path)
        if problems := unwritable(declared_outputs(stage)):
            raise ParamsError(problems, "dvc.yaml")
    except ParamsError as e:
        print(f"[{stage}] {e}", file=sys.stderr)
        return 2
    try:
        _run(stage, fn, params)
    except StageFailure as e:
        print(f"[{stage}] {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a full disk where no output named it (samples, evaluation, report, shards): one line
        if not is_disk_full(e):
            raise
        print(f"[{stage}] {disk_full_message(e, f'the {stage} stage outputs')}", file=sys.stderr)
        return 1
    return 0


def _run(stage: str, fn: Callable[[dict, object], dict], params: dict) -> dict:
    if int(os.environ.get("RANK", "0")) != 0:  # `accelerate launch`: only rank 0 tracks and writes results
        return fn(params, NullLogger()) or {}
    t0 = time.monotonic()
    with stage_run(stage, params, stage_params(params, stage)) as logger:
        result = fn(params, logger) or {}
        timing = {"wall_time_s": round(time.monotonic() - t0, 3), **result.pop(TIMING_KEY, {})}
        flat = flatten(result)
        logger.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        logger.set_tags({f"{stage}.{k}": v for k, v in flat.items() if isinstance(v, (str, bool))})
        metrics = headline(stage, result)
        logger.log_summary({f"{stage}.{k}": v for k, v in flatten(metrics).items()})
        if stage in DATASET_CONTEXT and MANIFEST.is_file():
            logger.log_dataset(MANIFEST, sha256_file(MANIFEST), context=DATASET_CONTEXT[stage])
        write_json(RESULTS_DIR / f"{stage}.json", result)
        if stage in HEADLINE:
            write_json(METRICS_DIR / f"{stage}.json", metrics)
        write_json(TIMINGS_DIR / f"{stage}.json", timing)
    return result
