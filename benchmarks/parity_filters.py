"""Flatness and entropy filters (seed Sec. 2.1): ``ultraflux curate-stats`` (run outside the repository, on the
schema's defaults, and inside it, on params.yaml), the curate stage (``run_curation``) and the public filtering
tool's formulas (UltraFlux ``tools/filtering_pipeline.py``: PIL RGB decode, OpenCV BGR2GRAY, scikit-image's
``shannon_entropy``, a 240-px Sobel-magnitude variance grid) on the same files, side by side.

The files: the real photographs shipped with scikit-image, and two 3840x2160 PNGs whose gray histogram is built
so that H is exactly 7.0 bits and just below it (6.99999...): the seed's rule drops H < 7.0, so the second must be
rejected by all three and the first kept, with no rounding anywhere.

    python benchmarks/parity_filters.py        # prints one table; exit 1 when any verdict or value disagrees
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png", "camera.png", "moon.png", "brick.png", "grass.png", "gravel.png", "coins.png")
ENTROPY_MIN, FLAT_MAX, PATCH, THRESHOLD = 7.0, 0.5, 240, 800.0   # the seed's numbers (schema defaults)


def histogram_image(moved: int, width: int = 3840, height: int = 2160, seed: int = 0) -> np.ndarray:
    """Gray levels 0, 2, ..., 254 (128 levels) in equal counts, then ``moved`` pixels moved from level 0 to level
    254, shuffled (textured: no flat patch). 0 moved: H = log2(128) = 7.0 exactly; more: H slightly below. UHD, so
    that the schema's 4K buckets do not reject it as too small."""
    levels = np.repeat(np.arange(0, 256, 2, dtype=np.uint8), width * height // 128)
    levels[:moved] = 254
    np.random.default_rng(seed).shuffle(levels)
    return np.repeat(levels.reshape(height, width)[..., None], 3, axis=2)


def near_seven(width: int = 3840, height: int = 2160) -> np.ndarray:
    """The histogram image with the largest entropy that is at most 7 - 1e-5 (found on the counts alone)."""
    n = width * height // 128

    def bits(moved: int) -> float:
        p = np.array([n - moved, n + moved] + [n] * 126, dtype=np.float64) / (128 * n)
        return float(-(p * np.log2(p)).sum())

    moved = next(k for k in range(1, n) if bits(k) <= 7.0 - 1e-5)
    return histogram_image(moved, width, height)


def tool_values(path: Path) -> tuple[float, float]:
    """(flat fraction, entropy) the way the public tool computes them (written from its formulas)."""
    from skimage.measure import shannon_entropy

    with Image.open(path) as im:
        bgr = cv2.cvtColor(np.array(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    flat = total = 0
    for y in range(0, gray.shape[0], PATCH):
        for x in range(0, gray.shape[1], PATCH):
            p = gray[y:y + PATCH, x:x + PATCH]
            if p.shape == (PATCH, PATCH):
                total += 1
                sx, sy = cv2.Sobel(p, cv2.CV_64F, 1, 0, ksize=3), cv2.Sobel(p, cv2.CV_64F, 0, 1, ksize=3)
                flat += np.sqrt(sx ** 2 + sy ** 2).var() < THRESHOLD
    return (flat / total if total else 0.0), float(shannon_entropy(gray))


def texture_verdict(flat: float, entropy: float) -> str:
    return "flat" if flat > FLAT_MAX else "low_entropy" if entropy < ENTROPY_MIN else "kept"


def curate_stats(files: list[Path], cwd: Path, params: Path | None) -> dict[str, dict]:
    cmd = ["ultraflux", "curate-stats", *map(str, files)] + (["--params", str(params)] if params else [])
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
    return {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}


def stage_rows(folder: Path, work: Path) -> dict[str, dict]:
    """The curate stage's manifest rows (the repository's params.yaml, ``data.source`` = the folder)."""
    from ultraflux.config import load_validated
    from ultraflux.data.curate import TooFewImages, run_curation

    params = load_validated(ROOT / "params.yaml", check_paths=False)
    params["data"]["source"] = str(folder)
    params["curate"]["cache_dir"] = str(work / "cache")
    try:
        run_curation(params, work / "curated", progress=False)
    except TooFewImages:   # a dozen photos: the manifest is written before the minimum check stops the run
        pass
    manifest = pd.read_parquet(work / "curated" / "manifest.parquet")
    return {Path(r["source"]).name: r for r in manifest.to_dict("records")}


def main() -> int:
    from skimage import data

    with tempfile.TemporaryDirectory(prefix="ultraflux-parity-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        shipped = Path(data.__file__).parent   # the photographs' own files (PNG and JPEG), copied as they are
        for name in PHOTOS:
            shutil.copy(shipped / name, folder / name)
        Image.fromarray(near_seven()).save(folder / "h_6.99999.png")
        Image.fromarray(histogram_image(0)).save(folder / "h_7.0.png")
        files = sorted(folder.iterdir())
        outside = curate_stats(files, cwd=tmp, params=None)           # no params.yaml there: schema defaults
        inside = curate_stats(files, cwd=ROOT, params=ROOT / "params.yaml")
        stage = stage_rows(folder, tmp / "work")
        rows, bad = [], 0
        for f in files:
            flat, h = tool_values(f)
            o, i, s = outside[f.name], inside[f.name], stage[f.name]
            tool, s_verdict = texture_verdict(flat, h), texture_verdict(s["s_flat_fraction"], s["entropy"])
            by_cli = [r["reason"] or "kept" for r in (o, i)]
            same = (o["entropy"] == i["entropy"] == s["entropy"] and math.isclose(h, s["entropy"], abs_tol=1e-12)
                    and o["s_flat_fraction"] == s["s_flat_fraction"] == flat and tool == s_verdict
                    and all(v in (tool, "too_small") for v in by_cli))   # too_small: decided before the texture
            bad += not same
            rows.append({"image": f.name, "size": "x".join(map(str, Image.open(f).size)), "H tool": f"{h:.7f}",
                         "H cli(out)": f"{o['entropy']:.7f}", "H stage": f"{s['entropy']:.7f}",
                         "flat tool": round(flat, 4), "flat stage": round(s["s_flat_fraction"], 4),
                         "tool": tool, "stage": s_verdict, "cli(out)": by_cli[0], "cli(repo)": by_cli[1],
                         "same": "yes" if same else "NO"})
        print(pd.DataFrame(rows).to_string(index=False))
        h_near = stage["h_6.99999.png"]["entropy"]
        print(f"\nH of the near-7 image: {h_near!r} (< 7.0 by {7.0 - h_near:.2e}); cli(out) = curate-stats run in "
              f"{tmp} on the schema defaults (4K buckets: small photos are too_small there), cli(repo) = on "
              f"params.yaml; the texture verdict ignores the size check. {len(files) - bad}/{len(files)} agree.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
