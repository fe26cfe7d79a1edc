"""Released metadata (release layout, bad files, subsets, tarball safety), URL safety, the fetcher's statuses against
a fault-injecting server on 127.0.0.1, and the download's outputs and resume (no network beyond loopback)."""
import hashlib
import io
import json
import tarfile
import time

import pandas as pd
import pytest

from download_fixtures import FIELDS, record, release_folder
from fault_server import FaultServer
from ultraflux.data import metadata
from ultraflux.data.download import run_download
from ultraflux.data.fetch import Fetcher
from ultraflux.data.safety import url_problem
from ultraflux.data.shards import iter_shard

def collect(source, fields=FIELDS):
    problems = []
    mapping, records = metadata.iter_records(source, fields, problems.append)
    return mapping, list(records), problems


def test_release_layout_records_and_problems(tmp_path):
    urls = [f"http://example.org/{i}.jpg" for i in range(9)]
    mapping, records, problems = collect(release_folder(tmp_path / "meta", urls))
    assert sorted(r["url"] for r in records) == sorted(urls)
    first = next(r for r in records if r["url"] == urls[0])
    assert first["caption"] == "A photo number 0." and first["caption_zh"] == "照片 0"  # auto-detected zh_caption
    assert first["quality"] == 4.5 and first["photographer"] == "Ann 0" and first["tag"] == "landscape"
    assert mapping["caption_zh"] == "zh_caption" and mapping["tag"] == "tag"
    reasons = {(p.file, p.reason.split(":")[0]) for p in problems}
    assert ("broken.json", "malformed_json") in reasons
    assert ("part-2.json", "malformed_record") in reasons and ("part-2.json", "missing_field") in reasons


def test_missing_required_field_stops_naming_it_and_the_fields_found(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.json").write_text(json.dumps([{"link": "http://x/1.jpg", "en_caption": "c"}]))
    with pytest.raises(metadata.MetadataError, match=r"data\.metadata\.fields\.url = 'image_url'.*fields found: "
                                                      r"link, en_caption"):
        collect(tmp_path / "m")
    # a custom field name through params works
    _, records, _ = collect(tmp_path / "m", {**FIELDS, "url": "link"})
    assert records[0]["url"] == "http://x/1.jpg"


def test_one_large_json_file_is_streamed_record_by_record(tmp_path):
    """A single ~8 MB list (the release's files may be large): parsing holds about one record, not the file."""
    import tracemalloc

    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "all.json"
    with path.open("w") as f:   # written in pieces: the test itself never holds the file
        f.write("[")
        for i in range(20_000):
            f.write(("," if i else "") + json.dumps(record(f"http://example.org/{i}.jpg", i)))
        f.write("]")
    size = path.stat().st_size
    problems = []
    tracemalloc.start()
    _, records = metadata.iter_records(tmp_path / "m", FIELDS, problems.append)
    count, last = 0, None
    for r in records:
        count, last = count + 1, r
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 20_000 and not problems and last["url"] == "http://example.org/19999.jpg"
    assert last["quality"] == record("", 19999)["qalign_score"] and isinstance(last["record"]["flat_percentage"], float)
    assert size > 6e6 and peak < size / 4, (size, peak)   # measured ~1.2 MB; parsed at once: > 1x the size


def test_a_file_that_breaks_off_keeps_its_earlier_records_and_says_where(tmp_path):
    (tmp_path / "m").mkdir()
    good = [record(f"http://example.org/{i}.jpg", i) for i in range(3)]
    text = json.dumps(good)
    (tmp_path / "m" / "cut.json").write_text(text[:-1] + ', {"image_url": "http://example.org/x.jpg", "en_')
    bom = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark
    (tmp_path / "m" / "bom.json").write_bytes(bom + json.dumps({"items": [record("http://b/1.jpg")]}).encode())
    (tmp_path / "m" / "scalar.json").write_text("42")
    (tmp_path / "m" / "object.json").write_text(json.dumps({"meta": {"n": 1}, "rows": [record("http://c/1.jpg")]}))
    _, records, problems = collect(tmp_path / "m")
    assert sorted(r["url"] for r in records) == ["http://b/1.jpg"] + [g["image_url"] for g in good]
    reasons = {p.file: p.reason for p in problems}
    assert reasons["cut.json"].startswith("malformed_json") and set(reasons) == {"cut.json", "scalar.json",
                                                                                  "object.json"}
    assert reasons["scalar.json"].startswith("no_records: top level is number")
    assert reasons["object.json"] == ("no_records: top level is dict (keys ['meta', 'rows']), not a list or an object "
                                      "with 'data' / 'items'")


def test_subset_is_the_same_whatever_the_file_order_and_grows_by_inclusion(tmp_path):
    urls = [f"http://example.org/{i}.jpg" for i in range(60)]
    a = release_folder(tmp_path / "a", urls)
    b = release_folder(tmp_path / "b", urls[::-1])
    pick = {}
    for name, folder in (("a", a), ("b", b)):
        _, records = metadata.iter_records(folder, FIELDS, lambda p: None)
        pick[name] = [r["url"] for r in metadata.select_subset(records, 10)]
    assert pick["a"] == pick["b"] and len(pick["a"]) == 10
    _, records = metadata.iter_records(a, FIELDS, lambda p: None)
    assert set(pick["a"]) < {r["url"] for r in metadata.select_subset(records, 20)}


def test_subset_counts_a_url_listed_twice_once(tmp_path):
    """The release may list one URL in two records (another file, another caption): it takes one place in the
    subset (its last record, as the download keeps), and records that differ are never compared."""
    (tmp_path / "m").mkdir()
    recs = [record(f"http://x/{i}.jpg", i) for i in range(7)]
    recs += [{**r, "en_caption": "a second caption"} for r in recs]
    (tmp_path / "m" / "a.json").write_text(json.dumps(recs))
    _, records = metadata.iter_records(tmp_path / "m", FIELDS, lambda p: None)
    chosen = list(metadata.select_subset(records, 3))
    assert len({r["url"] for r in chosen}) == 3 == len(chosen)
    assert {r["caption"] for r in chosen} == {"a second caption"}


def test_balanced_subset_takes_every_aspect_group(tmp_path):
    (tmp_path / "m").mkdir()
    recs = [record(f"http://x/w{i}.jpg", i, width=4000, height=2250) for i in range(30)]
    recs += [record(f"http://x/p{i}.jpg", i, width=2250, height=4000) for i in range(3)]
    (tmp_path / "m" / "a.json").write_text(json.dumps(recs))
    _, records = metadata.iter_records(tmp_path / "m", FIELDS, lambda p: None)
    groups = [r["group"] for r in metadata.select_subset(records, 6, balance_aspects=True)]
    assert groups.count("9:16") == 3 and groups.count("16:9") == 3


def test_tarball_refuses_absolute_parent_and_link_members(tmp_path):
    path = tmp_path / "MultiAspect-4K-1M.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data=b"", **kw):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data))
        add("release/good.json", json.dumps([record("http://x/1.jpg")]).encode())
        add("/etc/evil.json", json.dumps([record("http://x/2.jpg")]).encode())
        add("release/../../evil.json", json.dumps([record("http://x/3.jpg")]).encode())
        add("release/sym.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("release/hard.json", type=tarfile.LNKTYPE, linkname="release/good.json")
    assert metadata.is_metadata_source(path)
    _, records, problems = collect(path)
    assert [r["url"] for r in records] == ["http://x/1.jpg"]
    table = {p.file: p.reason for p in problems}
    assert table == {"/etc/evil.json": "unsafe_member: absolute path",
                     "release/../../evil.json": "unsafe_member: '..' in path",
                     "release/sym.json": "unsafe_member: link to '/etc/passwd'",
                     "release/hard.json": "unsafe_member: link to 'release/good.json'"}


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "unsafe_url: scheme 'file'"),
    ("data:image/png;base64,AAAA", "unsafe_url: scheme 'data'"),
    ("ftp://example.org/a.jpg", "unsafe_url: scheme 'ftp'"),
    ("gopher://example.org/", "unsafe_url: scheme 'gopher'"),
    ("http:///nohost.jpg", "unsafe_url: no host"),
    ("http://127.0.0.1/a.jpg", "private_address: 127.0.0.1"),
    ("http://localhost/a.jpg", "private_address: "),
    ("http://10.1.2.3/a.jpg", "private_address: 10.1.2.3"),
    ("http://192.168.0.7/a.jpg", "private_address: 192.168.0.7"),
    ("http://169.254.169.254/latest/meta-data/", "private_address: 169.254.169.254"),
    ("http://[::1]/a.jpg", "private_address: ::1"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "private_address: 127.0.0.1"),
    ("http://0x7f.1/a.jpg", "private_address: 127.0.0.1"),
    ("http://0.0.0.0/a.jpg", "private_address: 0.0.0.0"),
    ("https://93.184.215.14/a.jpg", ""),
])
def test_unsafe_url_refusal_table(url, reason):
    got = url_problem(url, allow_private=False)
    assert got.startswith(reason) and bool(got) == bool(reason), got


def fetcher_cfg(**over) -> dict:
    cfg = {"engine": "local", "engine_workers": 1, "workers": 8, "per_host": 8, "timeout_s": 1.0, "retries": 2,
           "backoff_s": 0.01, "max_backoff_s": 2.0,
           "max_mb": 1.0, "max_redirects": 3, "retry_transient": False, "allow_private_addresses": True, "user_agent": "test",
           "shard_max_mb": 1, "cache_dir": ""}
    return cfg | over


FAULTS = [  # path, status, requests the server sees
    ("/img/a.jpg", "ok", 1),
    ("/404/a", "http_404", 1),
    ("/429/a", "ok", 2),
    ("/flaky/a", "ok", 2),
    ("/slow/a", "timeout", 3),
    ("/truncated/a", "truncated", 3),
    ("/wrongtype/a", "not_image", 1),
    ("/html/a", "not_image", 1),
    ("/disguised/a", "not_image", 1),
    ("/loop/a", "redirect_loop", 1),
    ("/redirect/b", "ok", 1),
    ("/tofile/a", "unsafe_url", 1),
    ("/big/a", "too_large", 1),
    ("/bigstream/a", "too_large", 1),
    ("/gzipbomb/a", "too_large", 1),
]


def test_fetcher_statuses_attempts_and_retry_after():
    with FaultServer(slow_s=2.0, big_bytes=2 << 20) as server:
        fetcher = Fetcher(fetcher_cfg())
        try:
            results = {}
            for path, _, _ in FAULTS:
                t0 = time.perf_counter()
                results[path] = (fetcher.fetch(server.url(path)), time.perf_counter() - t0)
        finally:
            fetcher.close()
        for path, status, requests in FAULTS:
            fetched, _ = results[path]
            assert fetched.status == status, (path, fetched)
            assert server.count(path) == requests, (path, server.requests)
        assert results["/429/a"][1] >= 1.0  # Retry-After: 1 honoured, not the 10 ms back-off
        assert results["/429/a"][0].attempts == 2 and results["/img/a.jpg"][0].attempts == 1
        assert results["/img/a.jpg"][0].data[:3] == b"\xff\xd8\xff"
        assert server.count("/loop2/a") == 1 and server.count("/img/b.jpg") == 1
        # refused without the opt-in: the loopback server is never contacted
        refused = Fetcher(fetcher_cfg(allow_private_addresses=False))
        refusal = refused.fetch(server.url("/img/z.jpg"))
        refused.close()
        assert (refusal.status, refusal.attempts) == ("private_address", 0)
        assert server.count("/img/z.jpg") == 0


def params_for(source, cache, **download) -> dict:
    return {"data": {"source": str(source), "metadata": {"max_records": 0, "balance_aspects": False,
                                                          "fields": FIELDS}},
            "download": fetcher_cfg(**{"cache_dir": str(cache), "retries": 1, **download})}


def test_download_outputs_one_row_per_url_shards_hold_the_ok_images_and_rerun_fetches_nothing(tmp_path):
    with FaultServer() as server:
        paths = [f"/img/{i}.jpg" for i in range(6)] + ["/404/x", "/html/x", "/img/0.jpg"]  # one URL listed twice
        urls = [server.url(p) for p in paths]
        source = release_folder(tmp_path / "meta", urls)
        out, cache = tmp_path / "out", tmp_path / "cache"
        summary = run_download(params_for(source, cache), out, progress=False)
        assert summary["num_urls"] == 8 and summary["num_ok"] == 6 and summary["duplicate_urls"] == 1
        assert summary["status_http_404"] == 1 and summary["status_not_image"] == 1
        assert server.count("/img/0.jpg") == 1  # listed twice, fetched once
        status = pd.read_parquet(out / "status.parquet")
        assert sorted(status["url"]) == sorted(set(urls)) and list(status["key"]) == sorted(status["key"])
        ok = status[status["status"] == "ok"]
        samples = {k: s for shard in sorted((out / "shards").glob("*.tar")) for k, s in iter_shard(shard)}
        assert set(samples) == set(ok["key"])
        sample = samples[ok["key"].iloc[0]]
        meta = json.loads(sample["json"])
        assert hashlib.sha256(sample["jpg"]).hexdigest() == ok["sha256"].iloc[0]  # the original bytes
        assert meta["url"] == ok["url"].iloc[0] and sample["txt"].decode() == meta["caption"]
        assert meta["photographer"].startswith("Ann ") and meta["record"]["image_url"] == meta["url"]
        first_bytes = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}

        before = len(server.requests)
        again = run_download(params_for(source, cache), tmp_path / "out2", progress=False)
        assert len(server.requests) == before and again["_timing"]["fetched_this_run"] == 0
        assert {p.name: p.read_bytes() for p in (tmp_path / "out2" / "shards").glob("*.tar")} == first_bytes


def test_rerun_with_retry_transient_refetches_only_transient_failures(tmp_path):
    with FaultServer(slow_s=2.0) as server:
        urls = [server.url(p) for p in ("/img/1.jpg", "/404/t", "/slow/t")]
        source, cache = release_folder(tmp_path / "meta", urls), tmp_path / "cache"
        first = run_download(params_for(source, cache, retries=0), tmp_path / "a", progress=False)
        assert first["status_timeout"] == 1 and first["status_ok"] == 1
        before = server.requests
        run_download(params_for(source, cache, retries=0, retry_transient=True), tmp_path / "b", progress=False)
        assert server.requests[len(before):] == ["/slow/t"]


@pytest.mark.slow
def test_local_and_ray_engines_give_byte_identical_shards(tmp_path):
    pytest.importorskip("ray")
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(8)] + [server.url("/404/r")]
        source = release_folder(tmp_path / "meta", urls)
        shards = {}
        for engine in ("local", "ray"):
            params = params_for(source, tmp_path / f"cache-{engine}", engine=engine, engine_workers=2)
            summary = run_download(params, tmp_path / engine, progress=False)
            assert summary["num_ok"] == 8 and summary["status_http_404"] == 1
            shards[engine] = {p.name: p.read_bytes() for p in (tmp_path / engine / "shards").glob("*.tar")}
            shards[engine]["status"] = pd.read_parquet(tmp_path / engine / "status.parquet").to_json()
        assert shards["local"] == shards["ray"] and len(shards["local"]) >= 2
        assert server.count("/img/0.jpg") == 2  # once per engine (separate caches)


def test_retry_after_in_seconds_or_as_an_http_date():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from ultraflux.data.fetch import retry_after_seconds

    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds(when) <= 31


def test_img2dataset_output_is_a_curation_source(tmp_path):
    """img2dataset's layout: NNNNN.tar with <key>.jpg / .txt / .json (its own json keys plus kept record columns),
    beside NNNNN.parquet and NNNNN_stats.json; images are read in place (one seek), metadata mapped."""
    from fault_server import jpeg_bytes
    from ultraflux.data.ingest import list_sources
    from ultraflux.data.process import read_source

    out = tmp_path / "img2dataset"
    out.mkdir()
    images = {f"00000000{i}": jpeg_bytes(f"i2d{i}") for i in range(3)}
    with tarfile.open(out / "00000.tar", "w") as tar:
        for key, data in images.items():
            meta = {"key": key, "status": "success", "url": f"https://images.pexels.com/{key}.jpeg",
                    "caption": f"caption {key}", "qalign_score": 4.2, "aesthetics_score": 61.0,
                    "photographer": "Bo", "work_url": f"https://www.pexels.com/photo/{key}/"}
            for ext, body in (("jpg", data), ("txt", f"caption {key}".encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    pd.DataFrame({"key": list(images), "status": "success"}).to_parquet(out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    assert not metadata.is_metadata_source(out)
    items = list_sources(out)
    assert [it.caption for it in items] == [f"caption {k}" for k in images]
    assert {it.meta["quality"] for it in items} == {4.2} and items[0].meta["photographer"] == "Bo"
    assert items[0].meta["_names"]["quality"] == "qalign_score"
    for item, data in zip(items, images.values()):
        got, _, error = read_source(item.path)
        assert got == data and error == ""
