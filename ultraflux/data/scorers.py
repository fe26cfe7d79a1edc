"""Learned image scorers behind one interface (seed Sec. 2.1 "Image Quality Filtering" / "Aesthetic Quality Filtering").

* quality: Q-Align [seed ref 2], keep images whose score is > 4.0 (1-5 scale).
* aesthetic: ArtiMuse [seed ref 1], keep the top 30%; its top 5% is the stage-2 subset (seed Table 3).

A :class:`Scorer` maps a batch of HxWx3 uint8 RGB arrays to floats (higher = better) and has a ``name`` that the
manifest records next to every score (``quality_scorer`` / ``aesthetic_scorer``).

Backends:

* learned, when ``curate.quality.weights`` / ``curate.aesthetic.weights`` names a local checkpoint directory
  (nothing is ever downloaded; a missing directory is a clear error before any work). They run in the main process
  on the GPU when one is present, over the candidates that passed the cheap filters, in batches of ``batch_size``,
  each image a DCT-reduced decode (long side >= 2048 px) of the STORED pixels, as the public tool reads them:

  - Q-Align: ``pyiqa.create_metric("qalign")`` as tools/filtering_pipeline.py does, when the ``qalign`` extra is
    installed (:class:`QAlignScorer`); else the checkpoint's own ``model.score`` through transformers.
  - ArtiMuse: the ``InternVLChatModel.score`` interface of its repository (:class:`ArtiMuseScorer`), in its own
    environment (it pins transformers 4.37.2).
* classical stand-ins, when no weights are configured. They use NO learned weights and are named as such:
  ``standin:laplacian-sharpness`` (quality: log of the variance of the Laplacian of the 512-px-long-side gray image,
  a classical no-reference blur/sharpness measure) and ``standin:hasler-colorfulness`` (aesthetic: the colourfulness
  metric of Hasler & Suesstrunk 2003 on the same 512-px image). Their scales are unrelated to Q-Align's 1-5, so the
  quality threshold of a stand-in is calibrated by percentile (``curate.quality.standin_keep_fraction``), never 4.0.
  They are cheap and picklable, so they run inside the per-image worker.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
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


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _as_hub_name(repo_id: str, weights: str):
    """Make the hub id ``repo_id`` load from the local directory ``weights`` while inside the block.

    pyiqa's Q-Align arch calls ``AutoModelForCausalLM.from_pretrained("q-future/one-align")`` and
    ``CLIPImageProcessor.from_pretrained(...)`` with that id and no path argument. Inside the block both loaders read
    ``weights`` when asked for ``repo_id`` (any other name passes through), with the Hugging Face hub offline:
    nothing is downloaded, and neither the working directory nor any file outside the block is touched.
    """
    from transformers import AutoModelForCausalLM, CLIPImageProcessor

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    patched = {cls: cls.__dict__.get("from_pretrained") for cls in (AutoModelForCausalLM, CLIPImageProcessor)}

    def redirected(load):
        return classmethod(lambda cls, name, *a, **kw: load(str(Path(weights)) if name == repo_id else name, *a, **kw))

    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    for cls in patched:
        cls.from_pretrained = redirected(cls.from_pretrained)
    try:
        yield
    finally:
        for cls, own in patched.items():
            if own is None:
                del cls.from_pretrained   # it was inherited: the base class's loader shows through again
            else:
                cls.from_pretrained = own
        for key, value in env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _import_package(name: str, folder: Path) -> None:
    """Import the package in ``folder`` as ``name`` (once), without adding anything to ``sys.path``."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def pyiqa_available() -> bool:
    return importlib.util.find_spec("pyiqa") is not None


class QAlignScorer(Scorer):
    """Q-Align quality (1-5) from a local ``q-future/one-align`` directory (seed Sec. 2.1: keep > 4.0).

    With the ``qalign`` extra (pyiqa) installed: ``pyiqa.create_metric("qalign")`` exactly as the public
    tools/filtering_pipeline.py calls it (one image per call, an RGB float tensor in [0, 1] = uint8 / 255), the
    weights read from ``weights`` (see :func:`_as_hub_name`). Without pyiqa: the checkpoint's own remote code
    (``AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True).score(images)``, Q-Align's README API).
    """

    learned = True
    REPO_ID = "q-future/one-align"

    def __init__(self, weights: str, batch_size: int = 8):
        import torch

        self.device = _device()
        self.batch_size = batch_size
        self.backend = "pyiqa" if pyiqa_available() else "transformers"
        self.name = qalign_name(weights)
        if self.backend == "pyiqa":
            import pyiqa

            with _as_hub_name(self.REPO_ID, weights):
                self.metric = pyiqa.create_metric("qalign", device=self.device)
        else:
            from transformers import AutoModelForCausalLM

            dtype = torch.float16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(
                weights, trust_remote_code=True, torch_dtype=dtype, device_map=self.device).eval()

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch
        from PIL import Image

        with torch.inference_mode():
            if self.backend == "pyiqa":  # pyiqa's Q-Align takes one image per call
                return [float(self.metric(torch.from_numpy(im.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
                                          .to(self.device)).item()) for im in images]
            out = self.model.score([Image.fromarray(im) for im in images], task_="quality", input_="image")
        return [float(v) for v in out.reshape(-1).float().cpu()]


class ArtiMuseScorer(Scorer):
    """ArtiMuse aesthetic score (0-100) through its published interface (github.com/thunderbolt215/ArtiMuse,
    ``src/eval/eval_image.py``): ``InternVLChatModel.from_pretrained(checkpoint)`` from the repository's
    ``src/artimuse`` package, the slow tokenizer of the checkpoint, a 448x448 bicubic resize with ImageNet
    normalisation, and ``model.score(device, tokenizer, pixel_values, generation_config)`` with greedy decoding.
    ``code_dir`` is the ``src`` folder of an ArtiMuse checkout; ArtiMuse pins transformers 4.37.2, so it runs in
    its own environment (README "Learned scorers"). Seed Sec. 2.1: keep the top 30%."""

    learned = True
    INPUT_SIZE = 448
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, weights: str, batch_size: int = 8, code_dir: str = ""):
        import torch

        if not code_dir or not (Path(code_dir) / "artimuse").is_dir():
            raise FileNotFoundError(
                f"curate.aesthetic.code_dir = {code_dir!r} must be the src/ folder of an ArtiMuse checkout "
                "(github.com/thunderbolt215/ArtiMuse), which holds the artimuse package")
        # src/eval/eval_image.py puts src/ and src/artimuse/ on sys.path: ArtiMuse's modules import both
        # ``artimuse.…`` and ``internvl.…``. The same two packages are imported here from their folders instead.
        _import_package("artimuse", Path(code_dir) / "artimuse")
        if (Path(code_dir) / "artimuse" / "internvl" / "__init__.py").is_file():
            _import_package("internvl", Path(code_dir) / "artimuse" / "internvl")
        from artimuse.internvl.model.internvl_chat.modeling_artimuse import InternVLChatModel
        from transformers import AutoTokenizer

        self.device = _device()
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.name = f"artimuse:{Path(weights).name}"
        self.batch_size = batch_size
        self.model = InternVLChatModel.from_pretrained(
            weights, torch_dtype=self.dtype, low_cpu_mem_usage=True, use_flash_attn=self.device == "cuda",
        ).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=True, use_fast=False)
        self.generation = dict(max_new_tokens=8192, do_sample=False, pad_token_id=self.tokenizer.eos_token_id)

    def pixel_values(self, image: np.ndarray):
        import torch
        from PIL import Image

        small = Image.fromarray(image).resize((self.INPUT_SIZE,) * 2, Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(self.MEAN)[:, None, None]) / torch.tensor(self.STD)[:, None, None]
        return x[None].to(self.dtype).to(self.device)

    def score(self, images: list[np.ndarray]) -> list[float]:
        import torch

        with torch.inference_mode():
            return [float(self.model.score(self.device, self.tokenizer, self.pixel_values(im), self.generation))
                    for im in images]


def qalign_name(weights: str) -> str:
    backend = "pyiqa" if pyiqa_available() else "transformers"
    return f"q-align({backend}):{Path(weights).name}"


QUALITY_STANDIN = "standin:laplacian-sharpness"
AESTHETIC_STANDIN = "standin:hasler-colorfulness"
STANDINS = {QUALITY_STANDIN: laplacian_sharpness, AESTHETIC_STANDIN: hasler_colorfulness}
GRAYSCALE_COLORFULNESS = 1.0
"""Hasler-Suesstrunk colourfulness below which an image counts as grayscale (exactly 0 when R = G = B; "not
colourful" photos score about 15 on their scale). The colourfulness stand-in says nothing about a grayscale photo's
aesthetics, so such images are not ranked by it (:func:`skip_grayscale`)."""
GRAYSCALE_SKIPPED = f"{AESTHETIC_STANDIN} skipped: grayscale"


def skip_grayscale(rows) -> int:
    """With the colourfulness stand-in as aesthetic scorer, grayscale rows get no aesthetic score (NaN) and the
    scorer name :data:`GRAYSCALE_SKIPPED`: the aesthetic filter lets them pass instead of rejecting every grayscale
    photo. Returns how many rows were marked. In place."""
    gray = (rows["aesthetic_scorer"] == AESTHETIC_STANDIN) & (rows["aesthetic"] < GRAYSCALE_COLORFULNESS)
    rows.loc[gray, "aesthetic"] = float("nan")
    rows.loc[gray, "aesthetic_scorer"] = GRAYSCALE_SKIPPED
    return int(gray.sum())


def check_weights(kind: str, weights: str) -> None:
    """Raise a clear error, before any work, when a configured checkpoint directory does not exist."""
    if weights and not Path(weights).is_dir():
        raise FileNotFoundError(f"curate.{kind}.weights = {weights!r} is not a directory (a local checkpoint)")


def scorer_name(kind: str, cfg: dict) -> str:
    """Name of the scorer that ``make_scorer`` would build, without loading anything."""
    weights = cfg["weights"]
    if weights:
        return qalign_name(weights) if kind == "quality" else f"artimuse:{Path(weights).name}"
    return QUALITY_STANDIN if kind == "quality" else AESTHETIC_STANDIN


def make_scorer(kind: str, cfg: dict) -> Scorer:
    """Build the ``quality`` or ``aesthetic`` scorer from its ``curate.<kind>`` params."""
    weights = cfg["weights"]
    if not weights:
        name = scorer_name(kind, cfg)
        return FunctionScorer(name, STANDINS[name])
    check_weights(kind, weights)
    batch = int(cfg["batch_size"])
    if kind == "quality":
        return QAlignScorer(weights, batch)
    return ArtiMuseScorer(weights, batch, cfg["code_dir"])
