"""Sampling: the diffusers-compatible pipeline, seeds, sizes, decode settings, offload, and `ultraflux generate`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ultraflux.data.buckets import bucket_table
from ultraflux.models.transformer import build_transformer, load_transformer
from ultraflux.models.vae import build_vae, spatial_factor
from ultraflux.pipelines import UltraFluxPipeline, load_pipeline
from ultraflux.sampling import generate, parse_size
from conftest import ROOT


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from ultraflux.config import load_params

    params = load_params(ROOT / "params.yaml")
    root = tmp_path_factory.mktemp("models")
    build_transformer(params["model"], params["rope"], seed=0).save_pretrained(root / "transformer")
    build_vae(params["model"]).save_pretrained(root / "vae")
    return params, root


@pytest.fixture(scope="module")
def release_dirs(model_dirs):
    """The same weights laid out as the official release saves them: transformer config with method/ntk_factor,
    VAE as the release's AutoencoderKL with stride 2."""
    from diffusers import AutoencoderKL

    from ultraflux.models.vae import tiny_config

    params, root = model_dirs
    rel = root / "UltraFlux-v1"
    tr = load_transformer(root / "transformer", params["rope"])
    tr.save_pretrained(rel / "transformer")
    cfg = json.loads((rel / "transformer" / "config.json").read_text())
    (rel / "transformer" / "config.json").write_text(json.dumps({**cfg, "method": "yarn", "ntk_factor": 1.0}))
    f16 = build_vae(params["model"])
    f8 = AutoencoderKL(**tiny_config(params["model"]["tiny"]["vae_block_out_channels"]))
    f8.load_state_dict(f16.state_dict())
    f8.save_pretrained(rel / "vae")
    cfg = json.loads((rel / "vae" / "config.json").read_text())
    (rel / "vae" / "config.json").write_text(json.dumps({**cfg, "stride": 2}))
    return rel


def test_pipeline_uses_f16_scale(model_dirs):
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    assert isinstance(pipe, UltraFluxPipeline)
    assert spatial_factor(pipe.vae) == 16 and pipe.vae_scale_factor == 16
    assert pipe.transformer.pos_embed.kind == params["rope"]["kind"]
    assert pipe.scheduler.config.shift == params["dit_stage2"]["shift"]
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.placement == {"device": "cpu", "dtype": "float32", "offload": "none", "memory": "none"}


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
    assert pipe.last_decode == {"tiled": False, "mode": "plain"}       # embedded sizes: below the tiling threshold


def _decoder_calls(pipe):
    calls = []
    pipe.vae.decoder.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    return calls


def test_vae_tiling_auto_above_the_pixel_threshold(model_dirs):
    params, root = model_dirs
    sample = {**params["sample"], "vae_tiling": "auto", "vae_tiling_min_pixels": 480 * 480, "vae_tile_size": 256}
    pipe = load_pipeline({**params, "sample": sample}, root / "transformer", root / "vae")
    calls = _decoder_calls(pipe)
    generate(pipe, "a red boat", 480, 480, steps=1, guidance=4.0, seed=0)      # = threshold: untiled
    assert pipe.last_decode["tiled"] is False and calls == [(30, 30)]
    calls.clear()
    tiled = generate(pipe, "a red boat", 704, 352, steps=1, guidance=4.0, seed=0)   # 2:1 bucket, more pixels
    # 22 x 44 latents, 16-latent tiles every 12: 2 x 4 decoder calls, none larger than a tile
    assert pipe.last_decode["tiled"] is True and len(calls) == 8 and max(h * w for h, w in calls) <= 16 * 16
    pipe.configure_decode(vae_tiling="off")
    calls.clear()
    untiled = generate(pipe, "a red boat", 704, 352, steps=1, guidance=4.0, seed=0)
    assert pipe.last_decode["tiled"] is False and calls == [(22, 44)]
    a, b = (np.asarray(x, dtype=np.float64) for x in (tiled, untiled))
    assert a.shape == b.shape == (352, 704, 3)
    assert np.abs(a - b).mean() < 0.25 * b.std()                        # same picture, per-tile statistics aside
    pipe.configure_decode(vae_tiling="on", tile_size=256)
    assert pipe.tiled_for(32, 32) and not load_pipeline(params, root / "transformer", root / "vae").tiled_for(
        4096, 1024)   # the embedded threshold: 2048^2 px
    with pytest.raises(ValueError, match="vae_tiling must be one of auto, on, off"):
        pipe.configure_decode(vae_tiling="yes")
    with pytest.raises(ValueError, match="vae_decode"):
        load_pipeline({**params, "sample": {**params["sample"], "vae_decode": "quad"}}, root / "transformer",
                      root / "vae")


def test_offload_on_cpu_runs_without_it(model_dirs, caplog):
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    ref = generate(pipe, "a red boat", 480, 480, steps=1, guidance=4.0, seed=3)
    for mode in ("model", "sequential"):
        with caplog.at_level("WARNING", logger="ultraflux.pipelines.pipeline_ultraflux"):
            sample = {**params["sample"], "offload": mode}
            off = load_pipeline({**params, "sample": sample}, root / "transformer", root / "vae")
        assert off.placement["offload"] == "none" and f"sample.offload={mode} needs an accelerator" in caplog.text
        assert np.array_equal(np.asarray(generate(off, "a red boat", 480, 480, steps=1, guidance=4.0, seed=3)),
                              np.asarray(ref))


def test_offload_calls_diffusers_on_an_accelerator(model_dirs, monkeypatch):
    """Wiring only (no GPU here): with a CUDA device, ``place`` hands over to diffusers' offload with that device."""
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae", place=False)
    seen = []
    monkeypatch.setattr(UltraFluxPipeline, "enable_model_cpu_offload",
                        lambda self, device: seen.append(("model", device)))
    monkeypatch.setattr(UltraFluxPipeline, "enable_sequential_cpu_offload",
                        lambda self, device: seen.append(("sequential", device)))
    monkeypatch.setattr(UltraFluxPipeline, "to", lambda self, *a, **k: seen.append(("to", k)) or self)
    assert pipe.place("model", device="cuda") == {"device": "cuda", "dtype": "bfloat16", "offload": "model",
                                                  "memory": "none"}
    assert pipe.place("sequential", dtype="float32", device="cuda")["offload"] == "sequential"
    assert seen == [("model", torch.device("cuda")), ("sequential", torch.device("cuda"))]
    assert pipe.transformer.dtype == torch.float32 and pipe.vae.dtype == torch.float32   # cast back by the 2nd call
    with pytest.raises(ValueError, match="offload must be one of none, model, sequential"):
        pipe.place("disk")
    pipe.place("model", device="cuda")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16


def test_replace_transformer_keeps_placement(model_dirs):
    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    other = load_transformer(root / "transformer", params["rope"])
    pipe.replace_transformer(other)
    assert pipe.transformer is other and pipe.placement["offload"] == "none"


def test_release_weights_decode_partitioned_by_default(model_dirs, release_dirs):
    params, root = model_dirs
    paper_rope = {**params["rope"], "train_len": 64}
    pipe = load_pipeline({**params, "rope": paper_rope}, release_dirs, release_dirs / "vae")
    official = generate(pipe, "a red boat", 480, 480, steps=1, guidance=4.0, seed=5)
    assert pipe.last_decode == {"tiled": False, "mode": "partitioned"} and pipe.transformer.pos_embed.train_len == 64
    pipe.configure_decode(vae_decode="plain")
    plain = generate(pipe, "a red boat", 480, 480, steps=1, guidance=4.0, seed=5)
    a, b = np.asarray(official).astype(int), np.asarray(plain).astype(int)
    assert np.abs(a[1:, 1:] - b[:-1, :-1]).max() <= 1                   # one-pixel shift (uint8 rounding)
    assert np.abs(a - b).max() > 1
    ours = load_pipeline({**params, "rope": paper_rope}, root / "transformer", root / "vae")
    generate(ours, "a red boat", 480, 480, steps=1, guidance=4.0, seed=5)
    assert ours.last_decode["mode"] == "plain"                           # this project's VAE format: plain


def test_parse_size():
    assert parse_size("4096x2048") == (4096, 2048)
    for bad in ("4096", "4096x2050", "0x64", "axb"):
        with pytest.raises(ValueError):
            parse_size(bad)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ultraflux.cli", "generate", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_generate_cli(model_dirs, tmp_path):
    params, root = model_dirs
    out = tmp_path / "img.png"
    proc = _cli("--prompt", "a lighthouse", "--aspect", "16:9", "--seed", "0", "--steps", "2", "--transformer",
                root / "transformer", "--vae", root / "vae", "--params", ROOT / "params.yaml", "--out", out,
                "--vae-tiling", "on", "--vae-decode", "partitioned", "--offload", "model", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    from PIL import Image

    assert Image.open(out).size == (info["width"], info["height"]) == bucket_table(0.125)["16:9"]
    assert (info["vae_tiled"], info["vae_decode"], info["offload"], info["device"]) == (True, "partitioned", "none",
                                                                                       "cpu")
    # it says which weights and RoPE it used
    assert info["transformer"] == str((root / "transformer").resolve()) and info["vae"] == str((root / "vae").resolve())
    assert info["rope"].startswith(params["rope"]["kind"])


def test_generate_cli_rejects_unknown_aspect(model_dirs, tmp_path):
    params, root = model_dirs
    proc = _cli("--prompt", "x", "--aspect", "5:7", "--transformer", root / "transformer", "--vae", root / "vae",
                "--params", ROOT / "params.yaml", "--out", tmp_path / "x.png", cwd=tmp_path)
    assert proc.returncode != 0 and "5:7" in proc.stderr and "bucket table" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_cli_official_weights_need_the_paper_rope(release_dirs, tmp_path):
    proc = _cli("--prompt", "x", "--transformer", release_dirs, "--vae", release_dirs / "vae", "--params",
                ROOT / "params.yaml", "--out", tmp_path / "x.png", cwd=tmp_path)
    assert proc.returncode != 0 and "rope.train_len must be 64 (got 8)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("memory", ["group", "fp8"])
def test_low_vram_transformer_gets_its_hooks_in_host_memory(model_dirs, monkeypatch, memory):
    """sample.memory's hooks are installed while the transformer is still in host memory, so the accelerator never
    holds all of its weights in sample.dtype (on a 24 GB card the bf16 transformer alone would not fit). The meta
    device stands in for the accelerator; the other components go there directly."""
    import ultraflux.pipelines.pipeline_ultraflux as pipeline_module

    params, root = model_dirs
    pipe = load_pipeline(params, root / "transformer", root / "vae")
    seen = []

    def hooks(transformer, mode, device, dtype):
        seen.append(({p.device.type for p in transformer.parameters()}, pipe.vae.device.type, str(device)))
        return mode
    monkeypatch.setattr(pipeline_module, "apply_memory_mode", hooks)
    placement = pipe.place(dtype="float32", device="meta", memory=memory)
    assert seen == [({"cpu"}, "meta", "meta")] and placement["memory"] == memory
    after = {p.device.type for p in pipe.transformer.parameters()}
    assert after == ({"cpu"} if memory == "group" else {"meta"})  # group offload onloads block by block
