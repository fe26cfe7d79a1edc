"""params.yaml: loading (YAML 1.2), validation against the schema (``ultraflux.schema``), the paper-profile switch.

``validate(params, source)`` checks every key before any work and returns the COMPLETE params: every key the schema
has, the schema's default where the file omits one (values written in the file are returned as written, so hashes of
a section do not change with validation). The library indexes these keys directly: no default lives outside the
schema and params.yaml (tests/test_params_single_source.py). It raises one :class:`ParamsError` listing ALL
problems, each naming the file read and the full key::

    other.yaml: 'dit_stage1.stepz' is not a known key (did you mean 'dit_stage1.steps'?)
    other.yaml: 'vae_train.checkpoint_every' must be greater than or equal to 1 (got 0)

``apply_profile()`` rewrites params.yaml in place with the values of a profile file (e.g. configs/paper-4k.yaml),
keeping the comments, after validating the result with the same schema.
"""
from __future__ import annotations

import copy
import difflib
import io
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ultraflux.io import atomic_path
from ultraflux.schema import Params, known_keys

PARAMS_FILE = "params.yaml"

# Keys naming a local folder (or file) that must exist when set; "" means "not used".
PATH_KEYS = {
    "model.pretrained": "a local diffusers-format directory (or \"\" for the tiny model)",
    "model.vae_pretrained": "a local diffusers-format VAE directory (or \"\" for the tiny VAE)",
    "curate.quality.weights": "a local Q-Align checkpoint directory (or \"\" for the named stand-in)",
    "curate.aesthetic.weights": "a local ArtiMuse checkpoint directory (or \"\" for the named stand-in)",
    "vae_train.lpips_weights": "a local folder with the LPIPS VGG weights (or \"\" for the named stand-in)",
    "evaluate.fid_inception_weights": "a local Inception weights file (or \"\" to skip FID)",
    "evaluate.lpips_weights": "a local LPIPS weights folder (or \"\")",
    "evaluate.hpsv3_weights": "a local HPSv3 checkpoint (or \"\")",
    "evaluate.artimuse_weights": "a local ArtiMuse checkpoint (or \"\")",
    "evaluate.qalign_weights": "a local Q-Align checkpoint (or \"\")",
}


class ParamsError(ValueError):
    """One or more params values are missing or invalid; the message names the file and every key."""

    def __init__(self, problems: list[str] | str, source: str | os.PathLike = PARAMS_FILE):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = str(source)
        lines = [f"{self.source}: {p}" for p in self.problems]
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} problems\n" + "\n".join(lines))


def parse_yaml(text: str) -> Any:
    """YAML 1.2 (ruamel, as DVC writes params.yaml): an unquoted 16:9 stays a string, not PyYAML's base-60 int."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load_params(path: str | os.PathLike = PARAMS_FILE, missing_ok: bool = False) -> dict:
    """The parsed params file (not yet validated); ``missing_ok`` returns {} for a missing file."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise ParamsError("not found (run from the repository root, or pass --params)", path)
    try:
        params = parse_yaml(path.read_text())
    except Exception as e:  # ruamel's parser and scanner errors share no public base class
        raise ParamsError(f"not valid YAML: {e}", path) from e
    if not isinstance(params, dict):
        raise ParamsError("the top level must be a mapping of sections", path)
    return params


def get(params: dict, key: str) -> Any:
    """``get(p, "dit_stage1.steps")``; a missing key raises ParamsError naming it."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"missing key '{key}'")
        node = node[part]
    return node


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _siblings(loc: tuple) -> list[str]:
    """Field names of the schema model that holds ``loc[-1]``."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _where_it_belongs(loc: tuple) -> str:
    """The hint for an unknown key: the section(s) that have a key of that name (a key put in the wrong section),
    else the closest key of its own section (a typo), else ""."""
    name = str(loc[-1])
    sections = [k.rpartition(".")[0] for k in known_keys() if k.rpartition(".")[2] == name and "." in k]
    if sections:
        where = ", ".join(sections[:-1]) + (" or " if len(sections) > 1 else "") + sections[-1]
        here = f", not in '{_dotted(loc[:-1])}'" if len(loc) > 1 else ", not at the top level"
        return f" (it belongs in {where}{here})"
    close = difflib.get_close_matches(name, _siblings(loc), n=1, cutoff=0.5)
    return f" (did you mean '{_dotted(loc[:-1] + (close[0],))}'?)" if close else ""


def _describe(err: dict) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return f"'{key}' is not a known key{_where_it_belongs(loc)}"
    if kind == "missing":
        return f"missing key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or not loc:   # a cross-key rule of a whole section
        return f"'{key or 'params'}': {msg}"
    msg = msg[0].lower() + msg[1:] if msg.startswith("Input should") else msg
    msg = msg.replace("input should", "must").replace("Input should", "must")
    return f"'{key}' {msg} (got {err['input']!r})"


def _path_problems(params: dict) -> list[str]:
    problems = []
    for key, what in PATH_KEYS.items():
        try:
            value = get(params, key)
        except ParamsError:
            continue
        if value and isinstance(value, str) and not Path(value).exists():
            problems.append(f"'{key}' must be {what}; {value!r} does not exist")
    source = (params.get("data") or {}).get("source") if isinstance(params.get("data"), dict) else None
    if source and isinstance(source, str):
        p = Path(source)
        table = p.is_file() and p.suffix.lower() in (".csv", ".parquet")
        release = p.is_file() and p.name.lower().endswith((".tar.gz", ".tgz", ".tar"))  # data/metadata.py
        if not (table or release) and not (p.is_dir() and os.access(p, os.R_OK | os.X_OK)):
            problems.append(f"'data.source' must be a readable folder of images, a .csv/.parquet table or the "
                            f"released metadata (.tar.gz or a folder of JSON files) (or \"\" for the generated "
                            f"set); {source!r} is not")
    return problems


def complete(params: dict, model: BaseModel) -> dict:
    """``params`` (already validated into ``model``) with the schema's defaults for the keys it omits, recursively;
    a value the file writes is kept exactly as written (an int stays an int), so section hashes stay as they were."""
    out = dict(params)
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name not in params:
            out[name] = value.model_dump() if isinstance(value, BaseModel) else copy.deepcopy(value)
        elif isinstance(value, BaseModel) and isinstance(params[name], dict):
            out[name] = complete(params[name], value)
    return out


def _problems(err: ValidationError, prefix: tuple = ()) -> list[str]:
    return [_describe({**e, "loc": prefix + tuple(e["loc"])}) for e in err.errors(include_url=False)]


def validate(params: dict, source: str | os.PathLike = PARAMS_FILE, check_paths: bool = True) -> dict:
    """Check ``params`` against the schema (and, with ``check_paths``, that configured paths exist).

    Returns the complete params (:func:`complete`: schema defaults filled in); raises :class:`ParamsError` listing
    every problem, each naming ``source``.
    """
    problems: list[str] = []
    model = None
    try:
        model = Params.model_validate(params)
    except ValidationError as e:
        problems += _problems(e)
    if check_paths:
        problems += _path_problems(params)
    if problems:
        raise ParamsError(problems, source)
    return complete(params, model)


def load_validated(path: str | os.PathLike = PARAMS_FILE, check_paths: bool = True) -> dict:
    """The complete, validated params of ``path`` (:func:`validate`)."""
    return validate(load_params(path), path, check_paths)


def validated_section(params: dict, name: str, source: str | os.PathLike = PARAMS_FILE) -> dict:
    """One section of a params file that may hold only that section (e.g. ``ultraflux judge --params``), validated
    with the schema's model of that section and completed with its defaults; problems name ``source`` and
    ``<name>.<key>``. A missing section is the schema's defaults (an error where the section has required keys)."""
    raw = params.get(name, {})
    model_type = Params.model_fields[name].annotation
    if not isinstance(raw, dict):
        raise ParamsError(f"'{name}' must be a mapping of keys (got {raw!r})", source)
    try:
        return complete(raw, model_type.model_validate(raw))
    except ValidationError as e:
        raise ParamsError(_problems(e, (name,)), source) from None


def typed(params: dict | Params, source: str | os.PathLike = PARAMS_FILE) -> Params:
    """The typed :class:`~ultraflux.schema.Params` of a params dict, schema defaults filled in (raises
    :class:`ParamsError` naming ``source`` and every bad key); a ``Params`` is returned as it is."""
    if isinstance(params, Params):
        return params
    try:
        return Params.model_validate(params)
    except ValidationError as e:
        raise ParamsError(_problems(e), source) from None


def apply_profile(profile_path: str | os.PathLike, params_path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """Overwrite the keys named in ``profile_path`` inside ``params_path`` (comments kept). Returns changed keys.

    The result is validated with the schema before anything is written."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    params_path = Path(params_path)
    doc = rt.load(params_path.read_text())
    overlay = rt.load(Path(profile_path).read_text()) or {}  # round-trip load keeps "16:9" quoted
    changed: list[str] = []
    unknown: list[str] = []

    def merge(dst, src, prefix=""):
        for k, v in src.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v, key + ".")
            elif k not in dst:
                unknown.append(f"'{key}' does not exist in {params_path}")
            else:
                if dst[k] != v:
                    changed.append(key)
                _replace_comment(dst, src, k, f"set by {Path(profile_path).name}")
                dst[k] = v

    merge(doc, overlay)
    if unknown:
        raise ParamsError(unknown, profile_path)
    text = _dump(rt, doc)
    validate(parse_yaml(text), f"{params_path} + {profile_path}", check_paths=False)
    with atomic_path(params_path) as tmp:
        tmp.write_text(text)
    return changed


def _comment_lines(token) -> tuple[list[str], list[str]]:
    """A ruamel end-of-line comment token -> (its own lines, the lines after them that belong to what follows).
    Its own lines are the first and the comment lines aligned under it (continuations)."""
    first, *rest = token.value.split("\n")
    own = [first]
    while rest and rest[0].lstrip().startswith("#") and len(rest[0]) - len(rest[0].lstrip()) >= token.column - 2:
        own.append(rest.pop(0).strip())
    return own, rest


def _replace_comment(dst, src, key, fallback: str) -> None:
    """The end-of-line comment of ``dst[key]`` may describe the old value ("tiny profile: 15%"). It becomes the
    profile's own comment of that key; without one, a comment that speaks of the tiny profile becomes ``fallback``
    and any other stays (it documents the key). Lines that ruamel keeps in the same token but that belong to the next
    key or section stay in place."""
    old = (dst.ca.items.get(key) or [None] * 4)[2]
    new = (src.ca.items.get(key) or [None] * 4)[2] if hasattr(src, "ca") else None
    old_own, rest = _comment_lines(old) if old is not None else ([], [])
    if new is not None:
        text = _comment_lines(new)[0]
    elif any("tiny" in line for line in old_own):
        text = [f"# {fallback}"]
    else:
        return
    if old is None:
        dst.yaml_add_eol_comment(" ".join(t.lstrip("# ") for t in text), key)
        return
    pad = " " * old.column
    old.value = "\n".join([text[0], *(pad + t for t in text[1:]), *rest])


def _dump(rt, doc) -> str:
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()
