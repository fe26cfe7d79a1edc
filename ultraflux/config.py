"""params.yaml: loading, validation (errors name the key), and the paper-profile switch.

`load_params()` reads params.yaml, `validate()` checks every key the pipeline reads *before* any work starts and raises
`ParamsError("params.yaml: <key> ...")`. `apply_profile()` rewrites params.yaml in place with the values of a profile
file (e.g. configs/paper-4k.yaml), keeping the comments, so the paper's configuration is one command away.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.yaml"
ROPE_KINDS = ("flux", "yarn", "resonance_yarn")
OBJECTIVES = ("l2", "ultraflux")
VARIANTS = ("multiaspect", "baseline")
ENGINES = ("local", "ray")
DIT_STAGES = ("dit_stage1", "dit_stage2")
DIT_SUBSETS = ("all", "aesthetic_top")


class ParamsError(ValueError):
    """A params.yaml value is missing or invalid; the message names the key."""


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        params = parse_yaml(path.read_text())
    except Exception as e:  # ruamel's parser and scanner errors share no public base class
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return params


def parse_yaml(text: str) -> Any:
    """YAML 1.2 (ruamel, as DVC writes params.yaml): an unquoted 16:9 stays a string, not PyYAML's base-60 int."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def get(params: dict, key: str) -> Any:
    """``get(p, "dit_stage1.steps")``; a missing key raises ParamsError naming it."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml: missing key '{key}'")
        node = node[part]
    return node


def _fail(key: str, msg: str, value: Any) -> None:
    raise ParamsError(f"params.yaml: '{key}' {msg} (got {value!r})")


def _positive_int(p: dict, key: str, allow_zero: bool = False) -> None:
    v = get(p, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        _fail(key, "must be a " + ("non-negative" if allow_zero else "positive") + " integer", v)


def _positive_float(p: dict, key: str) -> None:
    v = get(p, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        _fail(key, "must be a positive number", v)


def _fraction(p: dict, key: str) -> None:
    v = get(p, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        _fail(key, "must be a fraction in (0, 1]", v)


def _choice(p: dict, key: str, choices: tuple[str, ...]) -> None:
    v = get(p, key)
    if v not in choices:
        _fail(key, f"must be one of {', '.join(choices)}", v)


def validate(params: dict, check_paths: bool = True) -> dict:
    """Check every key the pipeline reads; with ``check_paths`` also that configured folders exist."""
    from ultraflux.data.buckets import bucket_table

    p = params
    _positive_int(p, "seed", allow_zero=True)
    _choice(p, "data.variant", VARIANTS)
    source = get(p, "data.source")
    if check_paths and source and not (Path(source).is_dir() and os.access(source, os.R_OK | os.X_OK)):
        _fail("data.source", "must be a readable folder of images (or \"\" for the generated set)", source)
    _positive_int(p, "data.synthetic.num_images")
    _positive_int(p, "data.synthetic.long_side")
    _choice(p, "curate.engine", ENGINES)
    _positive_int(p, "curate.workers")
    _positive_int(p, "curate.flat.patch")
    _positive_float(p, "curate.flat.threshold")
    _fraction(p, "curate.flat.max_fraction")
    _positive_float(p, "curate.entropy_min")
    _fraction(p, "curate.aesthetic.keep_top")
    _fraction(p, "curate.aesthetic.stage2_top")
    _fraction(p, "curate.quality.standin_keep_fraction")
    _fraction(p, "curate.holdout_fraction")
    _positive_float(p, "curate.buckets.scale")
    _positive_float(p, "curate.max_upscale")
    known = bucket_table(1.0)
    for key in ("curate.buckets.aspects", "sample.aspects"):
        aspects = get(p, key)
        if not isinstance(aspects, list) or not aspects:
            _fail(key, "must be a non-empty list of aspect ratios", aspects)
        for a in aspects:
            if a not in known:
                _fail(key, f"has an unknown aspect ratio {a!r} (quote ratios in YAML: \"16:9\"); "
                      f"known: {', '.join(known)}", aspects)

    _choice(p, "rope.kind", ROPE_KINDS)
    _positive_int(p, "rope.theta")
    _positive_int(p, "rope.train_len")
    _positive_float(p, "rope.max_scale")
    _choice(p, "objective", OBJECTIVES)
    _positive_float(p, "loss.c_min")
    _positive_float(p, "loss.c_max")
    if get(p, "loss.c_min") > get(p, "loss.c_max"):
        _fail("loss.c_min", "must not exceed loss.c_max", get(p, "loss.c_min"))
    tiny = get(p, "model.tiny")
    if sum(tiny["axes_dims_rope"]) != tiny["attention_head_dim"]:
        _fail("model.tiny.axes_dims_rope", "must sum to model.tiny.attention_head_dim", tiny["axes_dims_rope"])
    for key in ("model.pretrained", "model.vae_pretrained"):
        v = get(p, key)
        if check_paths and v and not Path(v).is_dir():
            _fail(key, "must be a local diffusers-format directory (or \"\" for the tiny model)", v)

    for key in ("vae_train.steps", "vae_train.resolution", "vae_train.batch_size", "vae_train.grad_accum",
                "vae_train.eval_every"):
        _positive_int(p, key)
    if get(p, "vae_train.resolution") % 16:
        _fail("vae_train.resolution", "must be a multiple of 16 (F16 VAE)", get(p, "vae_train.resolution"))
    for key in ("vae_train.lr", "vae_train.lambda_l2"):
        _positive_float(p, key)
    _fraction(p, "vae_train.flat_top_fraction")
    for stage in DIT_STAGES:
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
            _positive_int(p, f"{stage}.{key}")
        _positive_float(p, f"{stage}.lr")
        _positive_float(p, f"{stage}.shift")
        _choice(p, f"{stage}.subset", DIT_SUBSETS)
        t_min, t_max = get(p, f"{stage}.t_min"), get(p, f"{stage}.t_max")
        if not (isinstance(t_min, int) and isinstance(t_max, int) and 0 <= t_min <= t_max <= 999):
            _fail(f"{stage}.t_min", "and t_max must be integers with 0 <= t_min <= t_max <= 999", (t_min, t_max))
    prompts = get(p, "sample.prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) and x.strip() for x in prompts):
        _fail("sample.prompts", "must be a non-empty list of non-empty strings", prompts)
    _positive_int(p, "sample.num_inference_steps")
    _positive_float(p, "sample.guidance_scale")
    return params


def apply_profile(profile_path: str | os.PathLike, params_path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """Overwrite the keys named in ``profile_path`` inside ``params_path`` (comments kept). Returns changed keys."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    params_path = Path(params_path)
    doc = rt.load(params_path.read_text())
    overlay = rt.load(Path(profile_path).read_text()) or {}  # round-trip load keeps "16:9" quoted
    changed: list[str] = []

    def merge(dst, src, prefix=""):
        for k, v in src.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v, key + ".")
            else:
                if k not in dst:
                    raise ParamsError(f"{profile_path}: key '{key}' does not exist in {params_path}")
                if dst[k] != v:
                    changed.append(key)
                dst[k] = v

    merge(doc, overlay)
    validate(parse_yaml(_dump(rt, doc)), check_paths=False)
    params_path.write_text(_dump(rt, doc))
    return changed


def _dump(rt, doc) -> str:
    import io

    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()
