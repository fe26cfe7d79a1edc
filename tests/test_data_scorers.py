"""Learned-scorer plumbing without the multi-GB checkpoints: pyiqa's Q-Align and ArtiMuse's published interface are
replaced by recording fakes that check what our code hands them (local weights, input tensors, no download)."""
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import full_params
from ultraflux.data import scorers


def section(kind: str, **overrides) -> dict:
    """The complete ``curate.<kind>`` section of params.yaml with ``overrides`` (not re-validated: some tests hand
    the scorer what the schema would refuse)."""
    return {**full_params()["curate"][kind], **overrides}


def test_qalign_goes_through_pyiqa_with_local_weights(tmp_path, monkeypatch):
    weights = tmp_path / "one-align"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    seen = {}

    class FakeMetric:
        def __call__(self, x):
            import torch

            seen.setdefault("inputs", []).append((tuple(x.shape), x.dtype, float(x.min()), float(x.max())))
            return torch.tensor([[3.0 + float(x.mean())]])

    import transformers

    loads = []
    for cls in (transformers.AutoModelForCausalLM, transformers.CLIPImageProcessor):  # record, never load
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, name, *a, **kw: loads.append((c, name))))

    def create_metric(name, device="cuda"):
        # as pyiqa's Q-Align arch: both loaders asked for the hub id, with no path argument
        transformers.AutoModelForCausalLM.from_pretrained("q-future/one-align", trust_remote_code=True)
        transformers.CLIPImageProcessor.from_pretrained("q-future/one-align")
        transformers.CLIPImageProcessor.from_pretrained("openai/clip-vit-base-patch32")   # any other id: unchanged
        seen.update(name=name, device=device, cwd=os.getcwd(), offline=os.environ.get("HF_HUB_OFFLINE"))
        return FakeMetric()

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    monkeypatch.setattr(scorers, "pyiqa_available", lambda: True)
    cwd, offline = os.getcwd(), os.environ.get("HF_HUB_OFFLINE")
    scorer = scorers.make_scorer("quality", section("quality", weights=str(weights), batch_size=2))
    assert os.getcwd() == cwd == seen["cwd"] and os.environ.get("HF_HUB_OFFLINE") == offline  # nothing moved
    assert seen["name"] == "qalign" and seen["offline"] == "1"
    assert [name for _, name in loads] == [str(weights), str(weights), "openai/clip-vit-base-patch32"]
    transformers.CLIPImageProcessor.from_pretrained("q-future/one-align")   # after the block: no redirect
    assert loads[-1][1] == "q-future/one-align"
    assert scorer.name == "q-align(pyiqa):one-align" == scorers.scorer_name("quality",
                                                                            section("quality", weights=str(weights)))
    images = [np.full((20, 30, 3), 255, np.uint8), np.zeros((10, 10, 3), np.uint8)]
    assert scorer.score(images) == [4.0, 3.0]
    # as the public tool: one image per call, RGB float32 in [0, 1] (uint8 / 255), NCHW
    import torch

    assert seen["inputs"] == [((1, 3, 20, 30), torch.float32, 1.0, 1.0), ((1, 3, 10, 10), torch.float32, 0.0, 0.0)]


def test_artimuse_uses_the_repository_interface(tmp_path, monkeypatch):
    code = tmp_path / "src"
    pkg = code / "artimuse" / "internvl" / "model" / "internvl_chat"
    pkg.mkdir(parents=True)
    for folder in (code / "artimuse", code / "artimuse" / "internvl", code / "artimuse" / "internvl" / "model", pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "modeling_artimuse.py").write_text(
        "import internvl.model.internvl_chat  # ArtiMuse's own modules import internvl.… absolutely\n"
        "CALLS = []\n"
        "class InternVLChatModel:\n"
        "    @classmethod\n"
        "    def from_pretrained(cls, path, **kw):\n"
        "        CALLS.append(('load', path, sorted(kw)))\n"
        "        return cls()\n"
        "    def eval(self):\n"
        "        return self\n"
        "    def to(self, device):\n"
        "        return self\n"
        "    def score(self, device, tokenizer, pixel_values, generation_config):\n"
        "        CALLS.append(('score', tuple(pixel_values.shape), generation_config['do_sample']))\n"
        "        return 50.0 + float(pixel_values.float().mean())\n")
    weights = tmp_path / "ArtiMuse"
    weights.mkdir()
    tokenizer = types.SimpleNamespace(eos_token_id=2)
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, **kw: tokenizer if kw.get("use_fast") is False else None))
    path_before = list(sys.path)
    with pytest.raises(FileNotFoundError, match="curate.aesthetic.code_dir"):
        scorers.make_scorer("aesthetic", section("aesthetic", weights=str(weights), code_dir=""))
    scorer = scorers.make_scorer("aesthetic", section("aesthetic", weights=str(weights), code_dir=str(code)))
    out = scorer.score([np.full((64, 96, 3), 128, np.uint8)])
    from artimuse.internvl.model.internvl_chat import modeling_artimuse

    assert modeling_artimuse.CALLS[0][:2] == ("load", str(weights))
    assert modeling_artimuse.CALLS[1] == ("score", (1, 3, 448, 448), False)
    assert scorer.name == "artimuse:ArtiMuse" and len(out) == 1 and 49 < out[0] < 51  # ImageNet-normalised mid-grey
    assert sys.path == path_before   # imported from code_dir without editing sys.path
    for name in [m for m in sys.modules if m.split(".")[0] in ("artimuse", "internvl")]:
        sys.modules.pop(name)


def test_standins_are_named_and_resolution_independent():
    from data_fixtures import textured

    big = textured(2048, 1536, seed=2)
    small = scorers.small_copy(big)
    assert small.shape == (384, 512, 3)
    assert scorers.laplacian_sharpness(big) == scorers.laplacian_sharpness(small)
    assert scorers.hasler_colorfulness(big) == scorers.hasler_colorfulness(small)
    assert scorers.scorer_name("quality", section("quality")) == "standin:laplacian-sharpness"
    assert scorers.scorer_name("aesthetic", section("aesthetic", weights="")) == "standin:hasler-colorfulness"


def test_grayscale_photos_are_not_ranked_by_colourfulness(params):
    """Under the colourfulness stand-in a grayscale photo scores 0 and would always be low_aesthetic: it is marked
    as not scored (recorded in its scorer column) and passes the aesthetic filter; colour photos are still ranked."""
    import pandas as pd

    from ultraflux.config import typed
    from ultraflux.data import scorers
    from ultraflux.data.select import assign_reasons

    gray = np.repeat(np.random.default_rng(0).integers(0, 256, (64, 96, 1), dtype=np.uint8), 3, axis=2)
    assert scorers.hasler_colorfulness(gray) < scorers.GRAYSCALE_COLORFULNESS
    n = 10
    rows = pd.DataFrame({"id": [f"{i:02d}" for i in range(n)], "source": [f"s{i}" for i in range(n)],
                         "relative": [f"s{i}" for i in range(n)], "error": "", "caption_error": "",
                         "s_flat_fraction": 0.0, "entropy": 7.5, "quality": 5.0,
                         "aesthetic": [0.0, 0.2] + [10.0 + i for i in range(n - 2)],
                         "aesthetic_scorer": scorers.AESTHETIC_STANDIN})
    assert scorers.skip_grayscale(rows) == 2
    assert list(rows["aesthetic_scorer"][:2]) == [scorers.GRAYSCALE_SKIPPED] * 2 and rows["aesthetic"][:2].isna().all()
    assign_reasons(rows, typed(params).curate, "multiaspect", quality_learned=True)
    assert (rows["reason"][:2] == "").all()                                      # the two grayscale photos pass
    colour = rows.iloc[2:]
    assert (colour["reason"] == "").sum() == 3 and (colour["reason"] == "low_aesthetic").sum() == 5  # top 30% of 8
    learned = rows.assign(aesthetic_scorer="artimuse:ckpt", aesthetic=0.0)
    assert scorers.skip_grayscale(learned) == 0                                 # a learned scorer is left alone
