"""F16 VAE post-training recipe (seed Sec. 2.2, Table 3): gradient-flow traps, adversarial option, LPIPS guard,
held-out metrics, streamed deterministic crops, checkpoint/resume after SIGKILL (accelerate save_state)."""
import copy
import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import ROOT
from test_training_resume import ENV, WORKER, published
from training_fixtures import make_curated
from ultraflux.models.vae import build_vae
from ultraflux.training import vae as tv


@pytest.fixture(scope="module")
def base():
    from ultraflux.config import load_params

    p = load_params(ROOT / "params.yaml")
    p["vae_train"].update(resolution=64, batch_size=2, global_batch=2, eval_every=2)
    return p


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return make_curated(tmp_path_factory.mktemp("vae") / "curated", counts={"1:1": 4, "2:1": 2}, holdout=2)


def _decoder_setup(base):
    vae = build_vae(base["model"])
    vae.encoder.requires_grad_(False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    return vae, x, vae.decode(z).sample


def _decoder_grads(vae):
    return [p.grad for p in vae.decoder.parameters()]


def test_discriminator_step_does_not_reach_the_decoder(base):
    vae, x, recon = _decoder_setup(base)
    disc = tv.PatchDiscriminator(width=8)
    tv.discriminator_loss(disc, x, recon).backward()
    assert all(g is None for g in _decoder_grads(vae)), "the discriminator loss back-propagated into the decoder"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_generator_adv_term_trains_decoder_not_discriminator(base):
    vae, x, recon = _decoder_setup(base)
    disc = tv.PatchDiscriminator(width=8).requires_grad_(False)
    tv.generator_adv_loss(disc, recon).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert sum(float(g.abs().sum()) for g in _decoder_grads(vae) if g is not None) > 0


class FakeLPIPS(torch.nn.Module):
    """LPIPS-shaped stand-in (frozen conv features, mean squared feature distance) to test the gradient path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.requires_grad_(False).eval()

    def forward(self, a, b):
        return (self.conv(a) - self.conv(b)).square().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("model", [None, FakeLPIPS()], ids=["standin-1-ssim", "lpips-shaped"])
def test_perceptual_term_gives_decoder_gradients(base, model):
    vae, x, recon = _decoder_setup(base)
    tv.perceptual_loss(recon, x, model).backward()
    total = sum(float(g.abs().sum()) for g in _decoder_grads(vae) if g is not None)
    assert total > 0, "perceptual term produced no decoder gradient (computed under no_grad?)"


def test_lpips_weights_guarded_with_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="vgg16-397923af.pth"):
        tv.load_lpips(tmp_path)
    (tmp_path / tv.LPIPS_BACKBONE_FILE).write_bytes(b"")
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="lpips.*cannot be imported"):
            tv.load_lpips(tmp_path)


def test_crops_are_deterministic_by_seed_and_inside_the_image():
    sizes = [(64, 64), (128, 64), (40, 30)]          # the last one is smaller than the crop: upscaled first
    a, b = tv.CropSampler(sizes, 4, 48, seed=0), tv.CropSampler(sizes, 4, 48, seed=0)
    assert [a.batch(n) for n in range(20)] == [b.batch(n) for n in range(20)]
    assert [a.batch(n) for n in range(20)] != [tv.CropSampler(sizes, 4, 48, seed=1).batch(n) for n in range(20)]
    crops = [c for n in range(50) for c in a.batch(n)]
    assert {r for r, _, _ in crops} == {0, 1, 2}
    for r, top, left in crops:
        w, h = sizes[r]
        assert 0 <= top <= max(h, 48) - 48 and 0 <= left <= max(w, 48) - 48
        assert tv.crop(torch.zeros(3, h, w), top, left, 48).shape == (3, 48, 48)
    a.seek(7)
    assert next(iter(a)) == b.batch(7)


class Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, m, step=None):
        self.rows.append((step, dict(m)))

    def set_tags(self, tags):
        self.tags = tags


def test_train_vae_streams_images_and_logs_holdout_metrics(base, curated, tmp_path, monkeypatch):
    p = copy.deepcopy(base)
    p["vae_train"].update(steps=4, adversarial=True, lambda_adv=0.05, checkpoint_every=2, keep_checkpoints=2,
                          num_workers=0)
    reads = []
    real_load = tv.load_image_tensor
    monkeypatch.setattr(tv, "load_image_tensor", lambda root, row: reads.append(row["id"]) or real_load(root, row))
    log = Logger()
    m = tv.train_vae(p, curated, tmp_path / "a", logger=log, progress=False, ckpt_dir=tmp_path / "a_ck")
    assert m["adversarial"] and m["perceptual"] == tv.PERCEPTUAL_STANDIN and log.tags["vae.perceptual"]
    assert m["num_holdout_images"] == 2 and m["holdout_psnr"] > 0 and 0 < m["holdout_ssim"] <= 1
    logged = {k for _, r in log.rows for k in r}
    assert {"loss", "loss_l2", "loss_perceptual", "loss_consistency", "loss_adv_g", "loss_disc", "lr",
            "holdout_psnr", "holdout_ssim"} <= logged
    assert [s for s, r in log.rows if "holdout_psnr" in r] == [0, 2, 4]     # before training, every eval_every
    # Streamed: one image read per crop (4 steps x 1 micro-batch x 2 crops) and per held-out evaluation (2 images
    # x [before, step 2, step 4, final]); nothing is loaded up front.
    assert len(reads) == 4 * 2 + 2 * 4


def test_train_vae_sigkill_then_rerun_gives_identical_weights(base, curated, tmp_path):
    p = copy.deepcopy(base)
    p["vae_train"].update(steps=6, adversarial=True, lambda_adv=0.05, checkpoint_every=2, keep_checkpoints=2,
                          num_workers=1)

    def job(name, **kw):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"kind": "vae", "params": p, "curated": str(curated),
                                    "out": str(tmp_path / name / "out"), "ckpt": str(tmp_path / name / "ckpt"), **kw}))
        return [sys.executable, str(WORKER), str(path)]

    ref = subprocess.Popen(job("ref"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(job("victim", sleep=1.0), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    ckpt = tmp_path / "victim" / "ckpt"
    deadline = time.monotonic() + 240
    while not published(ckpt) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, f"run ended before it could be killed:\n{victim.stdout.read()[-3000:]}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = published(ckpt)[-1]
    assert 0 < killed_at < 6 and not (tmp_path / "victim" / "out" / "vae").exists()
    rerun = subprocess.run(job("victim"), env=ENV, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"vae: resumed from {ckpt}/step-{killed_at:08d} at step {killed_at}" in rerun.stdout
    out, _ = ref.communicate(timeout=400)
    assert ref.returncode == 0, out[-3000:]
    weights = "out/vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "ref" / weights).read_bytes() == (tmp_path / "victim" / weights).read_bytes()
    a, b = pd.read_csv(tmp_path / "ref/out/loss.csv"), pd.read_csv(tmp_path / "victim/out/loss.csv")
    assert list(a["step"]) == list(range(1, 7))            # the loss history survives the kill (timing aside)
    assert a.drop(columns="images_per_s").equals(b.drop(columns="images_per_s"))
