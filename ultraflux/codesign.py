"""The co-design grid (seed Table 1): which params make each cell, and the MLflow tags that mark a cell's runs.

A cell is a DVC experiment named ``co-design-<L>[-suffix]``; DVC sets ``DVC_EXP_NAME`` in every stage of a queued
experiment, so ``tracking.run_tags`` tags every stage run with ``ablation=co-design`` and ``variant=<L>``
(:func:`ablation_tags`). The name is the marker rather than an environment variable because a queue worker that is
already running would not see a variable set for ``dvc queue start``, and other experiments in the same queue must
not be tagged.
"""
from __future__ import annotations

import re

PREFIX = "co-design"
ABLATION_TAG = "co-design"
LETTERS = ("A", "B", "C", "D")
DATASETS = {"baseline": "Diffusion-4K recipe (data.variant=baseline)",
            "multiaspect": "MultiAspect recipe (data.variant=multiaspect)"}
MODELS: dict[str, dict[str, str]] = {
    "flux_l2": {"objective": "l2", "rope.kind": "flux"},
    "ultraflux": {"objective": "ultraflux", "rope.kind": "resonance_yarn"},
}
MODEL_LABELS = {"flux_l2": "Flux, latent L2", "ultraflux": "UltraFlux (SNR-aware Huber wavelet + Resonance RoPE-YaRN)"}
CELLS: dict[str, tuple[str, str]] = {  # letter -> (data.variant, model)
    "A": ("baseline", "flux_l2"),
    "B": ("multiaspect", "flux_l2"),
    "C": ("baseline", "ultraflux"),
    "D": ("multiaspect", "ultraflux"),
}
ROLES = {"A": "baseline", "B": "data only", "C": "model only", "D": "data + model"}
# Seed Table 1, for reference beside our numbers.
PAPER = {
    "A": {"dataset": "Diffusion-4K-v2", "model": "Flux, latent L2", "fid": 152.09, "hpsv3": 8.57},
    "B": {"dataset": "MultiAspect-4K-1M", "model": "Flux, latent L2", "fid": 151.41, "hpsv3": 9.17},
    "C": {"dataset": "Diffusion-4K-v2", "model": "UltraFlux", "fid": 147.41, "hpsv3": 10.03},
    "D": {"dataset": "MultiAspect-4K-1M", "model": "UltraFlux", "fid": 145.81, "hpsv3": 10.78},
}
NAME_RE = re.compile(rf"^{re.escape(PREFIX)}-([ABCD])(?:-([A-Za-z0-9][A-Za-z0-9._]*))?$")


def exp_name(letter: str, suffix: str = "") -> str:
    return f"{PREFIX}-{letter}" + (f"-{suffix}" if suffix else "")


def cell_sets(letter: str) -> list[str]:
    """The ``-S`` overrides that make params.yaml the cell ``letter`` (data side and model side)."""
    variant, model = CELLS[letter]
    return [f"data.variant={variant}", *(f"{k}={v}" for k, v in MODELS[model].items())]


def model_of(params: dict) -> str:
    """``flux_l2`` / ``ultraflux`` when objective and rope.kind form one of the paper's two model sides, else mixed."""
    got = {"objective": str(params["objective"]), "rope.kind": str(params["rope"]["kind"])}
    return next((m for m, want in MODELS.items() if want == got), "mixed")


def cell_of(params: dict) -> str | None:
    """The Table 1 letter that ``params`` are, or None (e.g. objective=l2 with resonance RoPE)."""
    key = (str(params["data"]["variant"]), model_of(params))
    return next((L for L, cell in CELLS.items() if cell == key), None)


def ablation_tags(params: dict, exp: str | None) -> dict[str, str]:
    """Tags for ``tracking.run_tags``: non-empty only for experiments named ``co-design-<L>[-suffix]``."""
    m = NAME_RE.match(exp or "")
    if not m:
        return {}
    tags = {"ablation": ABLATION_TAG, "variant": m.group(1), "ablation.model": model_of(params),
            "ablation.dataset": str(params["data"]["variant"])}
    if cell_of(params) != m.group(1):  # e.g. a --set-variant override moved this cell off the grid
        tags["ablation.params_match"] = "false"
    return tags
