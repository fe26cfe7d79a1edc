"""`ultraflux generate` refuses bad input before any model loads (exit 2, one line per problem), and trained weights'
RoPE (ultraflux.json beside them) wins over a params.yaml that disagrees unless --rope-from params says otherwise."""
import json
import subprocess

import pytest

import ultraflux.sampling as sampling
from conftest import ROOT
from ultraflux.cli.generate import main
from ultraflux.config import load_params

PARAMS = str(ROOT / "params.yaml")


class Generated(Exception):
    """Raised by the stand-in for the model: the checks let the command through."""


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A transformer dir trained (per its ultraflux.json) with rope.train_len 16, a VAE dir; no model ever loads."""
    def stand_in(*args, **kwargs):
        raise Generated(kwargs.get("overrides"))
    monkeypatch.setattr(sampling, "generate_file", stand_in)
    tr, vae = tmp_path / "transformer", tmp_path / "vae"
    tr.mkdir()
    vae.mkdir()
    (tr / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    rope = {**load_params(PARAMS)["rope"], "train_len": 16}
    (tr / "ultraflux.json").write_text(json.dumps({"rope": rope}))
    return ["--transformer", str(tr), "--vae", str(vae), "--params", PARAMS]


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "--prompt is empty"),
    (["--size", "100000x100000"], "--size 100000x100000 is 10,000,000,000 px, above sample.max_pixels = 16,777,216"),
    (["--size", "4096x4128"], "above sample.max_pixels"),
    (["--out", "{tmp}/image"], "unknown image extension '(none)'; use one of .png, .jpg, .jpeg, .webp"),
    (["--out", "{tmp}/image.xyz"], "unknown image extension '.xyz'"),
    (["--out", "{tmp}"], "is a folder; name the image file"),
    (["--out", "{tmp}/transformer/config.json/x.png"], "is a file, not a folder"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--memory", "group", "--offload", "model"], "memory 'group' offloads the transformer itself"),
])
def test_bad_input_is_refused_before_any_model_loads(args, message, models, tmp_path, capsys):
    argv = ["--prompt", "a lighthouse", "--rope-from", "params", "--out", str(tmp_path / "ok.png"), *models]
    err = refused(argv + [a.format(tmp=tmp_path) for a in args], capsys)
    assert message in err


def test_read_only_output_folder(models, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (root ignores chmod)")
    try:
        err = refused(["--prompt", "x", "--rope-from", "params", "--out", str(ro / "a.png"), *models], capsys)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert f"--out output '{ro / 'a.png'}' cannot be written: {ro} is not writable" in err


def test_weights_rope_wins_over_a_disagreeing_params_yaml(models, tmp_path, capsys):
    argv = ["--prompt", "a lighthouse", "--out", str(tmp_path / "a.webp"), *models]
    err = refused(argv, capsys)
    assert "trained with another RoPE than params.yaml's (rope.train_len: weights 16, params.yaml 8)" in err
    assert "--rope-from params" in err
    with pytest.raises(Generated, match="'rope_from': 'params'"):   # the explicit override goes through
        main(argv + ["--rope-from", "params"])
