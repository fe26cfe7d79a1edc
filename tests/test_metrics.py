"""Weight-free metrics (Diffusion-4K GLCM score, JPEG-q95 compression ratio) and honest 'not computed' entries."""
import numpy as np
import torch
import pytest
from PIL import Image

from ultraflux.evaluation.metrics import compression_ratio, generation_metrics, glcm_score


def test_glcm_score_flat_vs_textured():
    flat = Image.new("RGB", (128, 128), (90, 90, 90))
    # A flat patch has one non-zero GLCM cell per (distance, angle): the value histogram has two values.
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    assert glcm_score(noisy) > glcm_score(flat) >= 0


def test_glcm_score_hand_computed_for_a_flat_patch():
    # 64x64 constant patch, 64 levels, 4 distances x 4 angles, normed: each (d, a) slice has one cell equal to 1 and
    # 4095 zeros; the whole 64x64x4x4 array has 16 ones and 65520 zeros -> entropy of (16, 65520) counts in bits.
    p1 = 16 / (64 * 64 * 16)
    expected = -(p1 * np.log2(p1) + (1 - p1) * np.log2(1 - p1))
    assert glcm_score(Image.new("L", (64, 64), 200)) == pytest.approx(expected)


def test_compression_ratio_orders_detail():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    flat = Image.new("RGB", (256, 256), (10, 200, 30))
    assert compression_ratio(flat) > 10 * compression_ratio(noisy)
    assert 0.5 < compression_ratio(noisy) < 3  # q95 JPEG barely compresses noise


def test_learned_metrics_are_reported_not_invented(params):
    out = generation_metrics([Image.new("RGB", (64, 64))], params)
    for key, param in (("fid", "fid_inception_weights"), ("hpsv3", "hpsv3_weights"),
                       ("artimuse", "artimuse_weights"), ("qalign", "qalign_weights")):
        assert out[key] == f"not computed (no weights at evaluate.{param})"


def test_frechet_distance_properties():
    from ultraflux.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-4)
    shifted = a + np.array([3.0, 0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-3)  # mean term only: |mu_a - mu_b|^2
    wider = a * 2
    # Tr(S + 4S - 2*2S) = Tr(S) ~= 4 for unit variance in 4 dims.
    assert frechet_distance(a, wider) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-2)


def test_standins_are_named_and_fd_needs_real(params):
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    no_ref = generation_metrics(imgs, params)
    assert "standin_fd_thumb8" not in no_ref and no_ref["standin_sharpness"] > 0
    with_ref = generation_metrics(imgs, params, real=[Image.new("RGB", (64, 64), (200, 10, 10))] * 2)
    assert with_ref["standin_fd_thumb8"] > 0.1


def test_configured_qalign_weights_use_the_curation_scorer(params, monkeypatch, tmp_path):
    """With evaluate.qalign_weights set, the Q-Align scorer of ultraflux.data.scorers is loaded from that folder."""
    from ultraflux.data import scorers

    loaded = {}

    class FakeQAlign(scorers.Scorer):
        def __init__(self, weights, batch_size=8):
            loaded["weights"] = weights

        def score(self, images):
            return [4.5 for _ in images]

    monkeypatch.setattr(scorers, "QAlignScorer", FakeQAlign)
    cfg = {**params, "evaluate": {**params["evaluate"], "qalign_weights": str(tmp_path)}}
    out = generation_metrics([Image.new("RGB", (32, 32))] * 2, cfg)
    assert loaded["weights"] == str(tmp_path) and out["qalign"] == 4.5
    assert out["hpsv3"].startswith("not computed")


def test_hpsv3_with_weights_scores_images_against_their_prompts(params, monkeypatch, tmp_path):
    import sys
    import types

    seen = {}

    class FakeInferencer:
        def __init__(self, checkpoint_path=None, device="cpu", **kw):
            seen["ckpt"] = checkpoint_path

        def reward(self, prompts, image_paths):
            seen["pairs"] = list(zip(image_paths, prompts))
            return [[10.0, 1.0], [8.0, 1.0]]

    monkeypatch.setitem(sys.modules, "hpsv3", types.SimpleNamespace(HPSv3RewardInferencer=FakeInferencer))
    cfg = {**params, "evaluate": {**params["evaluate"], "hpsv3_weights": str(tmp_path)}}
    out = generation_metrics([Image.new("RGB", (32, 32))] * 2, cfg, paths=["0.png", "1.png"], prompts=["a", "b"])
    assert out["hpsv3"] == 9.0 and seen == {"ckpt": str(tmp_path), "pairs": [("0.png", "a"), ("1.png", "b")]}


def test_hpsv3_weights_without_the_package_say_so(params, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "hpsv3", None)  # import fails
    cfg = {**params, "evaluate": {**params["evaluate"], "hpsv3_weights": str(tmp_path)}}
    out = generation_metrics([Image.new("RGB", (32, 32))], cfg, paths=["0.png"], prompts=["a"])
    assert out["hpsv3"].startswith("not computed (hpsv3 package not installed")


def test_reconstruction_learned_metrics_name_what_is_missing_or_failed(tmp_path, params):
    """rFID and LPIPS with their weights set say what failed (never the 'no weights' text); unset, they name the key."""
    from ultraflux.evaluation.metrics import ReconstructionLearned

    unset = ReconstructionLearned(params["evaluate"]).result()
    assert unset == {"rfid": "not computed (no weights at evaluate.fid_inception_weights)",
                     "lpips": "not computed (no weights at evaluate.lpips_weights)"}
    cfg = {**params["evaluate"], "lpips_weights": str(tmp_path), "fid_inception_weights": str(tmp_path / "inc.pth")}
    learned = ReconstructionLearned(cfg)
    x = torch.rand(3, 64, 64) * 2 - 1
    learned.update(x, x.clone())
    got = learned.result()
    assert "evaluate.lpips_weights" in got["lpips"] and "vgg16-397923af.pth" in got["lpips"]
    assert isinstance(got["rfid"], float) or ("no weights at" not in got["rfid"] and got["rfid"].startswith(
        "not computed")), got


def test_artimuse_in_evaluate_names_its_own_code_dir_key(params):
    from ultraflux.config import validate

    bad = {**params, "evaluate": {**params["evaluate"], "artimuse_weights": "/models/artimuse"}}
    with pytest.raises(Exception, match="evaluate.artimuse_code_dir"):
        validate(bad, "params.yaml", check_paths=False)
