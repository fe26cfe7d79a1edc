"""The paper's metrics, computed honestly.

Weight-free metrics are always computed: PSNR, SSIM, NMSE (seed Table 2, via torchmetrics), and Diffusion-4K's detail
metrics so results compare with that line of work:
* GLCM score: 8-bit gray (ITU-R 601 weights, as OpenCV's BGR2GRAY), quantized to 64 levels (v // 4), non-overlapping
  64x64 patches, one GLCM per patch over distances 1-4 and angles 0, 45, 90, 135 degrees (non-symmetric, normalized);
  the patch score is the Shannon entropy (base 2) of the GLCM's value histogram (skimage ``shannon_entropy`` of the
  matrix, Diffusion-4K's definition); the image score is the mean over patches.
* Compression ratio: raw RGB bytes (H * W * 3) / bytes of the image encoded as JPEG at quality 95.
Learned metrics (FID, rFID, LPIPS, HPSv3, ArtiMuse, Q-Align) need checkpoints that cannot be downloaded here; without
their local paths they are reported as ``not computed (no weights at <param>)`` and never replaced by a number.
FID with ``evaluate.fid_inception_weights`` set uses torchmetrics' FrechetInceptionDistance on that local file (needs
the ``vision`` extra: torch-fidelity + torchvision); Q-Align and ArtiMuse with their weights use the curation scorers
(``ultraflux.data.scorers``); HPSv3 with its weights uses the ``hpsv3`` package (prompt-conditioned).

Clearly named weight-free stand-ins are reported *beside* them (keys start with ``standin_``), so variants can still
be compared on the embedded profile; they are not the paper's metrics:
* ``standin_fd_thumb8``: Frechet distance between Gaussian fits of 8x8 RGB thumbnails (192-d, INTER_AREA) of the
  generated images and of the curated (real) images. FID's formula on a pixel feature, not Inception features.
* ``standin_sharpness`` / ``standin_colorfulness``: the curation stand-ins (Laplacian variance, Hasler-Suesstrunk).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

GLCM_PATCH = 64
GLCM_LEVELS = 64
GLCM_DISTANCES = (1, 2, 3, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
JPEG_QUALITY = 95

LEARNED_METRICS = {  # metric -> params key that gives its local weights
    "fid": "evaluate.fid_inception_weights",
    "rfid": "evaluate.fid_inception_weights",
    "lpips": "evaluate.lpips_weights",
    "hpsv3": "evaluate.hpsv3_weights",
    "artimuse": "evaluate.artimuse_weights",
    "qalign": "evaluate.qalign_weights",
}


def not_computed(metric: str) -> str:
    return f"not computed (no weights at {LEARNED_METRICS[metric]})"


def failed(metric: str, err: BaseException) -> str:
    """A learned metric whose weights are set but whose computation failed: say what failed, never a number."""
    return f"not computed ({metric} with {LEARNED_METRICS[metric]} failed: {type(err).__name__}: {err})"[:600]


class ReconstructionLearned:
    """rFID and LPIPS of reconstructions (seed Table 2), accumulated image by image during the reconstruction pass.

    rFID: FID between the inputs and their reconstructions with the local Inception weights
    (``evaluate.fid_inception_weights``); LPIPS: mean LPIPS(VGG) with ``evaluate.lpips_weights``. Each says
    ``not computed (...)`` with the key, or what failed, instead of a number."""

    def __init__(self, cfg: dict):
        self.values: dict[str, object] = {"rfid": not_computed("rfid"), "lpips": not_computed("lpips")}
        self.fid = self.lpips = None
        self.lpips_sum, self.n = 0.0, 0
        if cfg["fid_inception_weights"]:
            self.fid = fid_metric(cfg["fid_inception_weights"])
            if isinstance(self.fid, str):
                self.values["rfid"], self.fid = self.fid, None
        if cfg["lpips_weights"]:
            from ultraflux.models.lpips import load_lpips

            try:
                self.lpips = load_lpips(cfg["lpips_weights"], "evaluate.lpips_weights")
            except RuntimeError as e:
                self.values["lpips"] = f"not computed ({e})"

    def update(self, x, r) -> None:
        """One input and its reconstruction ([3, H, W] in [-1, 1])."""
        import torch

        if self.fid is not None:
            for t, real in ((x, True), (r, False)):
                image = Image.fromarray(((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
                                        .cpu().numpy())
                _fid_update(self.fid, image, real=real)
        if self.lpips is not None:
            with torch.no_grad():
                self.lpips_sum += float(self.lpips(r[None].float().clamp(-1, 1).cpu(), x[None].float().cpu()))
        self.n += 1

    def result(self) -> dict[str, object]:
        """The metrics over the images of every process (each process updated its share; FID syncs its own
        statistics in ``compute``)."""
        from ultraflux.distributed import gather

        shares = gather([(self.lpips_sum, self.n)])
        total, n = sum(s for s, _ in shares), sum(k for _, k in shares)
        if self.fid is not None:
            try:
                self.values["rfid"] = float(self.fid.compute()) if n > 1 else \
                    "not computed (rFID needs at least 2 held-out images)"
            except Exception as e:  # noqa: BLE001 - reported as the metric's value, never a made-up number
                self.values["rfid"] = failed("rfid", e)
        if self.lpips is not None and n:
            self.values["lpips"] = total / n
        return self.values


def glcm_score(image: Image.Image, patch: int = GLCM_PATCH) -> float:
    from skimage.feature import graycomatrix
    from skimage.measure import shannon_entropy

    gray64 = (np.asarray(image.convert("L"), dtype=np.uint8) // (256 // GLCM_LEVELS)).astype(np.uint8)
    h, w = gray64.shape
    scores = [shannon_entropy(graycomatrix(gray64[y:y + patch, x:x + patch], GLCM_DISTANCES, GLCM_ANGLES,
                                           levels=GLCM_LEVELS, normed=True))
              for y in range(0, h - patch + 1, patch) for x in range(0, w - patch + 1, patch)]
    return float(np.mean(scores)) if scores else float("nan")


def compression_ratio(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    buf = io.BytesIO()
    rgb = image.convert("RGB")
    rgb.save(buf, format="JPEG", quality=quality)
    return rgb.width * rgb.height * 3 / buf.tell()


def thumb_features(images: list[Image.Image], side: int = 8) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, (side, side),
                                interpolation=cv2.INTER_AREA).ravel() for im in images]).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussian fits to the rows of a and b (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.cov(a, rowvar=False) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    s_b = np.cov(b, rowvar=False) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    offset = np.eye(a.shape[1]) * eps
    covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset)).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def fid_metric(weights_path: str):
    """torchmetrics FID with a local Inception weights file (real statistics kept across resets), or the reason."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        return f"not computed ({e}; install the vision extra)"
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path,
                                        reset_real_features=False)
    except (ModuleNotFoundError, ImportError) as e:
        return f"not computed (FID backend unavailable: {e}; install the vision extra)"


def _fid_update(metric, image: Image.Image, real: bool) -> None:
    import torch

    t = torch.from_numpy(np.asarray(image.convert("RGB").resize((299, 299), Image.BICUBIC))).permute(2, 0, 1)
    metric.update(t[None], real=real)


@dataclass
class Reference:
    """What the generated sets are compared with, accumulated image by image (memory bounded by the features):
    the FD stand-in's thumbnails [N, 192] and, with Inception weights, FID's running real statistics."""

    thumbs: np.ndarray
    fid: object | None = None   # FrechetInceptionDistance, or a "not computed (...)" string
    num_images: int = 0


def build_reference(images: Iterable[Image.Image], fid_weights: str = "") -> Reference:
    fid = fid_metric(fid_weights) if fid_weights else None
    thumbs = []
    for im in images:
        thumbs.append(thumb_features([im])[0])
        if fid is not None and not isinstance(fid, str):
            _fid_update(fid, im, real=True)
    return Reference(np.stack(thumbs) if thumbs else np.zeros((0, 192)), fid, len(thumbs))


def fid(reference: Reference, fake: list[Image.Image]) -> float | str:
    """FID of ``fake`` against the reference's real statistics."""
    if isinstance(reference.fid, str):
        return reference.fid
    metric = reference.fid
    metric.reset()                 # keeps the real statistics (reset_real_features=False)
    for im in fake:
        _fid_update(metric, im, real=False)
    return float(metric.compute())


def hpsv3(paths: list[str], prompts: list[str], weights: str) -> float | str:
    """Mean HPSv3 reward (the mu of each image's reward) with the ``hpsv3`` package and a local checkpoint."""
    try:
        from hpsv3 import HPSv3RewardInferencer
    except ImportError as e:
        return f"not computed (hpsv3 package not installed: pip install hpsv3; {e})"
    import torch

    inferencer = HPSv3RewardInferencer(checkpoint_path=weights, device="cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        rewards = inferencer.reward(prompts=prompts, image_paths=paths)
    return float(np.mean([float(r[0]) if hasattr(r, "__len__") else float(r) for r in rewards]))


def generation_metrics(images: list[Image.Image], params: dict, real: Reference | list[Image.Image] | None = None,
                       paths: list[str] | None = None, prompts: list[str] | None = None) -> dict:
    """Per-set generation metrics (seed Table 5 columns + Diffusion-4K detail metrics + named stand-ins).

    ``real``: the reference for FID and the FD stand-in (a :class:`Reference`, or images to build one from);
    ``paths``/``prompts``: the images' files and prompts (HPSv3 scores an image against its prompt)."""
    from ultraflux.data.scorers import hasler_colorfulness, laplacian_sharpness

    arrays = [np.asarray(im.convert("RGB")) for im in images]
    out: dict = {"num_images": len(images),
                 "glcm_score": float(np.mean([glcm_score(im) for im in images])),
                 "compression_ratio": float(np.mean([compression_ratio(im) for im in images])),
                 "standin_sharpness": float(np.mean([laplacian_sharpness(a) for a in arrays])),
                 "standin_colorfulness": float(np.mean([hasler_colorfulness(a) for a in arrays]))}
    fid_weights = params["evaluate"]["fid_inception_weights"]
    if isinstance(real, list):
        real = build_reference(real, fid_weights) if real else None
    if real is not None and real.num_images:
        out["standin_fd_thumb8"] = frechet_distance(thumb_features(images), real.thumbs)
    for metric in ("fid", "hpsv3", "artimuse", "qalign"):
        section, key = LEARNED_METRICS[metric].split(".")
        weights = params[section][key]
        if not weights:
            out[metric] = not_computed(metric)
        elif metric == "fid" and real is not None and real.num_images:
            out[metric] = fid(real, images)
        elif metric == "hpsv3" and paths and prompts:
            out[metric] = hpsv3(paths, prompts, weights)
        elif metric in ("qalign", "artimuse"):  # the curation scorers (ultraflux.data.scorers), same checkpoints
            from ultraflux.data.scorers import make_scorer

            scorer_cfg = {"weights": weights, "batch_size": 8, "code_dir": params["evaluate"]["artimuse_code_dir"]}
            try:
                scorer = make_scorer("quality" if metric == "qalign" else "aesthetic", scorer_cfg)
                out[metric] = float(np.mean(scorer.score(arrays)))
            except (FileNotFoundError, ImportError, RuntimeError, OSError) as e:
                out[metric] = failed(metric, e)
        else:  # weights given but this scorer has no backend in this build: say so rather than guess
            out[metric] = f"not computed (no {metric} backend in this build; weights at {LEARNED_METRICS[metric]})"
    return out
