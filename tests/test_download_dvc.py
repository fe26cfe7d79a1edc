"""A real ``dvc repro curate`` from a released-layout metadata folder whose URLs a fault-injecting server on
127.0.0.1 serves: download (one status row per URL, shards hold exactly the ok images), a ``kill -9`` of the
download stage and a re-run that fetches only the URLs without a result (the server's request log), then curation
on the released scores (``released:<field>``), the flatness/entropy agreement and the credits file."""
import json
import os
import signal
import subprocess
import time

import pandas as pd
import psutil
import pytest
import yaml

from conftest import copy_project
from download_fixtures import release_folder
from fault_server import FaultServer
from ultraflux.config import load_params
from ultraflux.data.shards import iter_shard

OK = [f"/img/{i}.jpg" for i in range(12)]
FAULTS = {"/404/a": "http_404", "/429/a": "ok", "/flaky/a": "ok", "/slow/a": "timeout", "/truncated/a": "truncated",
          "/wrongtype/a": "not_image", "/html/a": "not_image", "/loop/a": "redirect_loop", "/bigstream/a": "too_large"}


def write_params(repo, source, cache):
    params = load_params(repo / "params.yaml")
    params["data"]["source"] = str(source)
    params["download"].update(workers=2, per_host=2, timeout_s=1.0, retries=1, backoff_s=0.01, max_backoff_s=2.0,
                              max_mb=1.0, allow_private_addresses=True, cache_dir=str(cache))
    curate = params["curate"]
    curate["quality"]["source"] = curate["aesthetic"]["source"] = "released"
    curate["aesthetic"]["keep_top"] = 0.5
    curate["min_train_images"], curate["min_holdout_images"], curate["workers"] = 1, 0, 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def stage_process(proc):
    """The stage's own ``python stages/download.py``. DVC runs a command through ``$SHELL -c``; a shell that does not
    exec its last command (dash, ``/bin/sh`` on Debian) stays between dvc and the stage with the same command line.
    Killing that shell would orphan the stage, which goes on downloading and holds dvc's output open."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    stage = [c for c in kids if "stages/download.py" in " ".join(c.cmdline())]
    return next((c for c in stage if not any(k in stage for k in c.children())), None)


@pytest.mark.slow
def test_dvc_repro_download_kill_resume_and_curate_on_released_scores(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MLFLOW_TRACKING_URI")}
    env["SHELL"] = "/bin/sh"  # a shell between dvc and the stage, as where $SHELL is unset (see stage_process)
    cache = tmp_path / "download-cache"
    with FaultServer(latency_s=0.25, slow_s=2.0, big_bytes=2 << 20) as server:
        urls = [server.url(p) for p in OK + list(FAULTS)]
        low = {urls[0]: {"qalign_score": 3.2}}  # below Q-Align 4.0: low_quality on the released score
        source = release_folder(tmp_path / "MultiAspect-4K-1M", urls, low)
        write_params(repo, source, cache)
        subprocess.run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init",
                       cwd=repo, shell=True, check=True)

        server.hold("/img/", after=4)  # later images wait: the kill surely lands mid-download, whatever the load
        proc = subprocess.Popen(["dvc", "repro", "curate"], cwd=repo, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not (server.held and any(cache.rglob("*.res.json"))) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        stage = stage_process(proc)
        assert stage is not None, "the download stage is not running"
        stage.send_signal(signal.SIGKILL)  # kill -9 mid-download
        out = proc.communicate(timeout=120)[0]
        server.release()
        assert proc.returncode != 0, out[-2000:]
        done = {json.loads(p.with_name(p.name.replace(".res.json", ".meta.json")).read_text())["url"]
                for p in cache.rglob("*.res.json")}
        assert 0 < len(done) < len(urls), done
        seen_before = len(server.requests)

        rerun = subprocess.run(["dvc", "repro", "curate"], cwd=repo, env=env, capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        second = server.requests[seen_before:]

    prefix = urls[0][: urls[0].index("/img/")]
    first_hops = {p for p in second if not p.startswith("/loop2/")}
    assert first_hops == {u[len(prefix):] for u in urls if u not in done}  # only the missing URLs were fetched
    status = pd.read_parquet(repo / "outputs/download/status.parquet")
    assert len(status) == len(urls) and status["url"].is_unique
    by_path = dict(zip(status["url"].str[len(prefix):], status["status"]))
    assert by_path == {**{p: "ok" for p in OK}, **FAULTS}
    ok_keys = set(status.loc[status["status"] == "ok", "key"])
    shard_keys = {k for s in (repo / "outputs/download/shards").glob("*.tar") for k, _ in iter_shard(s)}
    assert shard_keys == ok_keys

    result = json.loads((repo / "outputs/results/curate.json").read_text())
    assert result["quality_scorer"] == "released:qalign_score"
    assert result["aesthetic_scorer"] == "released:aesthetics_score"
    assert result["num_sources"] == len(ok_keys) and result["rejected_low_quality"] == 1
    assert result["released_flatness_compared"] == len(ok_keys) and result["released_entropy_max_abs_delta"] >= 0
    manifest = pd.read_parquet(repo / "outputs/curated/manifest.parquet")
    kept = manifest[manifest["kept"]]
    assert len(kept) and kept["photographer"].str.startswith("Ann ").all() and kept["url"].str.startswith(prefix).all()
    assert (manifest["quality"] == manifest["released_quality"]).all()
    credits = subprocess.run(["ultraflux", "credits", "--out", "CREDITS.md"], cwd=repo, env=env, capture_output=True,
                             text=True)
    assert credits.returncode == 0, credits.stderr
    text = (repo / "CREDITS.md").read_text()
    assert all(name in text for name in kept["photographer"]) and f"{len(kept)} image(s) credited" in text
