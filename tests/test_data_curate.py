"""run_curation end to end on small sets: filters, bad inputs, determinism, resume, baseline, engines, CLI."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from data_fixtures import bomb_png, exif_rotated_jpeg, jpeg_bytes, png_bytes, textured, write
from ultraflux.config import load_params
from ultraflux.data import process
from ultraflux.cli.curate_stats import main as cli_curate_stats
from ultraflux.data.curate import MANIFEST_COLUMNS, run_curation
from ultraflux.data.ingest import SourceError

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def base_params(**curate_overrides) -> dict:
    params = load_params(PARAMS_FILE) if PARAMS_FILE.is_file() else {}
    params = copy.deepcopy(params)
    params.setdefault("seed", 0)
    params.setdefault("data", {}).update({"variant": "multiaspect", "source": "",
                                          "synthetic": {"num_images": 20, "long_side": 768}})
    curate = params.setdefault("curate", {})
    curate.update({"engine": "local", "workers": 1, "cache_dir": "", "min_train_images": 1, "min_holdout_images": 0,
                   "flat": {"patch": 240, "threshold": 800.0, "max_fraction": 0.5},
                   "entropy_min": 7.0, "max_upscale": 1.5, "holdout_fraction": 0.1,
                   "quality": {"weights": "", "threshold": 4.0, "standin_keep_fraction": 0.9},
                   "aesthetic": {"weights": "", "keep_top": 0.3, "stage2_top": 0.05},
                   "buckets": {"scale": 0.125, "aspects": ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1",
                                                           "1:2", "2.39:1", "1:2.39"]}})
    curate.update(curate_overrides)
    return params


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    metrics = run_curation(base_params(), out, progress=False)
    return out, metrics


def test_synthetic_manifest_schema_and_filters(synthetic_run):
    out, metrics = synthetic_run
    df = manifest(out)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 20 == metrics["num_sources"]
    assert df["id"].is_unique
    reasons = dict(zip(df["source"].map(lambda s: Path(s).stem.split("_", 2)[2]), df["reason"]))
    by_kind = df.assign(kind=df["source"].map(lambda s: Path(s).stem.split("_", 2)[2]))
    assert set(by_kind.loc[by_kind.kind == "flat", "reason"]) == {"flat"}
    assert set(by_kind.loc[by_kind.kind == "low_entropy", "reason"]) == {"low_entropy"}
    assert set(by_kind.loc[by_kind.kind == "small", "reason"]) == {"too_small"}
    assert set(by_kind.loc[by_kind.kind == "nocaption", "reason"]) == {"no_caption"}
    assert {"low_quality", "low_aesthetic"} <= set(df["reason"]), reasons
    kept = df[df["kept"]]
    assert len(kept) == metrics["num_kept"] > 0
    assert (kept["reason"] == "").all() and (df.loc[~df["kept"], "reason"] != "").all()
    assert df["stage2"].sum() == metrics["num_stage2"] >= 1
    assert not (df["stage2"] & ~df["kept"]).any()
    assert (df.loc[df["stage2"], "split"] == "train").all()
    assert df.loc[df["stage2"], "aesthetic"].min() >= df.loc[df["kept"] & (df["split"] == "train") & ~df["stage2"],
                                                               "aesthetic"].max()
    assert metrics["quality_scorer"] == "standin:laplacian-sharpness"
    assert set(df["aesthetic_scorer"]) == {"standin:hasler-colorfulness"}
    for _, row in kept.iterrows():
        with Image.open(out / row["image"]) as im:
            assert im.size == (row["width"], row["height"])
        assert row["width"] % 32 == 0 and row["height"] % 32 == 0
    assert (df.loc[~df["kept"], "image"] == "").all()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(p).name for p in kept["image"])
    ranks = kept["texture_rank"].sort_values().to_numpy()
    assert ranks[-1] == 1.0 and np.all(np.diff(ranks) > 0)
    best = kept.loc[kept["texture_rank"].idxmax()]
    assert best["s_flat_mean"] == kept["s_flat_mean"].max()
    assert set(df["split"]) <= {"train", "holdout"} and (kept["split"] == "holdout").any()
    for name in ("s_flat_patches.png", "flat_fraction.png", "entropy.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert metrics["rejected_flat"] >= 1 and metrics["rejected_low_entropy"] >= 1
    assert json.loads((out / "metrics.json").read_text())["num_kept"] == metrics["num_kept"]


def test_rerun_is_cached_and_identical(synthetic_run, tmp_path):
    out, _ = synthetic_run
    before = manifest(out)
    process.COUNTERS["analyze"] = 0
    metrics = run_curation(base_params(), out, progress=False)
    assert process.COUNTERS["analyze"] == 0  # nothing recomputed
    assert metrics["_timing"]["cache_hits"] == 20
    pd.testing.assert_frame_equal(before, manifest(out))
    # a fresh output folder with the same params and seed gives the identical manifest (up to the source folder)
    run_curation(base_params(), tmp_path / "again", progress=False)
    fresh = manifest(tmp_path / "again")
    pd.testing.assert_frame_equal(before.drop(columns="source"), fresh.drop(columns="source"))
    assert (before["source"].map(lambda s: Path(s).name) == fresh["source"].map(lambda s: Path(s).name)).all()


def test_resume_after_interruption(tmp_path, monkeypatch):
    params = base_params()
    out = tmp_path / "out"
    real = process.analyze
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(process, "analyze", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_curation(params, out, progress=False)
    assert calls["n"] == 8
    calls["n"] = 100  # no more interruptions
    monkeypatch.setattr(process, "analyze", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    run_curation(params, out, progress=False)
    assert calls["n"] - 100 == 20 - 7  # only the 13 unfinished images were analysed
    assert not list(out.rglob("*.tmp"))


def test_threshold_change_recomputes_only_what_it_must(synthetic_run, tmp_path):
    out, first = synthetic_run
    process.COUNTERS["analyze"] = 0
    stricter = run_curation(base_params(entropy_min=7.3), out, progress=False)
    assert process.COUNTERS["analyze"] == 0  # a stricter cut-off only re-selects
    assert stricter["rejected_low_entropy"] > first["rejected_low_entropy"]
    looser = run_curation(base_params(entropy_min=0.0), out, progress=False)
    assert looser["rejected_low_entropy"] == 0
    # only the rows that newly pass the cheap filters are analysed again (to make their resized image)
    assert process.COUNTERS["analyze"] == first["rejected_low_entropy"]
    # restore the default outputs for other tests in this module
    run_curation(base_params(), out, progress=False)


def test_bad_inputs_each_get_a_reason_and_the_run_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = textured(512, 384, seed=1)
    write(src / "good.jpg", jpeg_bytes(good))
    write(src / "zero.jpg", b"")
    jpg = jpeg_bytes(textured(512, 384, seed=2))
    write(src / "truncated.jpg", jpg[: len(jpg) // 2])
    png = png_bytes(Image.fromarray(textured(512, 384, seed=3)))
    write(src / "truncated.png", png[: len(png) // 2])
    write(src / "text.jpg", b"not an image at all\n" * 20)
    write(src / "bomb.png", bomb_png(30000, 30000))
    buf = io.BytesIO()
    Image.fromarray(textured(512, 384, seed=4)).convert("CMYK").save(buf, "JPEG", quality=95)
    write(src / "cmyk.jpg", buf.getvalue())
    gray16 = textured(512, 384, seed=5)[..., 1].astype(np.uint16) * 257
    write(src / "sixteen.png", png_bytes(Image.fromarray(gray16)))
    write(src / "palette.png", png_bytes(Image.fromarray(textured(512, 384, seed=6)).convert("P")))
    rgba = np.dstack([textured(512, 384, seed=7), np.full((384, 512), 255, np.uint8)])
    write(src / "alpha.png", png_bytes(Image.fromarray(rgba, "RGBA")))
    write(src / "rotated.jpg", exif_rotated_jpeg(textured(512, 384, seed=8), orientation=6))
    write(src / "gray.png", png_bytes(Image.fromarray(textured(512, 384, seed=9)[..., 0])))
    write(src / "tiny.png", png_bytes(Image.fromarray(textured(64, 48, seed=10))))
    write(src / "nocaption.jpg", jpeg_bytes(textured(512, 384, seed=11)), caption=None)
    write(src / "emptycaption.jpg", jpeg_bytes(textured(512, 384, seed=12)), caption=b"   \n")
    write(src / "latin1.jpg", jpeg_bytes(textured(512, 384, seed=13)), caption="caf\xe9 au lait".encode("latin-1"))
    write(src / "zz_duplicate.jpg", jpeg_bytes(good))

    params = base_params(quality={"weights": "", "standin_keep_fraction": 1.0},
                         aesthetic={"weights": "", "keep_top": 1.0, "stage2_top": 0.05})
    params["data"]["source"] = str(src)
    metrics = run_curation(params, tmp_path / "out", progress=False)
    df = manifest(tmp_path / "out")
    reason = dict(zip(df["source"].map(lambda s: Path(s).name), df["reason"]))
    assert reason["zero.jpg"] == "unreadable: empty file"
    assert reason["truncated.jpg"].startswith("unreadable: ")
    assert reason["truncated.png"].startswith("unreadable: ")
    assert reason["text.jpg"].startswith("unreadable: ")
    assert reason["bomb.png"] == "decompression_bomb"
    assert reason["tiny.png"] == "too_small"
    assert reason["nocaption.jpg"] == "no_caption"
    assert reason["emptycaption.jpg"] == "no_caption"
    assert reason["latin1.jpg"].startswith("bad_caption: not UTF-8")
    assert reason["zz_duplicate.jpg"] == "duplicate: " + str(src / "good.jpg")
    for name in ("good.jpg", "cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "rotated.jpg", "gray.png"):
        assert reason[name] in ("", "flat", "low_entropy"), (name, reason[name])
    for name in ("good.jpg", "cmyk.jpg", "alpha.png", "rotated.jpg"):
        assert reason[name] == "", (name, reason[name])
    rotated = df[df["source"].str.endswith("rotated.jpg")].iloc[0]
    assert (rotated["orig_width"], rotated["orig_height"]) == (384, 512)  # EXIF applied before bucketing
    assert rotated["bucket"] == "3:4"
    assert metrics["num_sources"] == 17
    assert metrics["rejected_unreadable"] == 4 and metrics["rejected_decompression_bomb"] == 1
    row = df[df["source"].str.endswith("bomb.png")].iloc[0]
    assert np.isnan(row["entropy"]) and row["image"] == "" and not row["kept"]


def test_missing_source_fails_before_work(tmp_path):
    params = base_params()
    params["data"]["source"] = str(tmp_path / "nope")
    with pytest.raises(SourceError, match="data.source"):
        run_curation(params, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_weights_path_fails_before_work(tmp_path):
    params = base_params(quality={"weights": str(tmp_path / "no-qalign"), "threshold": 4.0})
    with pytest.raises(FileNotFoundError, match="curate.quality.weights"):
        run_curation(params, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_baseline_variant_is_square_without_curation(tmp_path):
    params = base_params()
    params["data"]["variant"] = "baseline"
    metrics = run_curation(params, tmp_path / "out", progress=False)
    df = manifest(tmp_path / "out")
    kept = df[df["kept"]]
    assert set(kept["bucket"]) == {"1:1"} and set(zip(kept["width"], kept["height"])) == {(480, 480)}
    assert set(df.loc[~df["kept"], "reason"]) == {"too_small", "no_caption"}  # flat/low-entropy images are kept
    assert metrics["rejected_flat"] == 0 and metrics["quality_scorer"] == "none"
    assert 1 <= df["stage2"].sum() <= len(kept) and not (df["stage2"] & ~df["kept"]).any()
    for _, row in kept.iterrows():
        with Image.open(tmp_path / "out" / row["image"]) as im:
            assert im.size == (480, 480)


def test_workers_pool_matches_serial(synthetic_run, tmp_path):
    out, _ = synthetic_run
    params = base_params(workers=2)
    params["data"]["source"] = str(out / "source")
    run_curation(params, tmp_path / "pool", progress=False)
    params1 = base_params(workers=1)
    params1["data"]["source"] = str(out / "source")
    run_curation(params1, tmp_path / "serial", progress=False)
    pd.testing.assert_frame_equal(manifest(tmp_path / "pool"), manifest(tmp_path / "serial"))


def test_ray_engine_matches_local(synthetic_run, tmp_path):
    ray = pytest.importorskip("ray", reason="ray[data] is not installed")
    out, _ = synthetic_run
    params = base_params(engine="ray", workers=2)
    params["data"]["source"] = str(out / "source")
    local = base_params(workers=2)
    local["data"]["source"] = str(out / "source")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_curation(params, tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    run_curation(local, tmp_path / "local", progress=False)
    pd.testing.assert_frame_equal(manifest(tmp_path / "ray"), manifest(tmp_path / "local"))


def test_cli_curate_stats(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base_params()))  # tiny-profile buckets (scale 0.125)
    flat = np.tile(np.linspace(0, 255, 600, dtype=np.float32), (480, 1)).astype(np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    Image.fromarray(textured(600, 480)).save(tmp_path / "tex.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert cli_curate_stats(["flat.png", "tex.png", "bad.jpg"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r) >= {"path", "s_flat_fraction", "entropy", "bucket", "kept", "reason"} for r in lines] == [True] * 3
    assert lines[0]["reason"] == "flat" and lines[0]["s_flat_fraction"] == 1.0 and not lines[0]["kept"]
    assert lines[1]["kept"] and lines[1]["reason"] == "" and lines[1]["bucket"] == "4:3"
    assert lines[2]["reason"].startswith("unreadable") and lines[2]["entropy"] is None
    (tmp_path / "params.yaml").unlink()  # seed defaults: 4K buckets, a 600x480 image is too small for them
    assert cli_curate_stats(["tex.png"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["reason"] == "too_small" and record["entropy"] > 7.0


def test_learned_quality_scorer_path_uses_threshold_and_cache(synthetic_run, tmp_path, monkeypatch):
    """A stand-in for a Q-Align checkpoint: the batched, cached main-process path and the 4.0 threshold."""
    from ultraflux.data import scorers

    out, _ = synthetic_run
    weights = tmp_path / "fake-qalign"
    weights.mkdir()
    calls = {"images": 0, "batches": 0}

    class FakeQAlign(scorers.Scorer):
        name, learned, batch_size = "q-align:fake-qalign", True, 3

        def score(self, images):
            calls["images"] += len(images)
            calls["batches"] += 1
            return [4.5 if float(im.mean()) > 110 else 3.5 for im in images]

    monkeypatch.setattr(scorers, "make_scorer", lambda kind, cfg: FakeQAlign())
    params = base_params(quality={"weights": str(weights), "threshold": 4.0})
    params["data"]["source"] = str(out / "source")
    run_curation(params, tmp_path / "learned", progress=False)
    df = manifest(tmp_path / "learned")
    scored = df[df["quality"].notna()]
    assert calls["images"] == len(scored) > 3 and calls["batches"] == -(-len(scored) // 3)
    assert set(df["quality_scorer"]) == {"q-align:fake-qalign"}
    assert (df["reason"] == "low_quality").any() and (df.loc[df["reason"] == "low_quality", "quality"] <= 4.0).all()
    assert (df.loc[df["kept"], "quality"] > 4.0).all()
    calls["images"] = 0
    run_curation(params, tmp_path / "learned", progress=False)
    assert calls["images"] == 0  # scores come from the cache


def test_baseline_square_crop_stays_inside_every_image():
    """Diffusion-4K baseline crop: the box never leaves the source, whatever the rounding (seen at 768x321)."""
    from ultraflux.data.process import random_square_box

    rng = np.random.default_rng(0)
    for w, h in [(768, 321), (321, 768), (768, 543), (5952, 2496), (481, 480), (480, 480), (1000, 333)]:
        for _ in range(50):
            x0, y0, x1, y1 = random_square_box(w, h, 480, rng)
            assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
            assert x1 - x0 == pytest.approx(min(w, h)) and y1 - y0 == pytest.approx(min(w, h))


def test_an_exception_in_one_image_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    params = base_params()
    real = process.analyze
    victims = []

    def sometimes_broken(data, image_id, *args, **kwargs):
        if not victims:
            victims.append(image_id)
            raise ValueError("box can't exceed original image size")
        return real(data, image_id, *args, **kwargs)

    monkeypatch.setattr(process, "analyze", sometimes_broken)
    metrics = run_curation(params, tmp_path / "out", progress=False)
    manifest = pd.read_parquet(tmp_path / "out/manifest.parquet")
    row = manifest[manifest["id"] == victims[0]].iloc[0]
    assert not row["kept"] and row["reason"] == "failed: ValueError: box can't exceed original image size"
    assert metrics["rejected_failed"] == 1 and metrics["num_sources"] == len(manifest) == 20
