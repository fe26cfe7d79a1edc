"""Curation cost at 4K, end to end through ``run_curation`` (the `curate` stage's entry point), as a ratio to a
Pillow RGB decode of the same files measured in the same run.

    python benchmarks/bench_curate.py [--images 24] [--repeats 3] [--resize] [--gray [--photos DIR]]

Images: ``--images`` DISTINCT JPEGs (q95), half 4096x4096 and half 5120x2880, photo-like: a procedural scene of
:mod:`ultraflux.data.synthetic` rendered at 1/4 size, upscaled, with its own high-frequency detail tiled back at
full resolution and film grain (full-size procedural rendering takes ~20 s per 4K image); "texture-poor" images are
the same scenes rendered at 1/16 size and upscaled (smooth, as a sky or a studio backdrop). Cached under the temp
folder. One worker, one OpenCV/torch thread. Each repeat times, interleaved, (1) a Pillow RGB decode of every file
(``np.asarray(Image.open(f).convert("RGB"))``, the public tool's load) and (2) a full ``run_curation`` into a fresh
output folder and cache (no cache hits); the table reports medians.

Scenarios (issue #10 budget): (a) half the images texture-poor (rejected as flat), the other half all kept
(quality/aesthetic keep fractions 1.0): <= 1.75x; (b) all kept: <= 2.5x. Also: the statistics (per-patch flatness +
entropy, :mod:`ultraflux.data.stats`) as a ratio to the decode. ``--resize`` compares the resize candidates (speed
and quality), ``--gray`` the JPEG-luma vs OpenCV-from-RGB gray image (flat fractions, entropy, verdicts, cost).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultraflux.config import load_params  # noqa: E402
from ultraflux.data import synthetic  # noqa: E402
from ultraflux.data.curate import run_curation  # noqa: E402
from ultraflux.data.decode import decode_gray, decode_small, read_header  # noqa: E402
from ultraflux.data.rule import texture_reason  # noqa: E402
from ultraflux.data.stats import entropy_bits, flat_summary, patch_flatness  # noqa: E402

SIZES = [(4096, 4096), (5120, 2880)]
CACHE = Path(tempfile.gettempdir()) / "ultraflux-bench-curate-v1"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ images


def photo_like(width: int, height: int, seed: int, smooth: bool) -> np.ndarray:
    """A distinct photo-like RGB image (module docstring); ``smooth`` = texture-poor."""
    kinds = ["landscape", "texture", "shapes"]
    spec = {"kind": kinds[seed % 3], "scene": kinds[seed % 3], "aspect": width / height,
            "palette": sorted(synthetic.PALETTES)[seed % 5], "sky": sorted(synthetic.SKIES)[seed % 4],
            "seed": [seed, 99]}
    small = synthetic.render(spec, max(width, height) // (16 if smooth else 4))
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    rng = np.random.default_rng(seed)
    if not smooth:  # the scene's own fine detail, tiled at full resolution
        detail = small.astype(np.float32) - cv2.GaussianBlur(small, (0, 0), 1.5).astype(np.float32)
        reps = (-(-height // detail.shape[0]), -(-width // detail.shape[1]), 1)
        img += 0.8 * np.tile(detail, reps)[:height, :width]
        img += rng.normal(0, 4.0, (height, width, 1)).astype(np.float32)
    else:
        img += rng.normal(0, 1.0, (height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_set(n: int, poor: int, tag: str) -> Path:
    """``n`` distinct JPEG q95 files (``poor`` of them texture-poor) with captions; cached."""
    folder = CACHE / f"{tag}-{n}-{poor}"
    if (folder / ".done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        width, height = SIZES[i % 2]
        smooth = poor > 0 and (i // 2) % 2 == 1 and i < 2 * poor  # pairs alternate: both sizes in each half
        name = f"img_{i:03d}_{width}x{height}{'_poor' if smooth else ''}"
        arr = photo_like(width, height, 1000 * (poor > 0) + i, smooth)
        Image.fromarray(arr).save(folder / f"{name}.jpg", "JPEG", quality=95)
        (folder / f"{name}.txt").write_text(f"benchmark image {i}")
        print(f"  generated {folder.name}/{name}.jpg", flush=True)
    (folder / ".done").write_text("")
    return folder


# ------------------------------------------------------------------------------------------------ timing


def pillow_decode_all(files: list[Path]) -> None:
    for f in files:
        np.asarray(Image.open(f).convert("RGB"))


def bench_params(source: Path, cache: Path, all_kept: bool, gray: str | None = None) -> dict:
    """params.yaml at the 4K table, one worker; ``gray`` overrides curate.gray (None: params.yaml's)."""
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["data"].update({"source": str(source), "variant": "multiaspect"})
    # entropy_min 0: every textured image reaches pass 2 (a few photo-like scenes fall just under 7.0 bits), so
    # "kept" is exactly the textured images; the texture-poor ones are rejected by the flat filter.
    params["curate"].update({"engine": "local", "workers": 1, "cache_dir": str(cache), "min_train_images": 1,
                             "entropy_min": 0.0, "gray": gray or params["curate"]["gray"],
                             "min_holdout_images": 0, "buckets": {"scale": 1.0,
                                                                  "aspects": params["curate"]["buckets"]["aspects"]}})
    if all_kept:
        params["curate"]["quality"] = {**params["curate"]["quality"], "standin_keep_fraction": 1.0}
        params["curate"]["aesthetic"] = {**params["curate"]["aesthetic"], "keep_top": 1.0}
    return params


def scenario(source: Path, repeats: int, gray: str | None) -> dict:
    files = sorted(source.glob("*.jpg"))
    decode, curate, metrics = [], [], {}
    for r in range(repeats + 1):  # the first round warms caches and imports and is not counted
        t = time.perf_counter()
        pillow_decode_all(files)
        d = time.perf_counter() - t
        work = Path(tempfile.mkdtemp(prefix="bench-curate-"))
        try:
            t = time.perf_counter()
            metrics = run_curation(bench_params(source, work / "cache", True, gray), work / "out", progress=False)
            c = time.perf_counter() - t
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if r:
            decode.append(d)
            curate.append(c)
    d, c = statistics.median(decode), statistics.median(curate)
    return {"n": len(files), "decode_s": d, "curate_s": c, "ratio": c / d, "kept": metrics["num_kept"],
            "rejected_flat": metrics["rejected_flat"], "img_s_core": len(files) / c}


def stats_cost(files: list[Path], repeats: int) -> dict:
    """Per-image statistics cost (flatness + entropy on the gray image) and the decodes, medians over files."""
    rows = {"pillow_rgb": [], "cv2_rgb": [], "gray_luma": [], "stats": [], "small_rgb": []}
    for f in files:
        data = f.read_bytes()
        header = read_header(data)
        gray, _ = decode_gray(data, header, "luma")
        times = {k: [] for k in rows}
        for _ in range(repeats):
            t = time.perf_counter()
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            times["pillow_rgb"].append(time.perf_counter() - t)
            t = time.perf_counter()
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            times["cv2_rgb"].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode_gray(data, header, "luma")
            times["gray_luma"].append(time.perf_counter() - t)
            t = time.perf_counter()
            patch_flatness(gray, 240)
            entropy_bits(gray)
            times["stats"].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode_small(data, header, 512)
            times["small_rgb"].append(time.perf_counter() - t)
        for k in rows:
            rows[k].append(statistics.median(times[k]))
    return {k: statistics.median(v) for k, v in rows.items()}


# ------------------------------------------------------------------------------------------------ extra tables


def resize_table(repeats: int) -> None:
    import torch

    from ultraflux.data.process import resize_to

    rgb = photo_like(4096, 4096, 7, False)
    data = io.BytesIO()
    Image.fromarray(rgb).save(data, "JPEG", quality=95)
    jpeg = data.getvalue()
    n = 4096
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    zone = np.repeat((127.5 + 127.5 * np.cos(np.pi * ((x - n / 2) ** 2 + (y - n / 2) ** 2) / n)).astype(np.uint8)
                     [..., None], 3, axis=2)

    def torch_aa(a, size, mode):
        t = torch.from_numpy(a).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(t, (size[1], size[0]), mode=mode, antialias=True)[0].permute(
            1, 2, 0).numpy()

    methods = {
        "Pillow LANCZOS (reference)": lambda a, s: np.asarray(Image.fromarray(a).resize(s, Image.Resampling.LANCZOS)),
        "Pillow reduce+LANCZOS": lambda a, s: np.asarray(Image.fromarray(a).resize(s, Image.Resampling.LANCZOS,
                                                                                   reducing_gap=2.0)),
        "cv2 INTER_CUBIC": lambda a, s: cv2.resize(a, s, interpolation=cv2.INTER_CUBIC),
        "cv2 INTER_AREA": lambda a, s: cv2.resize(a, s, interpolation=cv2.INTER_AREA),
        "cv2 INTER_LINEAR": lambda a, s: cv2.resize(a, s, interpolation=cv2.INTER_LINEAR),
        "torch bicubic antialias u8": lambda a, s: torch_aa(a, s, "bicubic"),
        "torch bilinear antialias u8": lambda a, s: torch_aa(a, s, "bilinear"),
        "ours (process.resize_to)": lambda a, s: resize_to(a, s),
    }

    def psnr(a, b):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)

    print("\nResize 4096^2 -> target (one thread), time as a ratio to a Pillow RGB decode of a 4096^2 q95 JPEG; "
          "PSNR (dB) to Pillow's Lanczos on a photo-like image and on a zone plate (aliasing):")
    print(f"{'method':>30} | " + " | ".join(f"{t:>26}" for t in ("3840 (0.9375)", "3072 (0.75)", "2458 (0.6)")))
    dec = statistics.median([_timed(lambda: np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
                             for _ in range(repeats)])
    targets = [(3840, 3840), (3072, 3072), (2458, 2458)]
    refs = {s: (methods["Pillow LANCZOS (reference)"](rgb, s), methods["Pillow LANCZOS (reference)"](zone, s))
            for s in targets}
    for name, fn in methods.items():
        cells = []
        for s in targets:
            t = statistics.median([_timed(lambda: fn(rgb, s)) for _ in range(repeats)])
            cells.append(f"{t / dec:5.2f}x {psnr(fn(rgb, s), refs[s][0]):5.1f} {psnr(fn(zone, s), refs[s][1]):5.1f}dB")
        print(f"{name:>30} | " + " | ".join(f"{c:>26}" for c in cells), flush=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gray_table(files: list[Path], repeats: int) -> None:
    """JPEG luma vs OpenCV's gray of the RGB decode: statistics, verdicts, cost."""
    params = load_params(ROOT / "params.yaml")["curate"]
    thr, max_frac, h_min = params["flat"]["threshold"], params["flat"]["max_fraction"], params["entropy_min"]
    print(f"\nGray image of the filters on {len(files)} JPEGs: curate.gray = luma (decoder's Y) vs opencv (cv2 "
          "RGB2GRAY of the RGB decode = the public tool). Thresholds: S_flat < "
          f"{thr:g}, flat if fraction > {max_frac}, entropy < {h_min}.")
    print(f"{'image':>34} {'size':>10} {'px differ':>9} {'flat frac luma/opencv':>22} {'d_patches':>9} "
          f"{'H luma':>8} {'H opencv':>8} {'verdict':>9} {'t luma':>7} {'t opencv':>8}")
    flips = changed = 0
    dfrac, dH, tl, to = [], [], [], []
    for f in files:
        data = f.read_bytes()
        header = read_header(data)
        luma, _ = decode_gray(data, header, "luma")
        exact, _ = decode_gray(data, header, "opencv")
        sl, se = patch_flatness(luma), patch_flatness(exact)
        fl, fe = flat_summary(sl, thr)[0], flat_summary(se, thr)[0]
        hl, he = entropy_bits(luma), entropy_bits(exact)
        vl = texture_reason(fl, hl, max_frac, h_min) or "keep"
        ve = texture_reason(fe, he, max_frac, h_min) or "keep"
        flips += vl != ve
        changed += int(((sl < thr) != (se < thr)).sum())
        dfrac.append(abs(fl - fe))
        dH.append(abs(hl - he))
        t_l = statistics.median([_timed(lambda: decode_gray(data, header, "luma")) for _ in range(repeats)])
        t_o = statistics.median([_timed(lambda: decode_gray(data, header, "opencv")) for _ in range(repeats)])
        tl.append(t_l)
        to.append(t_o)
        print(f"{f.name[:34]:>34} {f'{luma.shape[1]}x{luma.shape[0]}':>10} {np.mean(luma != exact):9.3f} "
              f"{fl:10.4f}/{fe:.4f} {int(((sl < thr) != (se < thr)).sum()):9d} {hl:8.4f} {he:8.4f} "
              f"{vl + ('=' if vl == ve else '!'):>9} {t_l * 1e3:6.0f}ms {t_o * 1e3:7.0f}ms", flush=True)
    print(f"summary: max |d flat fraction| {max(dfrac):.4f}, mean {np.mean(dfrac):.4f}; patches whose verdict "
          f"changes {changed}; max |d entropy| {max(dH):.4f} bits, mean {np.mean(dH):.4f}; image verdict flips "
          f"{flips}/{len(files)}; gray decode median {np.median(tl) * 1e3:.0f} ms (luma) vs "
          f"{np.median(to) * 1e3:.0f} ms (opencv)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="distinct images per scenario (>= 24 for #10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resize", action="store_true", help="also print the resize comparison")
    parser.add_argument("--gray", action="store_true", help="also print the luma vs OpenCV gray comparison")
    parser.add_argument("--photos", type=Path, help="folder of real JPEGs for --gray (default: the bench set)")
    parser.add_argument("--skip-curation", action="store_true", help="only the extra tables")
    parser.add_argument("--gray-mode", choices=["luma", "opencv"], default=None,
                        help="curate.gray for the runs (default: params.yaml's)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    print(f"one worker, one thread; OpenCV {cv2.__version__}, Pillow {Image.__version__}, numpy {np.__version__}; "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; medians of {args.repeats}", flush=True)
    half = make_set(args.images, args.images // 2, "half-poor")
    full = make_set(args.images, 0, "all-textured")
    if not args.skip_curation:
        print(f"\ncurate.gray = {args.gray_mode or load_params(ROOT / 'params.yaml')['curate']['gray']}")
        print(f"{'scenario':>36} {'n':>3} {'Pillow decode s':>15} {'run_curation s':>14} {'ratio':>6} "
              f"{'budget':>6} {'kept':>4} {'flat':>4} {'img/s/core':>10}")
        for label, folder, budget in (("(a) half texture-poor, rest kept", half, 1.75),
                                      ("(b) all kept", full, 2.5)):
            r = scenario(folder, args.repeats, args.gray_mode)
            print(f"{label:>36} {r['n']:3d} {r['decode_s']:15.2f} {r['curate_s']:14.2f} {r['ratio']:5.2f}x "
                  f"{budget:5.2f}x {r['kept']:4d} {r['rejected_flat']:4d} {r['img_s_core']:10.2f}", flush=True)
        s = stats_cost(sorted(full.glob("*.jpg")), args.repeats)
        print(f"\nper image (median): Pillow RGB decode {s['pillow_rgb'] * 1e3:.0f} ms, OpenCV RGB decode "
              f"{s['cv2_rgb'] * 1e3:.0f} ms, gray (luma) decode {s['gray_luma'] * 1e3:.0f} ms, statistics "
              f"(per-patch flatness + entropy) {s['stats'] * 1e3:.0f} ms = {s['stats'] / s['pillow_rgb']:.2f}x the "
              f"Pillow decode ({s['stats'] / s['cv2_rgb']:.2f}x the OpenCV decode); 512-px colour copy for the "
              f"stand-ins (DCT-scaled decode) {s['small_rgb'] * 1e3:.0f} ms = {s['small_rgb'] / s['pillow_rgb']:.2f}x")
    if args.resize:
        resize_table(args.repeats)
    if args.gray:
        files = sorted((args.photos or half).glob("*.jp*g"))
        gray_table(files, args.repeats)


if __name__ == "__main__":
    main()
