"""Low-VRAM modes (ultraflux.pipelines.memory) on the CPU: fp8 layerwise casting gives the default's image within a
stated tolerance; the group-offload modes need an accelerator, say so and fall back; on an accelerator the wiring
hands over to diffusers' hooks."""
import numpy as np
import pytest
import torch

from conftest import ROOT
from ultraflux.models.transformer import build_transformer
from ultraflux.models.vae import build_vae
from ultraflux.pipelines import load_pipeline
from ultraflux.pipelines.memory import apply_memory_mode
from ultraflux.sampling import generate

SIZE, STEPS = 256, 2
MIN_PSNR_DB = 30.0   # stated tolerance of fp8 storage vs fp32 weights, same seed (tiny model, 8-bit images)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ultraflux.config import load_params

    params = load_params(ROOT / "params.yaml")
    root = tmp_path_factory.mktemp("mem")
    build_transformer(params["model"], params["rope"], seed=0).save_pretrained(root / "transformer")
    build_vae(params["model"]).save_pretrained(root / "vae")
    ref = generate(load_pipeline(params, root / "transformer", root / "vae"), "a red boat", SIZE, SIZE, STEPS, 4.0, 3)
    return params, root, np.asarray(ref).astype(np.float64)


def _image(params, root, mode):
    pipe = load_pipeline({**params, "sample": {**params["sample"], "memory": mode}}, root / "transformer", root / "vae")
    return pipe, np.asarray(generate(pipe, "a red boat", SIZE, SIZE, STEPS, 4.0, 3)).astype(np.float64)


def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_fp8_storage_within_tolerance_of_full_precision(setup):
    params, root, ref = setup
    pipe, img = _image(params, root, "fp8")
    assert pipe.placement["memory"] == "fp8"
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert 0 < np.abs(img - ref).max() and psnr(img, ref) >= MIN_PSNR_DB, psnr(img, ref)


@pytest.mark.parametrize("mode,effective", [("group", "none"), ("group_fp8", "fp8")])
def test_group_offload_on_cpu_says_so_and_falls_back(setup, caplog, mode, effective):
    params, root, ref = setup
    with caplog.at_level("WARNING", logger="ultraflux.pipelines.memory"):
        pipe, img = _image(params, root, mode)
    assert pipe.placement["memory"] == effective and f"sample.memory={mode} needs an accelerator" in caplog.text
    if effective == "none":
        assert np.array_equal(img, ref)


def test_group_offload_hands_over_to_diffusers_on_an_accelerator(setup, monkeypatch):
    params, root, _ = setup
    model = build_transformer(params["model"], params["rope"])
    seen = []
    monkeypatch.setattr(type(model), "enable_group_offload", lambda self, **kw: seen.append(kw))
    assert apply_memory_mode(model, "group_fp8", torch.device("cuda"), torch.bfloat16) == "group_fp8"
    assert seen[0]["onload_device"] == torch.device("cuda") and seen[0]["offload_type"] == "block_level"
    with pytest.raises(ValueError, match="memory mode must be one of"):
        apply_memory_mode(model, "disk", torch.device("cpu"), torch.float32)


def test_group_memory_and_model_offload_are_exclusive(params):
    from ultraflux.config import ParamsError, validate

    bad = {**params, "sample": {**params["sample"], "memory": "group", "offload": "model"}}
    with pytest.raises(ParamsError, match="sample"):
        validate(bad, "params.yaml")
