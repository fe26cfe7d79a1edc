"""Every default lives in the schema (ultraflux/schema.py) and params.yaml, nowhere else (issue 20, item 1).

The library receives complete, validated params (``ultraflux.config.validate`` fills in the schema's defaults), so
it indexes keys directly. A fallback written next to a read, ``cfg.get("steps", 100)``, is a second default that
drifts from the schema's (``stage2_top`` 0.05 vs 0.15, ``checkpoint_every`` 100 vs 10 did): this test finds them in
``ultraflux/`` and ``stages/`` by reading the code (AST), with no module imported.

And every command that reads a params file refuses one with a typo key, naming the file and the key, before any work.
"""
from __future__ import annotations

import ast
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import ROOT
from ultraflux.schema import Params

SCANNED = ("ultraflux", "stages")

# (file, key): reads of a params key NAME from something that is not params. Keep it short; say why.
ALLOWED = {
    ("ultraflux/data/process.py", "entropy"): "a curation cache record (JSON written by process_one), not params",
    ("ultraflux/ablation/dvc_queue.py", "data"): "`dvc exp show --json`: DVC's own 'data' field, not params.data",
}


def _models(annotation) -> list[type[BaseModel]]:
    """The schema models inside a field's annotation (``Optional[Ema]`` -> [Ema])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [m for a in typing.get_args(annotation) for m in _models(a)]
    return []


def params_key_names(model: type[BaseModel] = Params) -> set[str]:
    """Every key name at any level of params.yaml (sections, their keys, the keys of optional sections)."""
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for sub in _models(field.annotation):
            names |= params_key_names(sub)
    return names


KEYS = params_key_names()


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def fallbacks(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, key, what) for each ``x.get("<key>", default)``, ``getattr(x, "<key>", default)`` and module-level
    ``*DEFAULTS*`` dict in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "get" and len(node.args) + len(node.keywords) >= 2:
                key = _literal(node.args[0]) if node.args else None
                if key in KEYS:
                    found.append((node.lineno, key, f".get({key!r}, <default>)"))
            if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) == 3:
                key = _literal(node.args[1])
                if key in KEYS:
                    found.append((node.lineno, key, f"getattr(..., {key!r}, <default>)"))
    for node in getattr(tree, "body", []):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        for t in targets:
            if isinstance(t, ast.Name) and "DEFAULTS" in t.id.upper():
                found.append((node.lineno, t.id, f"module-level {t.id}"))
    return found


def library_files() -> list[Path]:
    return [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]


def test_no_params_read_has_a_fallback_default():
    problems = []
    for path in library_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, key, what in fallbacks(ast.parse(path.read_text(), str(path))):
            if (rel, key) not in ALLOWED:
                problems.append(f"{rel}:{line}: {what} (a second default for a params key: put it in "
                                "ultraflux/schema.py / params.yaml and index the validated params)")
    assert not problems, "\n".join(problems)


def test_the_scan_finds_each_kind_of_fallback():
    code = ('DEFAULTS = {"steps": 1}\nLOSS_DEFAULTS: dict = {}\n'
            'def f(cfg, x):\n    return cfg.get("stage2_top", 0.05), getattr(x, "checkpoint_every", 100), '
            'cfg.get("not_a_params_key", 1), cfg["steps"], getattr(x, "steps"), cfg.get("lr")\n')
    assert sorted(what for _, _, what in fallbacks(ast.parse(code))) == [
        ".get('stage2_top', <default>)", "getattr(..., 'checkpoint_every', <default>)", "module-level DEFAULTS",
        "module-level LOSS_DEFAULTS"]
    assert {"stage2_top", "checkpoint_every", "decay", "rank", "experiment"} <= KEYS   # nested and optional sections


def test_allowlist_entries_are_still_needed():
    """An allowlist entry whose read is gone must go too (the list only shrinks)."""
    hits = {(p.relative_to(ROOT).as_posix(), key) for p in library_files()
            for _, key, _ in fallbacks(ast.parse(p.read_text()))}
    assert set(ALLOWED) <= hits


def test_validation_returns_complete_params(tmp_path):
    """What stages and commands pass to the library: every schema key, defaults filled, written values as written."""
    from ultraflux.config import load_params, validate

    raw = load_params(ROOT / "params.yaml")
    del raw["curate"]["gray"], raw["curate"]["flat"]["patch"]
    assert "api_version" not in raw["judge"]   # params.yaml leaves it to the schema
    full = validate(raw, check_paths=False)
    assert full["curate"]["gray"] == "opencv" and full["curate"]["flat"]["patch"] == 240   # schema defaults
    assert full["judge"]["api_version"] == "v1beta" and full["refiner"]["include_output_format"] is True
    assert full["rope"] == raw["rope"] and type(full["rope"]["theta"]) is int   # as written: section hashes stay
    assert "gray" not in raw["curate"] and "api_version" not in raw["judge"]   # the caller's dict is not modified


# ------------------------------------------------------------------------------------ commands refuse a typo key
def _typo_params(tmp_path: Path) -> Path:
    text = (ROOT / "params.yaml").read_text()
    assert text.count("\n  model: gemini-2.5-flash") == 1   # judge.model
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("\n  model: gemini-2.5-flash", "\n  modle: gemini-2.5-flash"))
    return bad


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "a cat", "--transformer", "{missing}", "--vae", "{missing}", "--out", "{out}"],
    ["judge", "{dir}", "{dir}", "--prompts", "{prompts}"],
    ["plan", "--gpus", "1"],
    ["params", "check"],
    ["curate-stats", "{image}"],
    ["ablation", "--repo", "{repo}", "--no-mlflow"],
], ids=lambda c: c[0])
def test_each_params_reading_command_refuses_a_typo_key(tmp_path, monkeypatch, capsys, command):
    from ultraflux.cli import main

    bad = _typo_params(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"image": "0.png", "prompt": "a cat"}\n')
    (tmp_path / "image.png").write_bytes(b"not read")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(bad.read_text())
    fill = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out.png"), "dir": str(tmp_path),
            "prompts": str(tmp_path / "prompts.jsonl"), "image": str(tmp_path / "image.png"), "repo": str(repo)}
    args = [a.format(**fill) for a in command]
    if command[0] != "ablation":   # ablation reads <repo>/params.yaml
        args += ["--params", str(bad)]
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:   # argparse's error() (generate)
        code = e.code
    assert code == 2
    where = repo / "params.yaml" if command[0] == "ablation" else bad
    assert f"{where}: 'judge.modle' is not a known key (did you mean 'judge.model'?)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "prompts.jsonl", "repo", "typo.yaml"]
    assert [p.name for p in repo.iterdir()] == ["params.yaml"]   # nothing done


def test_report_compares_like_with_like(tmp_path, monkeypatch):
    """The report's 'differs from the commit' table: schema defaults filled on both sides, so a key that params.yaml
    leaves to the schema (judge.api_version) is no difference, while a real edit is one."""
    import subprocess

    from ultraflux.config import load_validated
    from ultraflux.report import committed_params, params_diff

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "p"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    now = load_validated("params.yaml", check_paths=False)
    assert params_diff(now, committed_params()) == []
    edited = {**now, "judge": {**now["judge"], "api_version": "v1"}}
    assert params_diff(edited, committed_params()) == [
        {"param": "judge.api_version", "committed": "v1beta", "this run": "v1"}]
