"""One-level orthonormal 2D Haar DWT (seed Sec. 4, Table 3 "Wavelet type / number of levels: Haar, J = 1").

For every 2x2 block [[a, b], [c, d]] of the last two axes (rows = height, columns = width):

    LL = (a + b + c + d) / 2        approximation                      = pywt cA
    LH = (a + b - c - d) / 2        high-pass along height, low along width (horizontal edges)  = pywt cH
    HL = (a - b + c - d) / 2        low-pass along height, high along width (vertical edges)    = pywt cV
    HH = (a - b - c + d) / 2        diagonal                                                    = pywt cD

which is exactly ``pywt.dwt2(x, 'haar')`` -> (cA, (cH, cV, cD)) (pywt's Haar: lo = [1, 1]/sqrt2, hi = [-1, 1]/sqrt2
applied as (x[2n] - x[2n+1])/sqrt2). The 4x4 matrix is orthonormal, so sum of squares is preserved
(||LL||^2 + ||LH||^2 + ||HL||^2 + ||HH||^2 = ||x||^2) and the inverse is its transpose:

    a = (LL + LH + HL + HH) / 2,  b = (LL + LH - HL - HH) / 2,  c = (LL - LH + HL - HH) / 2,  d = (LL - LH - HL + HH) / 2

An odd height/width is extended by repeating the last row/column (pywt mode "symmetric" for one sample), giving
ceil(H/2) x ceil(W/2) subbands like pywt; ``haar_idwt2`` then returns the even size (crop to the original).
Works on any leading batch/channel shape, any float dtype, and is differentiable (pure tensor ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUBBANDS = ("LL", "LH", "HL", "HH")


def haar_dwt2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., H, W] -> (LL, LH, HL, HH), each [..., ceil(H/2), ceil(W/2)] (= pywt (cA, cH, cV, cD))."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        lead = x.shape[:-2]
        x = F.pad(x.reshape(-1, 1, h, w), (0, w % 2, 0, h % 2), mode="replicate").reshape(*lead, h + h % 2, w + w % 2)
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def haar_idwt2(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """Inverse of ``haar_dwt2``: four [..., h, w] subbands -> [..., 2h, 2w] (= pywt.idwt2(..., 'haar'))."""
    a = (ll + lh + hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll - lh - hl + hh) / 2
    top = torch.stack((a, b), dim=-1).flatten(-2)       # [..., h, 2w]: a0 b0 a1 b1 ...
    bottom = torch.stack((c, d), dim=-1).flatten(-2)
    return torch.stack((top, bottom), dim=-2).flatten(-3, -2)   # [..., 2h, 2w]
