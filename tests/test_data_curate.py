"""run_curation end to end on small sets: filters, shards, bad inputs, determinism, resume, guard, engines, CLI."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from data_fixtures import bomb_png, exif_rotated_jpeg, jpeg_bytes, png_bytes, textured, write
from ultraflux.cli.curate_stats import main as cli_curate_stats
from ultraflux.config import load_params
from ultraflux.data import process, select
from ultraflux.data.cache_entries import RESERVED, ROOT_LOCK
from ultraflux.data.curate import MANIFEST_COLUMNS, TooFewImages, run_curation
from ultraflux.data.ingest import SourceError
from ultraflux.data.shards import iter_shard, open_image, read_image_bytes

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def base_params(**curate_overrides) -> dict:
    """params.yaml with a small synthetic set and one worker; ``curate_overrides`` replace keys of ``curate`` (a
    dict value is merged into its sub-section), so the result stays schema-valid."""
    params = copy.deepcopy(load_params(PARAMS_FILE))
    params["data"].update({"variant": "multiaspect", "source": "", "synthetic": {"num_images": 20, "long_side": 768}})
    curate = params["curate"]
    curate.update({"engine": "local", "workers": 1, "cache_dir": "", "min_train_images": 1, "min_holdout_images": 0,
                   "holdout_fraction": 0.1, "image_format": "jpeg", "shard_max_mb": 1024})
    curate["aesthetic"]["stage2_top"] = 0.05
    for key, value in curate_overrides.items():
        curate[key] = {**curate[key], **value} if isinstance(value, dict) else value
    return params


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of the manifest and of every shard: what must be byte-identical across engines and runs."""
    files = [out / "manifest.parquet", *sorted((out / "shards").glob("*.tar"))]
    return {p.relative_to(out).as_posix(): digest(p) for p in files}


class Counter:
    """Counts calls of a process-module function (workers: 1 runs in this process), passing them through."""

    def __init__(self, monkeypatch, name: str, fail_at: int | None = None):
        self.n, self.fail_at, real = 0, fail_at, getattr(process, name)

        def counted(*args, **kwargs):
            self.n += 1
            if self.fail_at is not None and self.n == self.fail_at:
                raise KeyboardInterrupt("simulated kill")
            return real(*args, **kwargs)

        monkeypatch.setattr(process, name, counted)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    metrics = run_curation(base_params(), out, progress=False)
    return out, metrics


def test_synthetic_manifest_schema_filters_and_shards(synthetic_run):
    out, metrics = synthetic_run
    df = manifest(out)
    assert list(df.columns) == list(MANIFEST_COLUMNS) and "image" not in df.columns
    assert len(df) == 20 == metrics["num_sources"]
    assert df["id"].is_unique
    by_kind = df.assign(kind=df["source"].map(lambda s: Path(s).stem.split("_", 2)[2]))
    assert set(by_kind.loc[by_kind.kind == "flat", "reason"]) == {"flat"}
    assert set(by_kind.loc[by_kind.kind == "low_entropy", "reason"]) == {"low_entropy"}
    assert set(by_kind.loc[by_kind.kind == "small", "reason"]) == {"too_small"}
    assert set(by_kind.loc[by_kind.kind == "nocaption", "reason"]) == {"no_caption"}
    assert {"low_quality", "low_aesthetic"} <= set(df["reason"])
    kept = df[df["kept"]]
    assert len(kept) == metrics["num_kept"] > 0
    assert (kept["reason"] == "").all() and (df.loc[~df["kept"], "reason"] != "").all()
    assert df["stage2"].sum() == metrics["num_stage2"] >= 1
    assert not (df["stage2"] & ~df["kept"]).any()
    assert (df.loc[df["stage2"], "split"] == "train").all()
    assert metrics["quality_scorer"] == "standin:laplacian-sharpness"
    assert set(df["aesthetic_scorer"]) == {"standin:hasler-colorfulness"}
    # Stand-in scores exist exactly for the rows that passed the cheap filters (nothing else was decoded in colour).
    cheap_ok = ~df["reason"].isin(["flat", "low_entropy", "too_small", "no_caption"])
    assert df.loc[cheap_ok, "quality"].notna().all() and df.loc[~cheap_ok, "quality"].isna().all()
    # Shards: one series per split, members <key>.jpg/.txt/.json in manifest order, random access by offset. The
    # holdout shards hold the evaluation set: every held-out row that passes the variant-independent checks, kept by
    # the variant's filters or not (its reason still recorded), never trained on.
    unused = ~df["kept"] & ~df["eval"]
    assert (df.loc[unused, "shard"] == "").all() and (df.loc[unused, "nbytes"] == 0).all()
    assert (df.loc[df["eval"], "split"] == "holdout").all() and not (df["eval"] & df["stage2"]).any()
    assert metrics["num_holdout"] == df["eval"].sum() and metrics["num_train"] == (kept["split"] == "train").sum()
    for split, rows in (("train", kept[kept["split"] == "train"]), ("holdout", df[df["eval"]])):
        assert set(rows["shard"]) == {f"shards/{split}-000000.tar"}
        samples = list(iter_shard(out / f"shards/{split}-000000.tar"))
        assert [k for k, _ in samples] == list(rows["key"]) == list(rows["id"])
        for (key, sample), (_, row) in zip(samples, rows.iterrows()):
            assert set(sample) == {"jpg", "txt", "json"}
            assert sample["jpg"] == read_image_bytes(out, row.to_dict())
            assert sample["txt"].decode() == row["caption"] and json.loads(sample["json"])["id"] == key
    for _, row in df[df["kept"] | df["eval"]].iterrows():
        im = open_image(out, row.to_dict())
        assert im.size == (row["width"], row["height"]) and im.mode == "RGB"
        assert row["width"] % 32 == 0 and row["height"] % 32 == 0
    assert not (out / "images").exists()
    assert metrics["num_shards"] == 2 and metrics["shard_bytes"] > 0
    ranks = kept["texture_rank"].sort_values().to_numpy()
    assert ranks[-1] == 1.0 and np.all(np.diff(ranks) > 0)
    assert set(df["split"]) <= {"train", "holdout"} and df["eval"].any()
    for name in ("s_flat_patches.png", "flat_fraction.png", "entropy.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["num_kept"] == metrics["num_kept"]


def test_rerun_is_cached_and_byte_identical(synthetic_run, tmp_path, monkeypatch):
    out, first = synthetic_run
    before = output_digests(out)
    analyzed, rendered = Counter(monkeypatch, "analyze"), Counter(monkeypatch, "render")
    metrics = run_curation(base_params(), out, progress=False)
    assert analyzed.n == 0 and rendered.n == 0  # nothing recomputed
    assert metrics["_timing"]["cache_hits"] == 20 and metrics["_timing"]["render_cache_hits"] == (
        first["num_train"] + first["num_holdout"])  # the kept training images and the evaluation set
    assert output_digests(out) == before
    # A fresh output folder (fresh cache) with the same params and seed: identical manifest up to the source folder,
    # identical shards.
    run_curation(base_params(), tmp_path / "again", progress=False)
    fresh = manifest(tmp_path / "again")
    pd.testing.assert_frame_equal(manifest(out).drop(columns="source"), fresh.drop(columns="source"))
    shards = {k: v for k, v in before.items() if k.startswith("shards/")}
    assert len(shards) == 2  # the shard members hold no source path: byte-identical
    assert {k: v for k, v in output_digests(tmp_path / "again").items() if k.startswith("shards/")} == shards


def test_resume_after_a_kill_in_either_pass(tmp_path, monkeypatch):
    params = base_params()
    out = tmp_path / "out"
    scan = Counter(monkeypatch, "analyze", fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        run_curation(params, out, progress=False)
    assert scan.n == 8
    scan = Counter(monkeypatch, "analyze")
    render = Counter(monkeypatch, "render", fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_curation(params, out, progress=False)
    assert scan.n == 20 - 7  # only the 13 images the first run did not finish
    scan, render = Counter(monkeypatch, "analyze"), Counter(monkeypatch, "render")
    metrics = run_curation(params, out, progress=False)
    # two bucket images were done before the kill; pass 2 renders the kept training images and the evaluation set
    assert scan.n == 0 and render.n == metrics["num_train"] + metrics["num_holdout"] - 2
    bookkeeping = {".params.json", ".cache", ROOT_LOCK, *RESERVED}  # no temporary is left behind
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name not in bookkeeping]


def test_stray_temporary_files_are_swept(synthetic_run):
    out, _ = synthetic_run
    scan_dir = next(p for p in (out / ".cache").iterdir() if any(p.glob("*/*.json")))
    stray = [scan_dir / ".ab12.png.4242.tmp", scan_dir / "ab" / ".abcdef.json.x1y2"]
    stray[1].parent.mkdir(exist_ok=True)
    for path in stray:
        path.write_bytes(b"half-written")
    (scan_dir / ".tmpdir-from-atomic-path").mkdir()
    metrics = run_curation(base_params(), out, progress=False)
    assert metrics["_timing"]["temporary_files_swept"] == 3
    assert not stray[0].exists() and not stray[1].exists() and not (scan_dir / ".tmpdir-from-atomic-path").exists()


def test_threshold_change_recomputes_only_what_it_must(synthetic_run, monkeypatch):
    out, first = synthetic_run
    analyzed, small = Counter(monkeypatch, "analyze"), Counter(monkeypatch, "decode_small")
    stricter = run_curation(base_params(entropy_min=7.3), out, progress=False)
    assert analyzed.n == 0 and small.n == 0  # a stricter cut-off only re-selects
    assert stricter["rejected_low_entropy"] > first["rejected_low_entropy"]
    looser = run_curation(base_params(entropy_min=0.0), out, progress=False)
    assert looser["rejected_low_entropy"] == 0 and analyzed.n == 0
    # only the rows that newly pass the cheap filters get their (small, colour) stand-in decode
    assert small.n == first["rejected_low_entropy"]
    run_curation(base_params(), out, progress=False)  # restore the default outputs for the other tests


def test_guard_stops_with_the_key_and_the_removals(tmp_path):
    params = base_params(min_train_images=50)
    with pytest.raises(TooFewImages) as info:
        run_curation(params, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "curate.min_train_images = 50" in message and "training image(s) remain" in message
    assert "flat 3" in message and "low_entropy 2" in message and "low_aesthetic" in message
    assert (tmp_path / "out/manifest.parquet").is_file() and not (tmp_path / "out/shards").exists()
    with pytest.raises(TooFewImages, match="curate.min_holdout_images = 9"):
        run_curation(base_params(min_holdout_images=9), tmp_path / "out", progress=False)


def bad_input_source(src: Path) -> dict[str, str]:
    """33 entries: broken, truncated, zero-byte, mislabelled, dangling-link, unreadable and odd files beside good
    ones; returns name -> the reason (or reason prefix) expected for it."""
    src.mkdir()
    good = textured(512, 384, seed=1)
    expect = {}

    def add(name, data, reason, caption=b"A test caption."):
        write(src / name, data, caption)
        expect[name] = reason

    add("good.jpg", jpeg_bytes(good), "")
    add("zero.jpg", b"", "unreadable: empty file")
    jpg = jpeg_bytes(textured(512, 384, seed=2))
    add("truncated.jpg", jpg[: len(jpg) // 2], "unreadable: ")
    png = png_bytes(Image.fromarray(textured(512, 384, seed=3)))
    add("truncated.png", png[: len(png) // 2], "unreadable: ")
    add("text.jpg", b"not an image at all\n" * 20, "unreadable: not a recognised image format")
    add("header_only.jpg", jpg[:600], "unreadable: ")
    add("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "unreadable: ")
    add("bomb.png", bomb_png(30000, 30000), "decompression_bomb")
    add("png_named.jpg", png_bytes(Image.fromarray(textured(512, 384, seed=14))), "")  # mislabelled, readable
    add("jpeg_named.png", jpeg_bytes(textured(512, 384, seed=15)), "")
    buf = io.BytesIO()
    Image.fromarray(textured(512, 384, seed=4)).convert("CMYK").save(buf, "JPEG", quality=95)
    add("cmyk.jpg", buf.getvalue(), "")
    gray16 = textured(512, 384, seed=5)[..., 1].astype(np.uint16) * 257
    add("sixteen.png", png_bytes(Image.fromarray(gray16)), "~")
    add("palette.png", png_bytes(Image.fromarray(textured(512, 384, seed=6)).convert("P")), "~")
    rgba = np.dstack([textured(512, 384, seed=7), np.full((384, 512), 255, np.uint8)])
    add("alpha.png", png_bytes(Image.fromarray(rgba, "RGBA")), "")
    add("rotated.jpg", exif_rotated_jpeg(textured(512, 384, seed=8), orientation=6), "")
    add("gray.png", png_bytes(Image.fromarray(textured(512, 384, seed=9)[..., 0])), "~")
    add("tiny.png", png_bytes(Image.fromarray(textured(64, 48, seed=10))), "too_small")
    add("nocaption.jpg", jpeg_bytes(textured(512, 384, seed=11)), "no_caption", caption=None)
    add("emptycaption.jpg", jpeg_bytes(textured(512, 384, seed=12)), "no_caption", caption=b"   \n")
    add("latin1.jpg", jpeg_bytes(textured(512, 384, seed=13)), "bad_caption: not UTF-8",
        caption="caf\xe9 au lait".encode("latin-1"))
    add("zz_duplicate.jpg", jpeg_bytes(good), "duplicate: good.jpg")  # the first in sorted order, relative
    add("flat.png", png_bytes(Image.fromarray(np.full((384, 512, 3), 90, np.uint8))), "flat")
    add("webp.webp", _webp(textured(512, 384, seed=16)), "")
    add("gif.gif", _gif(textured(512, 384, seed=17)), "~")
    add("bmp.bmp", _bmp(textured(512, 384, seed=18)), "")
    add("tiff.tif", _tiff(textured(512, 384, seed=19)), "")
    add("wide.jpg", jpeg_bytes(textured(1100, 384, seed=20)), "")
    add("unreadable.jpg", jpeg_bytes(textured(512, 384, seed=21)),
        "" if os.geteuid() == 0 else "unreadable: permission denied")
    os.chmod(src / "unreadable.jpg", 0)
    os.symlink(src / "does-not-exist.jpg", src / "dangling.jpg")
    (src / "dangling.txt").write_text("a caption for a file that is not there")
    expect["dangling.jpg"] = "unreadable: dangling symlink"
    os.symlink(src / "good.jpg", src / "zz_link_to_good.jpg")
    (src / "zz_link_to_good.txt").write_text("same bytes through a link")
    expect["zz_link_to_good.jpg"] = "duplicate: good.jpg"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "socket.jpg"))  # unreadable even for root
    sock.close()
    expect["socket.jpg"] = "unreadable: not a regular file"
    (src / "folder.jpg").mkdir()  # a folder with an image name gets its row, and its images are sources
    expect["folder.jpg"] = "unreadable: is a directory"
    (src / "folder.jpg" / "inner.png").write_bytes(png_bytes(Image.fromarray(textured(512, 384, seed=22))))
    (src / "folder.jpg" / "inner.txt").write_text("nested")
    expect["inner.png"] = ""
    return expect


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _webp(arr):
    return _encoded(arr, "WEBP", quality=95)


def _gif(arr):
    return _encoded(arr, "GIF")


def _bmp(arr):
    return _encoded(arr, "BMP")


def _tiff(arr):
    return _encoded(arr, "TIFF")


def bad_input_params(src: Path, **overrides) -> dict:
    params = base_params(quality={"weights": "", "standin_keep_fraction": 1.0},
                         aesthetic={"weights": "", "keep_top": 1.0, "stage2_top": 0.05}, **overrides)
    params["data"]["source"] = str(src)
    return params


def check_bad_inputs(df: pd.DataFrame, expect: dict[str, str]) -> None:
    reason = dict(zip(df["source"].map(lambda s: Path(s).name), df["reason"]))
    assert sorted(reason) == sorted(expect) and len(df) == len(expect) == 33  # one row per path, none lost
    for name, want in expect.items():
        if want == "~":  # readable; the texture filters may or may not keep it
            assert reason[name] in ("", "flat", "low_entropy"), (name, reason[name])
        elif want.endswith(": ") or want.endswith("UTF-8"):
            assert reason[name].startswith(want), (name, reason[name])
        else:
            assert reason[name] == want, (name, reason[name])
    assert not df["reason"].str.contains("0x|<_io", regex=True).any()  # no memory addresses
    assert not df["reason"].str.contains(r"(?<!UTF-)\d|/", regex=True).any()  # no byte counts, no paths: stable reasons


def test_bad_inputs_each_get_one_row_and_a_stable_reason(tmp_path):
    expect = bad_input_source(tmp_path / "src")
    metrics = run_curation(bad_input_params(tmp_path / "src"), tmp_path / "out", progress=False)
    df = manifest(tmp_path / "out")
    check_bad_inputs(df, expect)
    rotated = df[df["source"].str.endswith("rotated.jpg")].iloc[0]
    assert (rotated["orig_width"], rotated["orig_height"]) == (384, 512)  # EXIF applied before bucketing
    assert rotated["bucket"] == "3:4"
    im = open_image(tmp_path / "out", rotated.to_dict())
    assert im.size == (rotated["width"], rotated["height"]) and im.height > im.width
    assert metrics["num_sources"] == 33 and metrics["rejected_decompression_bomb"] == 1
    row = df[df["source"].str.endswith("bomb.png")].iloc[0]
    assert np.isnan(row["entropy"]) and row["shard"] == "" and not row["kept"]


def test_statistics_use_stored_orientation_like_the_tool(tmp_path):
    from test_data_stats import tool_flat_fraction, tool_flatness

    arr = textured(1000, 500, seed=8)  # 1000 x 500 stored: 4 x 2 full patches; displayed 500 x 1000: 2 x 4
    data = exif_rotated_jpeg(arr, orientation=6)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    import cv2

    tool_gray = cv2.cvtColor(cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2GRAY)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "rotated.jpg", data)
    params = base_params(gray="opencv")
    params["data"]["source"] = str(src)
    run_curation(params, tmp_path / "out", progress=False)
    row = manifest(tmp_path / "out").iloc[0]
    assert row["num_patches"] == 8 and (row["orig_width"], row["orig_height"]) == (500, 1000)
    assert row["s_flat_fraction"] == tool_flat_fraction(tool_flatness(tool_gray))
    from skimage.measure import shannon_entropy

    assert row["entropy"] == pytest.approx(shannon_entropy(tool_gray), rel=1e-12)


def test_local_and_ray_give_byte_identical_manifests_and_shards(tmp_path):
    ray = pytest.importorskip("ray", reason="ray[data] is not installed")
    expect = bad_input_source(tmp_path / "src")
    run_curation(bad_input_params(tmp_path / "src", workers=2), tmp_path / "local", progress=False)
    check_bad_inputs(manifest(tmp_path / "local"), expect)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stale cluster
    try:
        run_curation(bad_input_params(tmp_path / "src", engine="ray", workers=2), tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert output_digests(tmp_path / "ray") == output_digests(tmp_path / "local")
    assert len(output_digests(tmp_path / "local")) == 3  # the manifest, a train and a holdout shard


def test_workers_pool_matches_serial(synthetic_run, tmp_path):
    out, _ = synthetic_run
    params = base_params(workers=2)
    params["data"]["source"] = str(out / "source")
    run_curation(params, tmp_path / "pool", progress=False)
    params1 = base_params(workers=1)
    params1["data"]["source"] = str(out / "source")
    run_curation(params1, tmp_path / "serial", progress=False)
    assert output_digests(tmp_path / "pool") == output_digests(tmp_path / "serial")


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


def test_baseline_variant_is_square_without_curation_and_evaluates_the_same_images(synthetic_run, tmp_path):
    """Baseline: square crops, no texture/quality/aesthetic curation. The evaluation set is drawn before the
    variant's filters: the baseline and the multi-aspect curation of the same sources hold out the same ids, rendered
    byte-identically (the evaluation geometry, not the square crop), named by the same sha256; an eval row the
    multi-aspect filters reject keeps its reason."""
    params = base_params()
    params["data"]["variant"] = "baseline"
    metrics = run_curation(params, tmp_path / "out", progress=False)
    df = manifest(tmp_path / "out")
    kept = df[df["kept"] & (df["split"] == "train")]
    assert set(kept["bucket"]) == {"1:1"} and set(zip(kept["width"], kept["height"])) == {(480, 480)}
    assert set(df.loc[~df["kept"], "reason"]) == {"too_small", "no_caption"}  # flat/low-entropy images are kept
    assert metrics["rejected_flat"] == 0 and metrics["quality_scorer"] == "none"
    assert df["quality"].isna().all()  # no stand-in decode at all
    assert 1 <= df["stage2"].sum() <= len(kept) and not (df["stage2"] & ~df["kept"]).any()
    for _, row in kept.iterrows():
        assert open_image(tmp_path / "out", row.to_dict()).size == (480, 480)
    out, multi_metrics = synthetic_run
    multi, base = manifest(out), manifest(tmp_path / "out")
    ids = set(multi.loc[multi["eval"], "id"])
    assert ids and ids == set(base.loc[base["eval"], "id"])
    assert metrics["eval_set_sha256"] == multi_metrics["eval_set_sha256"] == select.eval_set_sha256(multi)
    assert metrics["num_holdout"] == multi_metrics["num_holdout"] == len(ids)
    for (_, m), (_, b) in zip(multi[multi["eval"]].iterrows(), base[base["eval"]].iterrows()):
        assert read_image_bytes(out, m.to_dict()) == read_image_bytes(tmp_path / "out", b.to_dict())
    assert set(multi.loc[multi["eval"] & ~multi["kept"], "reason"]) <= {"flat", "low_entropy", "low_quality",
                                                                        "low_aesthetic"}


def test_png_format_is_lossless_and_shards_roll_over(synthetic_run, tmp_path):
    out, _ = synthetic_run
    params = base_params(image_format="png", shard_max_mb=1)
    params["data"]["source"] = str(out / "source")
    metrics = run_curation(params, tmp_path / "png", progress=False)
    df = manifest(tmp_path / "png")
    kept = df[df["kept"]]
    assert (kept["shard"].str.endswith(".tar")).all()
    assert all(Image.open(io.BytesIO(read_image_bytes(tmp_path / "png", r.to_dict()))).format == "PNG"
               for _, r in kept.iterrows())
    # the PNG holds exactly the pixels that were encoded: re-render one row and compare
    row = kept.iloc[0]
    data = Path(row["source"]).read_bytes()
    header = process.read_header(data)
    box = process.select_box(row["orig_width"], row["orig_height"], process.bucket_table(0.125), {"variant":
                                                                                                   "multiaspect"},
                             row["id"])[1]
    again = process.render(data, header, box, (row["width"], row["height"]), "png", 95, 10**9)
    assert again == read_image_bytes(tmp_path / "png", row.to_dict())
    shards = sorted((tmp_path / "png" / "shards").glob("*.tar"))
    assert len(shards) == metrics["num_shards"] >= 3  # ~0.5 MB per PNG, 1 MiB per shard: it rolled over
    for shard in shards:  # bounded: at most 1 MiB, unless a single sample alone is larger
        assert shard.stat().st_size <= (1 << 20) + 10240 or len(list(iter_shard(shard))) == 1


def test_cli_curate_stats(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base_params()))  # tiny-profile buckets (scale 0.125)
    flat = np.tile(np.linspace(0, 255, 600, dtype=np.float32), (480, 1)).astype(np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    Image.fromarray(textured(600, 480)).save(tmp_path / "tex.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert cli_curate_stats(["flat.png", "tex.png", "bad.jpg", "missing.jpg"]) == 1  # bad inputs: non-zero
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [set(r) >= {"path", "s_flat_fraction", "entropy", "bucket", "kept", "reason"} for r in lines] == [True] * 4
    assert lines[0]["reason"] == "flat" and lines[0]["s_flat_fraction"] == 1.0 and not lines[0]["kept"]
    assert lines[1]["kept"] and lines[1]["reason"] == "" and lines[1]["bucket"] == "4:3"
    assert lines[2]["reason"].startswith("unreadable") and lines[2]["entropy"] is None
    assert lines[3]["reason"] == "unreadable: file not found"
    assert f"settings from {tmp_path / 'params.yaml'} (validated)" in err
    assert "bad.jpg: unreadable: not a recognised image format" in err and "missing.jpg: unreadable: file not found" \
        in err and "2 of 4 input(s) missing or unreadable" in err
    assert cli_curate_stats(["flat.png", "tex.png"]) == 0  # verdicts on readable images are not errors
    capsys.readouterr()
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**base_params(), "curate": {**base_params()["curate"],
                                                                                      "entropy_min": 70}}))
    assert cli_curate_stats(["--params", "other.yaml", "tex.png"]) == 2  # validated, before any image is read
    out, err = capsys.readouterr()
    assert out == "" and "other.yaml: 'curate.entropy_min' must be less than or equal to 8" in err
    assert cli_curate_stats(["--params", "nope.yaml", "tex.png"]) == 2
    (tmp_path / "params.yaml").unlink()  # outside a repository: the schema's defaults, 4K buckets: too small
    assert cli_curate_stats(["tex.png"]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["reason"] == "too_small" and record["entropy"] > 7.0
    assert "no ./params.yaml here, using the schema's defaults" in err and "gray opencv" in err


def test_entropy_just_below_the_threshold_is_rejected_by_every_path(tmp_path, monkeypatch):
    """H = 6.99999 (a stat stand-in, monkeypatched): curate-stats, pass 1, the selection and the stage all say
    low_entropy; H = 7.0 passes everywhere (curate-stats used to round to 4 decimals first and keep 6.99999)."""
    from ultraflux.config import typed
    from ultraflux.data.curate import image_stats
    from ultraflux.data.select import assign_reasons

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write(src / f"img{i}.jpg", jpeg_bytes(textured(512, 384, seed=30 + i)))
    params = base_params(entropy_min=7.0)
    params["data"]["source"] = str(src)
    curate = typed(params).curate
    for entropy, verdict in ((6.99999, "low_entropy"), (7.0, "")):
        monkeypatch.setattr(process, "entropy_bits", lambda gray, h=entropy: h)
        assert image_stats(str(src / "img0.jpg"), curate)["reason"] == verdict
        cfg = {"variant": "multiaspect", "flat_threshold": 800.0, "flat_max_fraction": 0.5, "entropy_min": 7.0,
               "scale": 0.125, "aspects": ["4:3"], "max_upscale": 1.5}
        rec = {"error": "", "s_flat": [0.0, 900.0, 900.0], "entropy": entropy, "orig_width": 512, "orig_height": 384}
        assert process.is_candidate(rec, cfg, "") == (verdict == "")
        rows = pd.DataFrame({"id": ["a"], "source": ["x"], "relative": ["x"], "error": [""], "caption_error": [""],
                             "s_flat_fraction": [1 / 3], "entropy": [entropy], "quality": [1.0], "aesthetic": [1.0]})
        assign_reasons(rows, curate, "multiaspect", False)
        assert rows["reason"].iloc[0] == verdict
        run_curation(params, tmp_path / "out", progress=False) if verdict == "" else None
    assert set(manifest(tmp_path / "out")["reason"]) <= {"", "low_quality", "low_aesthetic"}
    monkeypatch.setattr(process, "entropy_bits", lambda gray: 6.99999)
    with pytest.raises(TooFewImages):
        run_curation(params, tmp_path / "low", progress=False)
    assert set(manifest(tmp_path / "low")["reason"]) == {"low_entropy"}


def test_split_draws_the_evaluation_set_before_the_filters():
    """assign_split on a small frame: held out by the id hash alone, whatever the variant's crop; an eval row takes
    the evaluation geometry (too_small re-judged on it); unreadable, caption-less, duplicate-copy and (on the
    evaluation geometry) too-small rows are held out but not evaluated; with no eligible row held out, the eligible
    row with the smallest hash is."""
    ids = [f"{i:02x}" * 32 for i in range(8)]
    units = [select.hash_unit(0, i) for i in ids]
    fraction = sorted(units)[4]                          # the 4 smallest hashes are held out
    held = [u < fraction for u in units]
    square = {"bucket": "1:1", "width": 480, "height": 480, "upscale": 2.0, "box": [0, 0, 240, 240]}
    wide = {"bucket": "2:1", "width": 640, "height": 320, "upscale": 1.0, "box": [0, 0, 640, 320]}
    rows = pd.DataFrame({"id": ids, "relative": [f"{i}.jpg" for i in range(8)], "error": ["too_small"] * 8,
                         "caption_error": [""] * 8, **{k: [v] * 8 for k, v in square.items() if k != "box"},
                         "box": [square["box"]] * 8, "eval_geometry": [dict(wide) for _ in range(8)]})
    order = [i for i in sorted(range(8), key=lambda i: units[i]) if held[i]]   # held-out rows, smallest hash first
    rows.loc[order[1], "error"] = "unreadable: truncated"
    rows.loc[order[1], "eval_geometry"] = None
    rows.loc[order[2], "caption_error"] = "no_caption"
    rows.at[order[3], "eval_geometry"] = {**wide, "upscale": 9.0}
    select.assign_split(rows, 0, fraction, max_upscale=1.5)
    assert list(rows["split"]) == ["holdout" if h else "train" for h in held]
    assert list(rows.index[rows["eval"]]) == [order[0]]
    first = rows.loc[order[0]]
    assert (first["bucket"], first["width"], first["error"]) == ("2:1", 640, "")   # eval geometry, fits it
    assert rows.loc[order[3], "error"] == "too_small" and rows.loc[order[1], "error"].startswith("unreadable")
    assert (rows.loc[~np.array(held), "bucket"] == "1:1").all()                     # training rows keep the variant's
    assert select.eval_set_sha256(rows) == select.eval_set_sha256(rows.iloc[::-1])
    fallback = rows.drop(columns=["split", "eval"]).assign(error="", bucket="1:1")
    select.assign_split(fallback, 0, 1e-9, max_upscale=1.5)
    assert list(fallback.index[fallback["eval"]]) == [order[0]]


def test_stage_and_curate_stats_agree_on_every_image(synthetic_run):
    """The same statistics (not rounded) and the same per-image verdict from the stage and from curate-stats."""
    from ultraflux.config import typed
    from ultraflux.data.curate import image_stats

    out, _ = synthetic_run
    curate = typed(base_params()).curate
    per_image = {"flat", "low_entropy", "too_small"}
    for row in manifest(out).itertuples():
        record = image_stats(row.source, curate)
        assert record["s_flat_fraction"] == row.s_flat_fraction and record["entropy"] == row.entropy, row.source
        assert record["reason"] == (row.reason if row.reason in per_image else ""), row.source


def test_learned_quality_scorer_path_uses_threshold_and_cache(synthetic_run, tmp_path, monkeypatch):
    """A stand-in for a Q-Align checkpoint: the batched, cached main-process path and the 4.0 threshold."""
    from ultraflux.data import scorers

    out, _ = synthetic_run
    weights = tmp_path / "fake-qalign"
    weights.mkdir()
    calls = {"images": 0, "batches": 0, "sides": set()}

    class FakeQAlign(scorers.Scorer):
        name, learned, batch_size = "q-align:fake-qalign", True, 3

        def score(self, images):
            calls["images"] += len(images)
            calls["batches"] += 1
            calls["sides"] |= {max(im.shape[:2]) for im in images}
            return [4.5 if float(im.mean()) > 110 else 3.5 for im in images]

    monkeypatch.setattr(scorers, "make_scorer", lambda kind, cfg: FakeQAlign())
    params = base_params(quality={"weights": str(weights), "threshold": 4.0})
    params["data"]["source"] = str(out / "source")
    run_curation(params, tmp_path / "learned", progress=False)
    df = manifest(tmp_path / "learned")
    scored = df[df["quality"].notna()]
    assert calls["images"] == len(scored) > 3 and calls["batches"] == -(-len(scored) // 3)
    assert calls["sides"] == {768}  # sources at their own resolution (>= 4096 px would be DCT-reduced)
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
    df = manifest(tmp_path / "out")
    row = df[df["id"] == victims[0]].iloc[0]
    assert not row["kept"] and row["reason"] == "failed: ValueError: box can't exceed original image size"
    assert metrics["rejected_failed"] == 1 and metrics["num_sources"] == len(df) == 20


def test_examples_show_kept_and_each_rejection_reason(synthetic_run):
    """The report's curation examples: a few thumbnails per outcome with their scores, bounded, the same ids on
    every call."""
    from ultraflux.data.examples import PER_GROUP, THUMB, curation_examples

    out, _ = synthetic_run
    df = manifest(out)
    groups = curation_examples(df, out)
    by = {g["group"]: g for g in groups}
    expected = {"kept"} | {r.split(":")[0].strip() for r in df.loc[~df["kept"], "reason"]}
    assert set(by) == expected and groups[0]["group"] == "kept"
    for g in groups:
        n = int((df["kept"] if g["group"] == "kept" else df["reason"].str.split(":").str[0].str.strip() == g["group"])
                .sum())
        assert g["count"] == n and len(g["items"]) == min(n, PER_GROUP), g["group"]
        for it in g["items"]:
            row = df[df["id"] == it["id"]].iloc[0]
            assert (g["group"] == "kept") == bool(row["kept"])
            assert it["scores"]["entropy"] == pytest.approx(row["entropy"], abs=1e-4)
            assert it["image"] is None or max(it["image"].size) <= THUMB
    assert all(it["image"] is not None for it in by["kept"]["items"] + by["flat"]["items"])   # decodable
    assert [it["id"] for it in curation_examples(df, out)[0]["items"]] == [it["id"] for it in by["kept"]["items"]]


def cached_params(synthetic_run, **curate_overrides) -> dict:
    """Curate the synthetic fixture's images again, with its cache (only pass 2 / outputs do work)."""
    out, _ = synthetic_run
    params = base_params(**curate_overrides)
    params["data"]["source"] = str(out / "source")
    params["curate"]["cache_dir"] = str(out / ".cache")
    return params


def test_a_full_disk_at_the_shards_or_the_manifest_leaves_no_dataset_that_looks_complete(synthetic_run, tmp_path,
                                                                                        monkeypatch):
    """Injected ENOSPC: one line naming the path; no shard, temporary or manifest is left (not even the previous
    run's manifest, which would name shards that are gone)."""
    import errno
    import tarfile

    from ultraflux.io import DiskFullError

    out = tmp_path / "out"
    run_curation(cached_params(synthetic_run), out, progress=False)
    real_addfile, calls = tarfile.TarFile.addfile, []

    def addfile_until_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second sample's image: the first shard is half-written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_until_full)
    with pytest.raises(DiskFullError) as info:
        run_curation(cached_params(synthetic_run), out, progress=False)
    assert str(info.value).startswith(f"ENOSPC (no space left on device) writing a curation shard at "
                                      f"{out / 'shards/train-000000.tar'} (") and "free space there" in str(info.value)
    assert not (out / "shards").exists() and not (out / "manifest.parquet").exists()
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)

    def full_parquet(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_parquet)
    with pytest.raises(DiskFullError, match=r"ENOSPC \(no space left on device\) writing the curated manifest at "
                                            r".*out/manifest.parquet"):
        run_curation(cached_params(synthetic_run), out, progress=False)
    assert not (out / "shards").exists() and not (out / "manifest.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".manifest")]  # nor its temporary


def test_a_real_full_tmpfs_names_the_shard(synthetic_run, tmp_path):
    """The same on a real 1 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    import subprocess

    from ultraflux.io import DiskFullError

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (disk / "filler").write_bytes(b"\0" * ((1 << 20) - (32 << 10)))  # 32 KiB left: less than the shards
        with pytest.raises(DiskFullError, match=r"ENOSPC \(no space left on device\) writing .* at .*/shards/"):
            run_curation(cached_params(synthetic_run), disk / "out", progress=False)
        assert not (disk / "out" / "shards").exists() and not (disk / "out" / "manifest.parquet").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_shared_cache_dir_keeps_user_folders_and_the_other_pipelines_cache(synthetic_run, tmp_path):
    """curate.cache_dir holding a user's folders (12-hex names too) and a second pipeline's cache: after this
    pipeline's curations, with a settings change that makes one of its own entries stale, only that entry is gone."""
    from test_data_cache_entries import user_files

    cache = tmp_path / "cache"
    users = user_files(cache)
    params = cached_params(synthetic_run)
    params["curate"]["cache_dir"] = str(cache)
    other = copy.deepcopy(params)
    other["curate"]["image_quality"] = 90
    run_curation(other, tmp_path / "other-pipeline", progress=False)
    theirs = {p.name for p in cache.iterdir() if p.is_dir()} - {p.parent.name for p in users}
    run_curation(params, tmp_path / "out", progress=False)
    mine_before = {p.name for p in cache.iterdir() if p.is_dir()} - theirs - {p.parent.name for p in users}
    assert len(mine_before) == 1 and next(iter(mine_before)).startswith("render-")  # the scan entry is shared
    params["curate"]["image_quality"] = 85
    run_curation(params, tmp_path / "out", progress=False)
    names = {p.name for p in cache.iterdir() if p.is_dir()}
    assert theirs <= names and not mine_before & names  # theirs kept; my stale render entry pruned
    assert all(path.read_text() == text for path, text in users.items())


CURATE_IN_A_PROCESS = ("import json, sys\nfrom ultraflux.data.curate import run_curation\n"
                       "run_curation(json.load(open(sys.argv[1])), sys.argv[2], progress=False)\n")


def test_two_concurrent_curations_share_one_cache_dir(synthetic_run, tmp_path):
    """Two processes curate the same images into one fresh cache dir at the same time (both write the same
    entries): both succeed, and both outputs are byte-identical to a run alone."""
    import subprocess
    import sys

    out, _ = synthetic_run
    src = tmp_path / "src"
    src.mkdir()
    for image in sorted((out / "source").glob("*.png"))[:6]:
        write(src / image.name, image.read_bytes())
    params = cached_params(synthetic_run)
    params["data"]["source"] = str(src)
    run_curation(params, tmp_path / "serial", progress=False)
    params["curate"]["cache_dir"] = str(tmp_path / "shared-cache")
    (tmp_path / "params.json").write_text(json.dumps(params))
    procs = [subprocess.Popen([sys.executable, "-c", CURATE_IN_A_PROCESS, str(tmp_path / "params.json"),
                               str(tmp_path / name)], stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert output_digests(tmp_path / "a") == output_digests(tmp_path / "b") == output_digests(tmp_path / "serial")
