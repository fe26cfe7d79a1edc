"""Learned image scorers behind one interface (seed Sec. 2.1 "Image Quality Filtering" / "Aesthetic Quality Filtering").

* quality: Q-Align [seed ref 2], keep images whose score is > 4.0 (1-5 scale).
* aesthetic: ArtiMuse [seed ref 1], keep the top 30%; its top 5% is the stage-2 subset (seed Table 3).

A :class:`Scorer` maps a batch of HxWx3 uint8 RGB arrays to floats (higher = better) and has a ``name`` that the
manifest records next to every score (``quality_scorer`` / ``aesthetic_scorer``).

Backends:

* learned, when ``curate.quality.weights`` / ``curate.aesthetic.weights`` names a local checkpoint directory:
  loaded with ``transformers`` ``from_pretrained(dir, trust_remote_code=True)`` in fp16 on the GPU when one is present
  (else fp32 on CPU), run in batches of ``batch_size`` in the main process over the bucket-resized images. The Q-Align
  checkpoints (``q-future/one-align`` and friends) expose ``model.score(images, task_="quality", input_="image")``; an
  ArtiMuse checkpoint must expose ``model.score(images)`` (e.g. the wrapper of the ArtiMuse repository). A missing
  directory is a clear error before any work.
* classical stand-ins, when no weights are configured. They use NO learned weights and are named as such:
  ``standin:laplacian-sharpness`` (quality: log of the variance of the Laplacian of the 512-px-long-side gray image,
  a classical no-reference blur/sharpness measure) and ``standin:hasler-colorfulness`` (aesthetic: the colourfulness
  metric of Hasler & Suesstrunk 2003 on the same 512-px image). Their scales are unrelated to Q-Align's 1-5, so the
  quality threshold of a stand-in is calibrated by percentile (``curate.quality.standin_keep_fraction``), never 4.0.
  They are cheap and picklable, so they run inside the per-image worker.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

STANDIN_SIDE = 512
"""Stand-ins score a copy whose long side is 512 px, so scores do not depend on resolution. The copy is an area
average of the full image; for JPEGs it comes from the decoder's DCT scaling (1/2, 1/4 or 1/8, then area-averaged
to 512 px: :func:`ultraflux.data.decode.decode_small`), which costs a fraction of a full decode. Both are
box-filter averages of the same pixels, so the scores measure the same thing either way."""


def small_copy(rgb: np.ndarray) -> np.ndarray:
    """The 512-px-long-side area-averaged copy the stand-ins score (unchanged when already that small)."""
    from .decode import area_resize

    return area_resize(rgb, STANDIN_SIDE)


def laplacian_sharpness(rgb: np.ndarray) -> float:
    """log(1 + Var(Laplacian(gray))) on the 512-px copy: a classical no-reference sharpness score."""
    gray = cv2.cvtColor(small_copy(rgb), cv2.COLOR_RGB2GRAY)
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))
    return float(np.log1p(float(std[0, 0]) ** 2))


def hasler_colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness M = sigma_rgyb + 0.3 mu_rgyb on the 512-px copy."""
    r, g, b = (c.astype(np.float32) for c in cv2.split(small_copy(rgb)))
    rg = r - g
    yb = 0.5 * (r + g) - b
    (mu_rg,), (sd_rg,) = (v.ravel() for v in cv2.meanStdDev(rg))
    (mu_yb,), (sd_yb,) = (v.ravel() for v in cv2.meanStdDev(yb))
    return float(np.hypot(sd_rg, sd_yb) + 0.3 * np.hypot(mu_rg, mu_yb))


class Scorer:
    """Batch scorer interface: ``name``, ``learned`` and ``score(list of RGB uint8 arrays) -> list of floats``."""

    name = "abstract"
    learned = False
    batch_size = 1

    def score(self, images: list[np.ndarray]) -> list[float]:
        raise NotImplementedError


class FunctionScorer(Scorer):
    """A classical stand-in wrapping a per-image function (no learned weights)."""

    def __init__(self, name: str, fn):
        self.name = name
        self.fn = fn

    def score(self, images: list[np.ndarray]) -> list[float]:
        return [self.fn(image) for image in images]


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class QAlignScorer(Scorer):
    """Q-Align quality (1-5) from a local checkpoint directory (seed Sec. 2.1: keep > 4.0)."""

    learned = True

    def __init__(self, weights: str, batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        device, dtype = _device_and_dtype()
        self.name = f"q-align:{Path(weights).name}"
        self.batch_size = batch_size
        self.model = AutoModelForCausalLM.from_pretrained(
            weights, trust_remote_code=True, torch_dtype=dtype, device_map=device
        ).eval()

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch
        from PIL import Image

        with torch.inference_mode():
            out = self.model.score([Image.fromarray(im) for im in images], task_="quality", input_="image")
        return [float(v) for v in out.reshape(-1).float().cpu()]


class ArtiMuseScorer(Scorer):
    """ArtiMuse aesthetic score from a local checkpoint directory (seed Sec. 2.1: keep the top 30%)."""

    learned = True

    def __init__(self, weights: str, batch_size: int = 8):
        from transformers import AutoModel

        device, dtype = _device_and_dtype()
        self.name = f"artimuse:{Path(weights).name}"
        self.batch_size = batch_size
        self.model = AutoModel.from_pretrained(weights, trust_remote_code=True, torch_dtype=dtype).to(device).eval()
        if not hasattr(self.model, "score"):
            raise RuntimeError(
                f"curate.aesthetic.weights = {weights!r}: the loaded model has no score(images) method; wrap the "
                "ArtiMuse checkpoint with its repository's scoring code (github.com/thunderbolt215/ArtiMuse)"
            )

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch
        from PIL import Image

        with torch.inference_mode():
            out = self.model.score([Image.fromarray(im) for im in images])
        return [float(v) for v in np.asarray(torch.as_tensor(out).float().cpu()).reshape(-1)]


QUALITY_STANDIN = "standin:laplacian-sharpness"
AESTHETIC_STANDIN = "standin:hasler-colorfulness"
STANDINS = {QUALITY_STANDIN: laplacian_sharpness, AESTHETIC_STANDIN: hasler_colorfulness}


def check_weights(kind: str, weights: str) -> None:
    """Raise a clear error, before any work, when a configured checkpoint directory does not exist."""
    if weights and not Path(weights).is_dir():
        raise FileNotFoundError(f"curate.{kind}.weights = {weights!r} is not a directory (a local checkpoint)")


def scorer_name(kind: str, cfg: dict) -> str:
    """Name of the scorer that ``make_scorer`` would build, without loading anything."""
    weights = (cfg or {}).get("weights", "") or ""
    if weights:
        return f"{'q-align' if kind == 'quality' else 'artimuse'}:{Path(weights).name}"
    return QUALITY_STANDIN if kind == "quality" else AESTHETIC_STANDIN


def make_scorer(kind: str, cfg: dict) -> Scorer:
    """Build the ``quality`` or ``aesthetic`` scorer from its ``curate.<kind>`` params."""
    cfg = cfg or {}
    weights = cfg.get("weights", "") or ""
    if not weights:
        name = scorer_name(kind, cfg)
        return FunctionScorer(name, STANDINS[name])
    check_weights(kind, weights)
    batch = int(cfg.get("batch_size", 8))
    return QAlignScorer(weights, batch) if kind == "quality" else ArtiMuseScorer(weights, batch)
