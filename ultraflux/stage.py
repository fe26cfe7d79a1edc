"""What every DVC stage does around its library call: params, validation, MLflow child run, metrics JSON.

``STAGE_PARAMS`` lists the params.yaml keys each stage reads; dvc.yaml lists exactly these (a test checks), so
editing a DiT key re-runs only the DiT stages and what follows them.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from ultraflux.config import ParamsError, get, load_params, validate
from ultraflux.io import write_json
from ultraflux.tracking import NullLogger, flatten, stage_run

STAGE_PARAMS: dict[str, list[str]] = {
    "curate": ["seed", "data", "curate"],
    "vae": ["seed", "model", "vae_train"],
    "diagnostics": ["model", "rope"],
    "dit_stage1": ["seed", "model", "rope", "objective", "loss", "latent_cache", "validation", "dit_stage1"],
    "dit_stage2": ["seed", "model", "rope", "objective", "loss", "latent_cache", "validation", "dit_stage2"],
    "sample": ["seed", "model", "rope", "sample", "curate.buckets.scale", "dit_stage2.shift", "refiner"],
    "evaluate": ["model", "sample.aspects", "evaluate"],
    "judge": ["judge"],
    "report": [],
}
METRICS_DIR = Path("metrics")
# Wall-clock figures vary run to run, so they stay out of the DVC metrics (same params -> same metrics) and go to
# MLflow (``wall_time_s`` of each stage run) and to the untracked timings/ folder that the report reads.
TIMINGS_DIR = Path("timings")
TIMING_KEY = "_timing"  # a stage returns its own timing figures under this key


def stage_params(params: dict, stage: str) -> dict:
    return {key: get(params, key) for key in STAGE_PARAMS[stage]}


def run_stage(stage: str, fn: Callable[[dict, object], dict], params_path: str = "params.yaml") -> dict:
    """Load + validate params, run ``fn(params, logger)`` inside the stage's MLflow run, write metrics/<stage>.json."""
    try:
        params = validate(load_params(params_path))
    except ParamsError as e:
        print(f"[{stage}] {e}", file=sys.stderr)
        raise SystemExit(2)
    if int(os.environ.get("RANK", "0")) != 0:  # `accelerate launch`: only rank 0 tracks and writes results
        return fn(params, NullLogger()) or {}
    t0 = time.time()
    with stage_run(stage, params, stage_params(params, stage)) as logger:
        metrics = fn(params, logger) or {}
        timing = {"wall_time_s": round(time.time() - t0, 3), **metrics.pop(TIMING_KEY, {})}
        logger.log_metrics(_numeric(metrics))
        logger.set_tags({f"{stage}.{k}": v for k, v in flatten(metrics).items() if isinstance(v, str)})
        write_json(METRICS_DIR / f"{stage}.json", metrics)
        write_json(TIMINGS_DIR / f"{stage}.json", timing)
    return metrics


def _numeric(d: dict) -> dict:
    return {k: v for k, v in flatten(d).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
