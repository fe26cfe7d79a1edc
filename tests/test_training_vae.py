"""F16 VAE post-training recipe (seed Sec. 2.2, Table 3): gradient-flow traps, adversarial option, LPIPS guard,
held-out metrics, checkpoint/resume."""
import copy

import pytest
import torch

from conftest import ROOT
from training_fixtures import make_curated
from ultraflux.models.vae import build_vae
from ultraflux.training import vae as tv


@pytest.fixture(scope="module")
def base():
    from ultraflux.config import load_params

    p = load_params(ROOT / "params.yaml")
    p["vae_train"].update(resolution=64, batch_size=2, grad_accum=1, eval_every=2)
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


def test_train_vae_adversarial_resume_and_holdout_metrics(base, curated, tmp_path):
    p = copy.deepcopy(base)
    p["vae_train"].update(steps=4, adversarial=True, lambda_adv=0.05, checkpoint_every=2, keep_checkpoints=2)

    class Logger:
        def __init__(self):
            self.rows = []

        def log_metrics(self, m, step=None):
            self.rows.append((step, dict(m)))

        def set_tags(self, tags):
            self.tags = tags

    log = Logger()
    m = tv.train_vae(p, curated, tmp_path / "a", logger=log, progress=False, ckpt_dir=tmp_path / "a_ck")
    assert m["adversarial"] and m["perceptual"] == tv.PERCEPTUAL_STANDIN and log.tags["vae.perceptual"]
    assert m["num_holdout_images"] == 2 and m["holdout_psnr"] > 0 and 0 < m["holdout_ssim"] <= 1
    logged = {k for _, r in log.rows for k in r}
    assert {"loss", "loss_l2", "loss_perceptual", "loss_consistency", "loss_adv_g", "loss_disc", "lr",
            "holdout_psnr", "holdout_ssim"} <= logged
    assert [s for s, r in log.rows if "holdout_psnr" in r] == [0, 2, 4]     # before training, every eval_every
    weights = (tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    # "Killed" after step 2: the step-4 checkpoint and the output are gone; a re-run resumes and ends identically.
    import shutil

    shutil.rmtree(tmp_path / "a_ck" / "step-00000004")
    shutil.rmtree(tmp_path / "a" / "vae")
    tv.train_vae(p, curated, tmp_path / "a", progress=False, ckpt_dir=tmp_path / "a_ck")
    assert (tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
