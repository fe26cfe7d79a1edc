"""A procedural, captioned image set for the tiny profile (``data.source: ""``), deterministic in
``seed`` + ``data.synthetic`` (``num_images``, ``long_side``).

Scenes, at aspect ratios drawn from the bucket names (+-5% jitter), long side ``long_side``:

* ``landscape``: fractal (1/f) noise terrain layers under a sky gradient, with fine grain;
* ``texture``: colour gradients modulated by fractal texture and stripes;
* ``shapes``: random discs, rectangles and lines on a textured background;

plus deliberately bad ones so that every filter has work to do:

* ``flat`` (~15%): a smooth full-range colour gradient: high entropy, but almost every 240-px patch has
  S_flat << 800 -> rejected "flat";
* ``low_entropy`` (~10%): a strongly textured scene posterised to 4 grey levels: S_flat >> 800 but H = 2 bits
  -> rejected "low_entropy";
* ``small`` (~5%): a good landscape at a quarter of ``long_side``, below every bucket by more than
  ``curate.max_upscale`` -> rejected "too_small";
* one good landscape with an empty caption (when num_images >= 10) -> rejected "no_caption".

Quality and aesthetic filters are percentile based and always reject some of the rest.
Images are written as PNG with a Hugging Face ``metadata.jsonl`` (file_name, text) and a ``.params.json`` stamp; an
existing folder with the same stamp is reused (generation is skipped), otherwise it is regenerated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .buckets import DEFAULT_ASPECTS, parse_aspect

PALETTES = {
    "alpine": [(40, 70, 40), (90, 110, 70), (150, 150, 140), (240, 240, 245)],
    "desert": [(120, 70, 30), (190, 130, 70), (225, 180, 120), (250, 225, 180)],
    "autumn": [(70, 30, 10), (160, 70, 20), (210, 140, 40), (240, 200, 120)],
    "coastal": [(10, 50, 90), (30, 110, 140), (200, 190, 150), (240, 235, 210)],
    "volcanic": [(20, 15, 15), (80, 30, 20), (170, 60, 20), (250, 170, 60)],
}
SKIES = {"dawn": ((250, 170, 120), (90, 110, 180)), "noon": ((170, 210, 250), (40, 90, 190)),
         "dusk": ((250, 120, 80), (40, 30, 90)), "overcast": ((210, 210, 215), (120, 125, 135))}


def fractal_noise(rng: np.random.Generator, height: int, width: int, smallest: int = 2,
                  beta: float = 0.9) -> np.ndarray:
    """Sum of bicubically upsampled random grids, octave amplitude ~ period^beta; float32 in [0, 1]."""
    out = np.zeros((height, width), np.float32)
    period = max(height, width)
    while period >= smallest:
        grid = rng.random((height // period + 3, width // period + 3), dtype=np.float32)
        big = cv2.resize(grid, ((width // period + 3) * period, (height // period + 3) * period),
                         interpolation=cv2.INTER_CUBIC)
        out += big[period : period + height, period : period + width] * period ** beta
        period //= 2
    out -= out.min()
    return out / max(float(out.max()), 1e-6)


def _colormap(values: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    stops = np.linspace(0, 1, len(palette))
    cols = np.array(palette, np.float32)
    return np.stack([np.interp(values, stops, cols[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def _grain(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    """Stretch the 1-99% range to 5-250 (auto-levels, like a photo editor) and add luminance grain."""
    lo, hi = np.percentile(img, [1, 99])
    img = (img - lo) * (245.0 / max(float(hi - lo), 1.0)) + 5
    return np.clip(img + rng.normal(0, sigma, img.shape[:2])[..., None], 0, 255).astype(np.uint8)


def landscape(rng, h: int, w: int, palette: str, sky: str) -> np.ndarray:
    top, bottom = (np.array(c, np.float32) for c in SKIES[sky])
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()
    img += (fractal_noise(rng, h, w, smallest=4)[..., None] - 0.5) * 40  # clouds
    for layer in range(3):
        ridge = fractal_noise(rng, 1, w, smallest=2)[0]
        base = h * (0.35 + 0.2 * layer) + (ridge - 0.5) * h * 0.35
        mask = np.arange(h)[:, None] > base[None, :]
        tex = fractal_noise(rng, h, w, smallest=2, beta=0.7)
        colour = _colormap(np.clip(tex * 0.8 + 0.1 * layer, 0, 1), PALETTES[palette])
        img[mask] = colour[mask]
    return _grain(rng, img, 14)


def texture(rng, h: int, w: int, palette: str, sky: str) -> np.ndarray:
    a, b = (np.array(c, np.float32) for c in SKIES[sky])
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = a * (1 - x) + b * x
    tex = fractal_noise(rng, h, w, smallest=2, beta=0.6)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx * rng.uniform(0.05, 0.2) + yy * rng.uniform(0.05, 0.2)) + tex * 8)
    img = img * (0.5 + 0.5 * tex[..., None]) + _colormap((stripes + 1) / 2, PALETTES[palette]) * 0.5
    return _grain(rng, img, 12)


def shapes(rng, h: int, w: int, palette: str, sky: str) -> np.ndarray:
    img = _colormap(fractal_noise(rng, h, w, smallest=2, beta=0.7), PALETTES[palette])
    colours = list(SKIES[sky]) + PALETTES[palette]
    for _ in range(int(rng.integers(12, 30))):
        colour = tuple(float(v) for v in colours[int(rng.integers(len(colours)))])
        x, y = int(rng.integers(w)), int(rng.integers(h))
        size = int(rng.integers(max(4, min(h, w) // 30), max(8, min(h, w) // 4)))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.circle(img, (x, y), size, colour, -1, lineType=cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + size, y + size // 2), colour, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(w)), int(rng.integers(h))), colour, max(1, size // 10),
                     lineType=cv2.LINE_AA)
    return _grain(rng, img, 14)


def flat_gradient(rng, h: int, w: int, palette: str, sky: str) -> np.ndarray:
    """Smooth full-range gradient: entropy ~8 bits, S_flat ~0 everywhere (the "flat" reject)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi / 2)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / (w * np.cos(angle) + h * np.sin(angle))
    dark, light = np.array((10, 5, 30), np.float32), np.full(3, 250, np.float32)
    img = dark * (1 - t[..., None]) + light * t[..., None]
    return np.clip(img + rng.uniform(-0.5, 0.5, (h, w, 1)), 0, 255).astype(np.uint8)


def posterised(rng, h: int, w: int, palette: str, sky: str) -> np.ndarray:
    """A textured scene quantised to 4 grey levels: strong edges, entropy <= 2 bits (the "low_entropy" reject)."""
    gray = fractal_noise(rng, h, w, smallest=2, beta=0.5)
    levels = np.floor(np.clip(gray, 0, 0.999) * 4) * 85
    return np.repeat(levels.astype(np.uint8)[..., None], 3, axis=2)


SCENES = {"landscape": landscape, "texture": texture, "shapes": shapes, "flat": flat_gradient,
          "low_entropy": posterised}


def plan(num_images: int, seed: int) -> list[dict]:
    """Deterministic list of image specs: kind, aspect, palette, sky, caption."""
    rng = np.random.default_rng([seed, 4242])
    n_flat = max(1, round(0.15 * num_images))
    n_low = max(1, round(0.10 * num_images))
    n_small = max(1, round(0.05 * num_images))
    n_nocap = 1 if num_images >= 10 else 0
    n_good = max(0, num_images - n_flat - n_low - n_small - n_nocap)
    kinds = (["flat"] * n_flat + ["low_entropy"] * n_low + ["small"] * n_small + ["nocaption"] * n_nocap
             + [["landscape", "texture", "shapes"][i % 3] for i in range(n_good)])[:num_images]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    specs = []
    for i, kind in enumerate(kinds):
        palette = sorted(PALETTES)[int(rng.integers(len(PALETTES)))]
        sky = sorted(SKIES)[int(rng.integers(len(SKIES)))]
        aspect = parse_aspect(DEFAULT_ASPECTS[int(rng.integers(len(DEFAULT_ASPECTS)))]) * float(
            np.exp(rng.uniform(-0.05, 0.05)))
        scene = {"small": "landscape", "nocaption": "landscape"}.get(kind, kind)
        caption = {
            "landscape": f"A {palette} landscape of layered hills under a {sky} sky, fine natural texture.",
            "texture": f"An abstract {palette} texture with flowing stripes over a {sky}-coloured gradient.",
            "shapes": f"Colourful geometric shapes scattered over a {palette} textured background at {sky}.",
            "flat": f"A smooth, empty colour gradient fading to white, {sky} mood.",
            "low_entropy": "A posterised four-tone grey pattern of blobs.",
        }[scene]
        if kind == "nocaption":
            caption = ""
        specs.append({"index": i, "kind": kind, "scene": scene, "aspect": aspect, "palette": palette, "sky": sky,
                      "caption": caption, "seed": [seed, 777, i]})
    return specs


def render(spec: dict, long_side: int) -> np.ndarray:
    """The RGB uint8 image of one spec."""
    side = long_side // 4 if spec["kind"] == "small" else long_side
    a = spec["aspect"]
    w, h = (side, max(8, round(side / a))) if a >= 1 else (max(8, round(side * a)), side)
    rng = np.random.default_rng(spec["seed"])
    return SCENES[spec["scene"]](rng, h, w, spec["palette"], spec["sky"])


def generate(folder: Path, num_images: int, long_side: int, seed: int) -> Path:
    """Write the procedural set to ``folder`` (PNG + metadata.jsonl) unless it is already there; returns folder."""
    folder = Path(folder)
    stamp = {"num_images": int(num_images), "long_side": int(long_side), "seed": int(seed), "version": 1}
    stamp_file = folder / ".params.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lines = []
    for spec in plan(num_images, seed):
        name = f"synth_{spec['index']:05d}_{spec['kind']}.png"
        Image.fromarray(render(spec, long_side)).save(tmp / name, compress_level=1)
        lines.append(json.dumps({"file_name": name, "text": spec["caption"]}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp / ".params.json").write_text(json.dumps(stamp))
    os.replace(tmp, folder)
    return folder
