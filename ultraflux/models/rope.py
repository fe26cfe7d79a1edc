"""Resonance 2D RoPE with YaRN (seed Sec. 3, Fig. 1/2, Table 3 "Resonance 2D RoPE with YaRN").

Flux rotates every attention head with a 3-axis RoPE, axes dims [16, 56, 56]: axis 0 is the text/index axis, axes 1 and
2 are the latent-patch height h and width w. For one axis of dim d the base ("Flux") spectrum is

    omega_k = b^(-2k/d),   k = 0 .. d/2 - 1,   b = 10,000                                  (Table 3: RoPE base b)

and a token at position p is rotated by the angle p * omega_k in band k. Each spatial axis is handled on its own, with
its own span (= max(id) - min(id) + 1 along that axis of the ``ids`` passed to ``forward``) against the training
window of L = ``train_len`` tokens (paper: L = 2048 px / 32 px per token = 64).

WHICH SPECTRUM AN AXIS GETS (kind ``resonance_yarn``):

    span <= L, snap_in_window = False (default)  ->  plain Flux spectrum, no snapping, no mscale
    span <= L, snap_in_window = True             ->  resonance-snapped spectrum omega_hat, no mscale
    span >  L                                    ->  resonance-snapped spectrum + YaRN at s = span / L, times mscale(s)

The default is what the public UltraFlux release computes (its ``FluxPosEmbed`` with ``method="yarn"``: an axis
inside its 64-token window gets the untouched Flux RoPE; resonance alignment is part of its YaRN branch only), so
UltraFlux-v1 weights sample as in the release. ``snap_in_window: true`` is the reading of the seed's Fig. 2 (bottom
row, first column: resonant frequencies already at the 64x64 training grid); it changes every axis of <= L tokens
(max |delta cos| 1.78 at L = 64 against the release). Kind ``yarn`` is the same without resonance (Flux spectrum,
YaRN beyond L); kind ``flux`` is the Flux spectrum everywhere (diffusers' ``FluxPosEmbed``, seed Fig. 4a).

Resonance (seed Sec. 3, Fig. 1a/b). In a training window of L tokens band k completes

    r_k = L * omega_k / (2 pi)

cycles. Resonance RoPE snaps the cycle count to an integer so that every snapped band is an exact standing wave on
[0, L] (phase closure: p = L gives angle 2 pi r_hat_k = 0 mod 2 pi):

    r_hat_k = round(r_k)               for bands with r_k >= 1   (default, = public release)
    r_hat_k = r_k                      for bands with r_k <  1   (they keep the Flux frequency)
    omega_hat_k = 2 pi r_hat_k / L

``snap_all_bands=True`` gives the seed's literal formula r_hat_k = max(1, round(r_k)) for every band, which also
lifts the slow r_k < 1 bands to one full cycle per window (a large change of those bands, hence not the default).

YaRN, "NTK-by-parts" (seed Sec. 3 last paragraph; Table 3: eta = 1.0, (alpha, beta) = (1.25, 0.75)), for an axis of
s = span / L > 1. With alpha_k = -ln(omega_base_k) / ln b the (possibly snapped) exponent of band k (alpha_k = 2k/d for
Flux), three spectra are blended:

    omega_base_k = base spectrum (Flux for ``yarn``, resonance-snapped for ``resonance_yarn``)
    omega_lin_k  = omega_base_k / s                                  (position interpolation)
    omega_ntk_k  = (b * s^(d / (d - 2)))^(-alpha_k)                  (NTK-aware base change)

Ramps over the rotation count are placed with YaRN's correction dimension (the *unsnapped* exponent 2k/d):

    k_c(r) = d * ln(L / (2 pi r)) / (2 ln b)
    lo = max(floor(k_c(r_hi)), 0),   hi = min(ceil(k_c(r_lo)), d - 1, d / 2)
    ramp(k; lo, hi) = clamp((k - lo) / (hi - lo), 0, 1)              (hi == lo -> hi + 0.001)

    m1_k  = eta * (1 - ramp(k; k_c(alpha), k_c(beta)))      (alpha, beta) = (1.25, 0.75)   linear <-> NTK
    omega' = omega_lin * (1 - m1) + omega_ntk * m1
    m2_k  = 1 - ramp(k; k_c(16), k_c(2))                    (gamma_0, gamma_1) = (16, 2)   back to the base
    omega_yarn = omega' * (1 - m2) + omega_base * m2

i.e. bands that turn more than 16 times in the window keep the base spectrum, bands under 0.75 turns are linearly
interpolated, and NTK fills the middle. The attention temperature

    mscale(s) = 0.1 * ln(s) + 1        (s > 1; else 1)

multiplies that axis' cos and sin tables (so q.k of that axis is scaled by mscale^2, YaRN's sqrt(1/t)). The release's
extra clamp hi <= d/2 (the band count) is kept; it only binds for windows of thousands of tokens.

eta (``ntk_factor``, Table 3 "NTK scaling factor" = 1.0) weights the NTK part as the YaRN reference code's
``ntk_factor`` does. The release hard-wires eta = 1 in its YaRN branch; its own ``ntk_factor`` argument multiplies
the base b inside the window only and is never passed by its ``FluxPosEmbed`` (so it is 1 there too). With eta = 1.0
this module equals the release; any other eta is an extension.

Design maximum (Table 3: s_a = L'_a / L_a = 2.0). Per axis the scale is NOT clamped: the seed's own multi-AR buckets
exceed 2.0 on their long side (Table 3: 6336 x 2624 px -> 198 tokens, s = 3.09; this repo's 2.39:1 bucket: 2.91) and
the release uses s = span / L unclamped. What all those buckets share is their pixel count (~4096^2 = (2 x 2048)^2),
so s_a is read as the bound of the RESOLUTION scale sqrt(span_h * span_w) / L (1.88 for every 4K bucket here, 2.0 at
4096x4096). A warning is logged once per grid whose resolution scale exceeds ``max_scale``: an image of more pixels
than the design covers, not an aspect ratio.

The text axis (axis 0) is always the plain Flux spectrum. The output equals diffusers' ``FluxPosEmbed``
(repeat_interleave_real=True): (freqs_cos, freqs_sin), each [N, sum(axes_dim)], float32. Tables are cached per
(ids content, device): a training step at an already seen resolution does no trigonometry.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("flux", "yarn", "resonance_yarn")

# Table 3 "Resonance 2D RoPE with YaRN"
ROPE_THETA = 10_000          # RoPE base b
NTK_FACTOR = 1.0             # eta
YARN_ALPHA = 1.25            # ramp (alpha, beta) between linear interpolation and NTK
YARN_BETA = 0.75
MAX_SCALE = 2.0              # s_a, design maximum of the resolution scale (see module docstring; not a clamp)
# YaRN reference code (PartNTK): bands turning > 16 times in the window keep the base spectrum, < 2 get the blend.
YARN_GAMMA_0 = 16.0
YARN_GAMMA_1 = 2.0
# Public UltraFlux release: L = 2048 px / (16 px VAE * 2 px patch) = 64 tokens per axis.
TRAIN_LEN = 64

def flux_frequencies(dim: int, theta: float) -> torch.Tensor:
    """omega_k = theta^(-2k/dim), k = 0..dim/2-1 (float64), exactly diffusers' get_1d_rotary_pos_embed spectrum."""
    assert dim % 2 == 0, dim
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def cycles(omega: torch.Tensor, train_len: int) -> torch.Tensor:
    """r_k = L * omega_k / (2 pi): cycles completed by band k in the training window (seed Sec. 3, Fig. 1a)."""
    return train_len * omega / (2 * math.pi)


def snapped_cycles(r: torch.Tensor, snap_all_bands: bool = False) -> torch.Tensor:
    """r_hat_k = round(r_k) where r_k >= 1 else r_k; ``snap_all_bands``: max(1, round(r_k)) for all k (seed Sec. 3)."""
    if snap_all_bands:
        return torch.clamp(torch.round(r), min=1.0)
    return torch.where(r >= 1.0, torch.round(r), r)


def resonance_frequencies(dim: int, theta: float, train_len: int, snap_all_bands: bool = False) -> torch.Tensor:
    """omega_hat_k = 2 pi r_hat_k / L (seed Sec. 3). Snapped bands close their phase exactly at p = L."""
    omega = flux_frequencies(dim, theta)
    r = cycles(omega, train_len)
    snapped = torch.ones_like(r, dtype=torch.bool) if snap_all_bands else r >= 1.0
    return torch.where(snapped, 2 * math.pi * snapped_cycles(r, snap_all_bands) / train_len, omega)


def correction_dim(num_rotations: float, dim: int, theta: float, train_len: int) -> float:
    """k_c(r) = d ln(L / (2 pi r)) / (2 ln b): the (fractional) band index that turns r times in L (YaRN)."""
    return dim * math.log(train_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def correction_range(high_rot: float, low_rot: float, dim: int, theta: float, train_len: int) -> tuple[int, int]:
    """(lo, hi) = (max(floor(k_c(high_rot)), 0), min(ceil(k_c(low_rot)), d - 1, d / 2)) (YaRN + the release's clamp)."""
    lo = math.floor(correction_dim(high_rot, dim, theta, train_len))
    hi = math.ceil(correction_dim(low_rot, dim, theta, train_len))
    return max(lo, 0), min(hi, dim - 1, dim // 2)


def linear_ramp(lo: float, hi: float, n: int) -> torch.Tensor:
    """ramp(k) = clamp((k - lo) / (hi - lo), 0, 1), k = 0..n-1 (YaRN ``linear_ramp_mask``; hi == lo -> hi + 1e-3)."""
    if hi == lo:
        hi = hi + 1e-3
    return torch.clamp((torch.arange(n, dtype=torch.float64) - lo) / (hi - lo), 0.0, 1.0)


def yarn_mscale(scale: float) -> float:
    """Attention temperature factor: 0.1 ln(s) + 1 for s > 1, else 1 (YaRN)."""
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def window_spectrum(dim: int, theta: float, train_len: int, kind: str, snap_all_bands: bool = False,
                    snap_in_window: bool = False) -> torch.Tensor:
    """Spectrum of an axis spanning <= ``train_len`` tokens: Flux, or resonance-snapped with ``snap_in_window``."""
    if kind == "resonance_yarn" and snap_in_window:
        return resonance_frequencies(dim, theta, train_len, snap_all_bands)
    return flux_frequencies(dim, theta)


def axis_frequencies(dim: int, theta: float, train_len: int, target_len: int, kind: str, *,
                     ntk_factor: float = NTK_FACTOR, yarn_alpha: float = YARN_ALPHA, yarn_beta: float = YARN_BETA,
                     snap_all_bands: bool = False, snap_in_window: bool = False) -> torch.Tensor:
    """The dim // 2 angular frequencies (float64) of one spatial axis spanning ``target_len`` tokens.

    kind "flux": omega_k = b^(-2k/d) whatever the span. Kinds "yarn" / "resonance_yarn": ``window_spectrum`` when
    target_len <= train_len; beyond, NTK-by-parts YaRN with s = target_len / train_len on the Flux ("yarn") or the
    resonance-snapped ("resonance_yarn") spectrum. Formulas in the module docstring.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown rope kind {kind!r}; expected one of {KINDS}")
    if kind == "flux":
        return flux_frequencies(dim, theta)
    scale = float(target_len) / float(train_len)
    if scale <= 1.0:
        return window_spectrum(dim, theta, train_len, kind, snap_all_bands, snap_in_window)
    base = (resonance_frequencies(dim, theta, train_len, snap_all_bands) if kind == "resonance_yarn"
            else flux_frequencies(dim, theta))
    exponent = -torch.log(base) / math.log(theta)             # alpha_k (snapped for resonance)
    omega_lin = base / scale
    omega_ntk = (theta * scale ** (dim / (dim - 2))) ** (-exponent)
    n = dim // 2
    lo, hi = correction_range(yarn_alpha, yarn_beta, dim, theta, train_len)
    m1 = (1.0 - linear_ramp(lo, hi, n)) * ntk_factor
    omega = omega_lin * (1.0 - m1) + omega_ntk * m1
    lo, hi = correction_range(YARN_GAMMA_0, YARN_GAMMA_1, dim, theta, train_len)
    m2 = 1.0 - linear_ramp(lo, hi, n)
    return omega * (1.0 - m2) + base * m2


def describe(kind: str, snap_in_window: bool = False, snap_all_bands: bool = False) -> str:
    """One line naming the RoPE in force (diagnostics, logs)."""
    if kind == "flux":
        return "flux: plain Flux RoPE on every axis, no scaling (seed Fig. 4a)"
    window = ("resonance-snapped (snap_in_window: seed Fig. 2 reading)" if kind == "resonance_yarn" and snap_in_window
              else "plain Flux (as the public release)")
    beyond = "resonance-snapped + YaRN + mscale" if kind == "resonance_yarn" else "Flux + YaRN + mscale"
    bands = "; every band snapped to max(1, round(r))" if snap_all_bands and kind == "resonance_yarn" else ""
    return f"{kind}: axes within the training window {window}, longer axes {beyond}{bands}"


class UltraFluxPosEmbed(nn.Module):
    """Drop-in for diffusers' ``FluxPosEmbed``: ``transformer.pos_embed = UltraFluxPosEmbed(...)``.

    forward(ids [N, n_axes]) -> (freqs_cos, freqs_sin), each [N, sum(axes_dim)] float32, band values interleaved
    (repeat_interleave_real=True). Axis 0 (text/index) uses the Flux spectrum; axes 1.. (h, w) use ``kind`` with their
    own span. Holds no parameters (checkpoints stay plain diffusers checkpoints).
    """

    def __init__(self, theta: int, axes_dim: list[int], kind: str = "resonance_yarn", train_len: int = TRAIN_LEN,
                 ntk_factor: float = NTK_FACTOR, yarn_alpha: float = YARN_ALPHA, yarn_beta: float = YARN_BETA,
                 max_scale: float = MAX_SCALE, snap_all_bands: bool = False, snap_in_window: bool = False,
                 cache_size: int = 16):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown rope kind {kind!r}; expected one of {KINDS}")
        self.theta = theta
        self.axes_dim = list(axes_dim)
        self.kind = kind
        self.train_len = int(train_len)
        self.ntk_factor = float(ntk_factor)
        self.yarn_alpha = float(yarn_alpha)
        self.yarn_beta = float(yarn_beta)
        self.max_scale = float(max_scale)
        self.snap_all_bands = bool(snap_all_bands)
        self.snap_in_window = bool(snap_in_window)
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self._warned: set = set()
        self.last_scales: list[float] = []   # per-axis YaRN scale s of the latest forward (1.0 = no YaRN)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, theta={self.theta}, axes_dim={self.axes_dim}, train_len={self.train_len}, "
                f"ntk_factor={self.ntk_factor}, yarn=({self.yarn_alpha}, {self.yarn_beta}), "
                f"max_scale={self.max_scale}, snap_all_bands={self.snap_all_bands}, "
                f"snap_in_window={self.snap_in_window}")

    def describe(self) -> str:
        return describe(self.kind, self.snap_in_window, self.snap_all_bands)

    def axis_spectrum(self, axis: int, span: int) -> tuple[torch.Tensor, float]:
        """(omega [d/2] float64, mscale) of one axis for a span of ``span`` tokens."""
        dim = self.axes_dim[axis]
        if axis == 0 or self.kind == "flux":
            return flux_frequencies(dim, self.theta), 1.0
        omega = axis_frequencies(dim, self.theta, self.train_len, span, self.kind, ntk_factor=self.ntk_factor,
                                 yarn_alpha=self.yarn_alpha, yarn_beta=self.yarn_beta,
                                 snap_all_bands=self.snap_all_bands, snap_in_window=self.snap_in_window)
        return omega, yarn_mscale(span / self.train_len)

    def resolution_scale(self, spans: list[int]) -> float:
        """sqrt(span_h * span_w) / L (geometric mean over the spatial axes): the scale the design maximum bounds."""
        spatial = [max(s, 1) for s in spans[1:]]
        return math.exp(sum(math.log(s) for s in spatial) / len(spatial)) / self.train_len if spatial else 1.0

    def _check_design_maximum(self, spans: list[int]) -> None:
        s = self.resolution_scale(spans)
        if self.kind != "flux" and s > self.max_scale * (1 + 1e-9) and tuple(spans) not in self._warned:
            self._warned.add(tuple(spans))
            logger.warning("RoPE grid %s tokens: resolution scale sqrt(h*w)/L = %.3f exceeds the design maximum "
                           "s_a = %.1f (seed Table 3; L = rope.train_len = %d): more pixels than the recipe covers",
                           "x".join(map(str, spans[1:])), s, self.max_scale, self.train_len)

    def _compute(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        pos = ids.float().to(torch.float64)   # same positions as FluxPosEmbed (ids.float()), fp64 phases
        spans = [int(pos[:, i].max().item() - pos[:, i].min().item()) + 1 if pos.shape[0] else 1
                 for i in range(ids.shape[-1])]
        self._check_design_maximum(spans)
        cos_out, sin_out, scales = [], [], []
        for i, span in enumerate(spans):
            omega, mscale = self.axis_spectrum(i, span)
            scales.append(max(span / self.train_len, 1.0) if (i > 0 and self.kind != "flux") else 1.0)
            phase = torch.outer(pos[:, i].cpu(), omega)                       # [N, d/2]
            cos = phase.cos().repeat_interleave(2, dim=1) * mscale
            sin = phase.sin().repeat_interleave(2, dim=1) * mscale
            cos_out.append(cos.float())
            sin_out.append(sin.float())
        freqs_cos = torch.cat(cos_out, dim=-1).to(ids.device)
        freqs_sin = torch.cat(sin_out, dim=-1).to(ids.device)
        return freqs_cos, freqs_sin, scales

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(ids.shape), ids.dtype, str(ids.device))
        hit = self._cache.get(key)
        if hit is not None and torch.equal(hit[0], ids):
            self._cache.move_to_end(key)
            self.last_scales = hit[3]
            return hit[1], hit[2]
        freqs_cos, freqs_sin, scales = self._compute(ids)
        self._cache[key] = (ids.detach().clone(), freqs_cos, freqs_sin, scales)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.last_scales = scales
        return freqs_cos, freqs_sin


def build_pos_embed(rope_cfg: dict, axes_dim) -> UltraFluxPosEmbed:
    """``UltraFluxPosEmbed`` from params.yaml's complete, validated ``rope`` section (``ultraflux.config``)."""
    return UltraFluxPosEmbed(theta=rope_cfg["theta"], axes_dim=list(axes_dim), kind=rope_cfg["kind"],
                             train_len=rope_cfg["train_len"], ntk_factor=rope_cfg["ntk_factor"],
                             yarn_alpha=rope_cfg["yarn_alpha"], yarn_beta=rope_cfg["yarn_beta"],
                             max_scale=rope_cfg["max_scale"], snap_all_bands=rope_cfg["snap_all_bands"],
                             snap_in_window=rope_cfg["snap_in_window"])
