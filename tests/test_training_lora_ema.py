"""EMA (training/ema.py) against a hand computation, and LoRA training of the tiny DiT (training/lora.py): only the
adapter changes, the held-out loss falls, an interrupted run resumes to the same bytes (trained, merged, adapter and
EMA weights), and the saved adapter loads with diffusers' ``load_lora_weights`` onto the base model."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ROOT
from training_fixtures import make_curated, save_vae, tiny_params

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
EMA = {"decay": 0.5, "every": 2, "start": 2, "use_for_validation": False}


def test_ema_follows_the_hand_computed_average_and_survives_a_state_dict_round_trip():
    from ultraflux.training.ema import ema_update, make_ema, swapped_in

    model = torch.nn.Linear(3, 2)
    cfg = {"decay": 0.9, "every": 2, "start": 3, "use_for_validation": True}
    ema = make_ema(cfg, model)
    pattern = torch.arange(8.0).view(2, 4)[:, :3]      # distinct values per element
    expected, updated = None, []
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.copy_(pattern * step)
        if ema_update(ema, cfg, step, model):
            updated.append(step)
            w = pattern * step   # first update copies, then ema <- 0.9 ema + 0.1 w
            expected = w.clone() if expected is None else 0.9 * expected + 0.1 * w
    assert updated == [3, 5, 7]
    with swapped_in(ema, model):
        torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-6, atol=0)   # fp32 rounding
    assert torch.equal(model.weight.detach(), pattern * 8)     # trained weights restored
    clone = make_ema(cfg, torch.nn.Linear(3, 2))
    clone.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(clone.shadow_params, ema.shadow_params))
    assert make_ema(None, model) is None and not ema_update(None, None, 3, model)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from ultraflux.config import load_params

    base = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("lora")
    make_curated(d / "curated")
    save_vae(base, d / "vae")
    return base, d


def _tensors_and_header(path):
    """Tensors and metadata (diffusers writes the LoRA header's entries in no fixed order: compared parsed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        return load_file(path), f.metadata()


class Interrupt(Exception):
    pass


def _train(base, d, name, on_batch=None, on_end=None):
    from ultraflux.training.dit import train_dit

    params = tiny_params(base, steps=6, batch_size=1, global_batch=1, checkpoint_every=3, keep_checkpoints=2,
                         val_every=6, lr=3e-3, lora=LORA, ema=EMA)
    params["validation"] = {**params["validation"], "prompts": []}
    return train_dit(params, "dit_stage1", d / "curated", d / "vae", d / name / "out", d / name / "ckpt",
                     d / "cache", progress=False, on_batch=on_batch, on_end=on_end), params


def test_ema_of_a_bf16_model_is_kept_in_float32():
    """Under DeepSpeed the model is bf16: an average kept in bf16 would never move at decay 0.999 (a 1e-3 step is
    below half a bf16 ulp of weights near 1), so the EMA stays frozen at its first copy."""
    from ultraflux.training.ema import ema_update, make_ema

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = make_ema({"decay": 0.999, "every": 1, "start": 1, "use_for_validation": False}, model)
    assert ema_update(ema, {"decay": 0.999, "every": 1, "start": 1}, 1, model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema_update(ema, {"decay": 0.999, "every": 1, "start": 1}, 2, model)
    assert ema.shadow_params[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow_params[0], torch.full((4, 4), 1.001), rtol=0, atol=1e-6)


def test_lora_trains_only_the_adapter_lowers_val_loss_and_resumes_identically(tiny_set):
    import pandas as pd
    from diffusers import FluxPipeline

    from ultraflux.models.transformer import build_transformer, load_transformer

    base, d = tiny_set
    final = {}
    _, params = _train(base, d, "ref", on_end=lambda rank, model: final.update(model.state_dict()))
    init = build_transformer(params["model"], params["rope"], seed=params["seed"]).state_dict()
    for k, v in final.items():
        plain = k.replace(".base_layer.", ".")
        if ".lora_" in k:
            continue
        assert torch.equal(v, init[plain]), f"{k} changed: only the adapter may train"
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in final.items())   # the adapter did train
    val = pd.read_csv(d / "ref/out/val_loss.csv")
    assert val["val_loss"].iloc[-1] < val["val_loss"].iloc[0], val

    def stop_at_4(step, micro, rank, indices):   # after the step-3 checkpoint
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(base, d, "resumed", on_batch=stop_at_4)
    assert not (d / "resumed/out/transformer").exists()
    _train(base, d, "resumed")
    for f in ("diffusion_pytorch_model.safetensors", "lora/pytorch_lora_weights.safetensors",
              "ema/diffusion_pytorch_model.safetensors", "ema/lora/pytorch_lora_weights.safetensors"):
        a, b = (_tensors_and_header(d / run / "out/transformer" / f) for run in ("ref", "resumed"))
        assert a[1] == b[1] and a[0].keys() == b[0].keys(), f
        assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]), f"{f} differs after resume"

    merged = load_transformer(d / "ref/out/transformer", params["rope"]).eval()
    base_model = build_transformer(params["model"], params["rope"], seed=params["seed"]).eval()
    FluxPipeline(None, None, None, None, None, None, base_model).load_lora_weights(
        str(d / "ref/out/transformer/lora"))
    g = torch.Generator().manual_seed(0)
    t = params["model"]["tiny"]
    kw = dict(hidden_states=torch.randn(1, 4, 64, generator=g),
              encoder_hidden_states=torch.randn(1, 3, t["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(1, t["pooled_projection_dim"], generator=g),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
              guidance=torch.tensor([3.5]) if t["guidance_embeds"] else None)
    with torch.no_grad():
        torch.testing.assert_close(base_model(**kw).sample, merged(**kw).sample, rtol=1e-4, atol=1e-5)


def test_sample_weights_ema_needs_the_ema_directories(params, tmp_path, monkeypatch):
    from ultraflux.sampling import ema_problems, trained_transformer

    monkeypatch.chdir(tmp_path)
    p = {**params, "sample": {**params["sample"], "weights": "ema"}}
    problems = ema_problems(p)
    assert len(problems) == 2 and "set dit_stage2.ema" in problems[0]
    for stage in ("dit_stage1", "dit_stage2"):
        (tmp_path / "outputs" / stage / "transformer" / "ema").mkdir(parents=True)
        (tmp_path / "outputs" / stage / "transformer" / "ema" / "config.json").write_text("{}")
    assert ema_problems(p) == [] and ema_problems(params) == []
    assert trained_transformer("outputs/dit_stage1", "raw") == trained_transformer("outputs/dit_stage1", "ema").parent
