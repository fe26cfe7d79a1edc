"""Sampling: the diffusers-compatible pipeline, seeds, sizes, and the `ultraflux generate` CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ultraflux.data.buckets import bucket_table
from ultraflux.models.transformer import build_transformer
from ultraflux.models.vae import build_vae, spatial_factor
from ultraflux.pipelines import UltraFluxPipeline, load_pipeline
from ultraflux.sampling import generate
from conftest import ROOT


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from ultraflux.config import load_params

    params = load_params(ROOT / "params.yaml")
    root = tmp_path_factory.mktemp("models")
    build_transformer(params["model"], params["rope"], seed=0).save_pretrained(root / "transformer")
    build_vae(params["model"]).save_pretrained(root / "vae")
    return params, root


def test_pipeline_uses_f16_scale(model_dirs):
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    assert isinstance(pipe, UltraFluxPipeline)
    assert spatial_factor(pipe.vae) == 16 and pipe.vae_scale_factor == 16
    assert pipe.transformer.pos_embed.kind == params["rope"]["kind"]
    assert pipe.scheduler.config.shift == params["dit_stage2"]["shift"]
    assert not pipe.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("aspect", ["1:1", "2:1", "1:2.39"])
def test_same_seed_same_image_and_bucket_size(model_dirs, aspect):
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    w, h = bucket_table(params["curate"]["buckets"]["scale"])[aspect]
    a = generate(pipe, "a red boat", w, h, steps=2, guidance=4.0, seed=7)
    b = generate(pipe, "a red boat", w, h, steps=2, guidance=4.0, seed=7)
    c = generate(pipe, "a red boat", w, h, steps=2, guidance=4.0, seed=8)
    assert a.size == (w, h)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_generate_cli(model_dirs, tmp_path):
    params, root = model_dirs
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "ultraflux.cli", "generate", "--prompt", "a lighthouse", "--aspect",
                           "16:9", "--seed", "0", "--steps", "2", "--transformer", str(root / "transformer"),
                           "--vae", str(root / "vae"), "--params", str(ROOT / "params.yaml"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    from PIL import Image

    assert Image.open(out).size == (info["width"], info["height"]) == bucket_table(0.125)["16:9"]


def test_generate_cli_rejects_unknown_aspect(model_dirs, tmp_path):
    params, root = model_dirs
    proc = subprocess.run([sys.executable, "-m", "ultraflux.cli", "generate", "--prompt", "x", "--aspect", "5:7",
                           "--transformer", str(root / "transformer"), "--vae", str(root / "vae"),
                           "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "5:7" in proc.stderr and "bucket table" in proc.stderr
    assert not (tmp_path / "x.png").exists()
