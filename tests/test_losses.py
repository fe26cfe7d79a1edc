"""Haar DWT and the DiT objectives (seed Sec. 4, Table 3 "DiT objective")."""
import numpy as np
import pytest
import pywt
import torch

from ultraflux.losses import (dit_loss, flow_snr, haar_dwt2, haar_idwt2, huber_c, min_snr_weight, pseudo_huber,
                              wavelet_bands)

CFG = {"wavelet": "haar", "levels": 1, "c_min": 0.2, "c_max": 1.0, "min_snr_gamma": 5.0}


@pytest.mark.parametrize("shape", [(2, 3, 6, 10), (4, 8), (1, 5, 7), (3, 9, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_haar_matches_pywt(shape, dtype):
    x = torch.randn(*shape, dtype=torch.float64)
    ours = haar_dwt2(x.to(dtype))
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for o, r in zip(ours, (ca, ch, cv, cd)):
        assert o.shape == r.shape
        np.testing.assert_allclose(o.double().numpy(), r, atol=tol)
    rec = haar_idwt2(*ours)
    np.testing.assert_allclose(rec.double().numpy(), pywt.idwt2((ca, (ch, cv, cd)), "haar"), atol=tol)
    assert torch.allclose(rec[..., : shape[-2], : shape[-1]].double(), x, atol=tol)   # perfect reconstruction


def test_haar_orthonormal_and_named():
    x = torch.randn(3, 16, 8, 12, dtype=torch.float64)
    bands = haar_dwt2(x)
    assert torch.allclose(sum((b ** 2).sum() for b in bands), (x ** 2).sum())       # Parseval
    # LH = high-pass along height (horizontal edge), HL = high-pass along width
    rows = torch.zeros(8, 8, dtype=torch.float64)
    rows[::2] = 1.0                                                                   # varies along height only
    ll, lh, hl, hh = haar_dwt2(rows)
    assert lh.abs().sum() > 0 and hl.abs().sum() == 0 and hh.abs().sum() == 0


def test_haar_differentiable():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_dwt2(t), (x,))
    bands = tuple(torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(haar_idwt2, bands)


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 16, 8, 6, generator=g)
    noise = torch.randn(b, 16, 8, 6, generator=g)
    pred = torch.randn(b, 16, 8, 6, generator=g)
    sig = torch.linspace(0.05, 1.0, b)
    return pred, noise, x0, sig


def test_l2_is_velocity_mse():
    pred, noise, x0, sig = _batch()
    loss, logs = dit_loss(pred, noise, x0, sig, "l2", CFG)
    assert loss.item() == pytest.approx(((pred - (noise - x0)) ** 2).mean().item(), rel=1e-6)
    assert logs["loss_l2"] == pytest.approx(loss.item())


def test_large_c_limit_is_sigma2_weighted_velocity_mse():
    """Orthonormal DWT + equal band weights + c -> inf: the objective is the x0-space MSE (Parseval)."""
    pred, noise, x0, sig = _batch()
    dv2 = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    big = {**CFG, "c_min": 1e6, "c_max": 1e6}
    loss, _ = dit_loss(pred, noise, x0, sig, "ultraflux", {**big, "min_snr_gamma": None})
    assert loss.item() == pytest.approx((sig ** 2 * dv2).mean().item(), rel=1e-5)
    # and the x0-space form itself: DWT(x0_hat) vs DWT(x0) with x_t = (1-s) x0 + s n, x0_hat = x_t - s v_hat
    s = sig.view(-1, 1, 1, 1)
    x0_hat = (1 - s) * x0 + s * noise - s * pred
    assert loss.item() == pytest.approx(((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)).mean().item(), rel=1e-5)
    # with Min-SNR: min((1 - s)^2, gamma s^2) * velocity MSE
    loss_g, _ = dit_loss(pred, noise, x0, sig, "ultraflux", big)
    w = torch.minimum((1 - sig) ** 2, 5.0 * sig ** 2)
    assert loss_g.item() == pytest.approx((w * dv2).mean().item(), rel=1e-5)


def test_band_terms_sum_to_loss_and_grad():
    pred, noise, x0, sig = _batch()
    pred.requires_grad_(True)
    loss, logs = dit_loss(pred, noise, x0, sig, "ultraflux", CFG)
    assert loss.dim() == 0
    assert {"loss_LL", "loss_LH", "loss_HL", "loss_HH", "loss_v_mse", "huber_c", "snr_weight"} <= logs.keys()
    assert sum(logs[f"loss_{b}"] for b in ("LL", "LH", "HL", "HH")) == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # sigma = 1 has SNR = 0 -> Min-SNR weight 0 -> no gradient from that sample
    assert pred.grad[-1].abs().max() == 0


def test_huber_differs_from_l2_and_bounds_gradient():
    pred, noise, x0, sig = _batch()
    big = {**CFG, "c_min": 1e6, "c_max": 1e6}
    l_h, _ = dit_loss(pred, noise, x0, sig, "ultraflux", CFG)
    l_2, _ = dit_loss(pred, noise, x0, sig, "ultraflux", big)
    assert l_h.item() < l_2.item()                     # pseudo-Huber <= quadratic, strictly for nonzero errors
    e = torch.linspace(-20, 20, 101, requires_grad=True)
    c = torch.tensor(0.2)
    pseudo_huber(e, c).sum().backward()
    assert e.grad.abs().max() <= 2 * 0.2 + 1e-6         # L1 slope 2c for |e| >> c
    assert pseudo_huber(torch.tensor(1e-3), c).item() == pytest.approx(1e-6, rel=1e-3)   # quadratic near 0
    assert pseudo_huber(torch.tensor(0.5), torch.tensor(1e6)).item() == pytest.approx(0.25, rel=1e-6)


def test_threshold_schedule_and_min_snr():
    sig = torch.tensor([1e-4, 0.25, 0.5, 0.75, 1.0])
    c = huber_c(sig, 0.2, 1.0)
    assert c[0].item() == pytest.approx(1.0, abs=1e-3) and c[-1].item() == pytest.approx(0.2)
    assert torch.all(c[:-1] > c[1:])                   # threshold shrinks as noise grows
    snr = flow_snr(sig)
    assert torch.allclose(c, 0.2 + 0.8 * (snr.sqrt() / (1 + snr.sqrt())) ** 2, atol=1e-6)
    w = min_snr_weight(sig, 5.0)
    assert w[0].item() == 5.0 and w[-1].item() == 0.0 and w[2].item() == pytest.approx(1.0)
    assert torch.equal(min_snr_weight(sig, None), torch.ones(5))


def test_multilevel_bands_and_errors():
    x = torch.randn(2, 4, 8, 8)
    bands = wavelet_bands(x, 2)
    assert list(bands) == ["LL2", "LH2", "HL2", "HH2", "LH1", "HL1", "HH1"]
    assert torch.allclose(sum((b ** 2).sum() for b in bands.values()), (x ** 2).sum(), rtol=1e-5)
    pred, noise, x0, sig = _batch()
    with pytest.raises(ValueError):
        dit_loss(pred, noise, x0, sig, "wavelet", CFG)
    with pytest.raises(ValueError):
        dit_loss(pred, noise, x0, sig, "ultraflux", {**CFG, "wavelet": "db2"})
    loss, _ = dit_loss(pred.bfloat16(), noise.bfloat16(), x0.bfloat16(), sig.bfloat16(), "ultraflux", CFG)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_fused_path_matches_autograd_reference():
    from ultraflux.losses.dit import _reference_terms

    pred, noise, x0, sig = _batch(b=4, seed=3)
    pred = pred.double().requires_grad_(True)
    loss, logs = dit_loss(pred, noise, x0, sig, "ultraflux", CFG)
    (g_fused,) = torch.autograd.grad(loss, pred)
    dv = pred.float() - (noise - x0)
    c = huber_c(sig, 0.2, 1.0)
    wn = min_snr_weight(sig, 5.0) / dv.numel()
    ref = _reference_terms(dv, sig, c, wn, 1)
    ref_loss = sum(t.sum() for t in ref.values())
    (g_ref,) = torch.autograd.grad(ref_loss, pred)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for b in ("LL", "LH", "HL", "HH"):
        assert logs[f"loss_{b}"] == pytest.approx(ref[b].sum().item(), rel=1e-5)
    assert torch.allclose(g_fused, g_ref, rtol=1e-4, atol=1e-9)
    # odd latent sizes go through the reference path
    odd = [t[..., :7, :5] for t in (pred.detach(), noise, x0)]
    l_odd, logs_odd = dit_loss(*odd, sig, "ultraflux", CFG)
    assert torch.isfinite(l_odd) and "loss_HH" in logs_odd
