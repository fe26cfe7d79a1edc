"""`ultraflux ablation`: the 2x2 co-design grid (seed Table 1) as four queued DVC experiments.

Fast unit tests cover the cell definitions, the MLflow tags, the summary table on synthetic metrics and the parsing of
DVC's output. The slow tests run the real command once in a temporary git repository with a reduced profile, with
cell B deliberately broken (`--set-variant B:rope.kind=bogus`): the other three cells must survive, the summary must
show B as failed with the reason, curate/vae must run once per dataset variant (run cache), every cell must be a
tagged MLflow parent run. Then the same cell is recomputed from scratch and its metrics files compared byte for byte,
and a re-run of the command with the same experiment names is checked.
"""
import hashlib
import json
import os
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from conftest import copy_project
from ultraflux import codesign, tracking
from ultraflux.ablation import dvc_queue, table
from ultraflux.cli import ablation as cli

NOT_COMPUTED = "not computed (no weights at evaluate.fid_inception_weights)"


def params_for(letter, base):
    p = json.loads(json.dumps(base))
    variant, model = codesign.CELLS[letter]
    p["data"]["variant"] = variant
    p["objective"] = codesign.MODELS[model]["objective"]
    p["rope"]["kind"] = codesign.MODELS[model]["rope.kind"]
    return p


# ------------------------------------------------------------------------------------------------ fast
def test_cells_switch_loss_and_rope_together():
    assert codesign.cell_sets("A") == ["data.variant=baseline", "objective=l2", "rope.kind=flux"]
    assert codesign.cell_sets("B") == ["data.variant=multiaspect", "objective=l2", "rope.kind=flux"]
    assert codesign.cell_sets("C") == ["data.variant=baseline", "objective=ultraflux", "rope.kind=resonance_yarn"]
    assert codesign.cell_sets("D") == ["data.variant=multiaspect", "objective=ultraflux", "rope.kind=resonance_yarn"]


def test_cell_of_params(params):
    assert codesign.cell_of(params) == "D"  # params.yaml is the full recipe
    for L in "ABCD":
        assert codesign.cell_of(params_for(L, params)) == L
    mixed = params_for("A", params)
    mixed["rope"]["kind"] = "resonance_yarn"
    assert codesign.cell_of(mixed) is None and codesign.model_of(mixed) == "mixed"


def test_ablation_tags_only_for_co_design_names(params):
    assert codesign.ablation_tags(params, None) == {}
    assert codesign.ablation_tags(params, "lusty-ravs") == {}
    assert codesign.ablation_tags(params, "co-design-E") == {}
    assert codesign.ablation_tags(params, "co-design-summary") == {}
    tags = codesign.ablation_tags(params_for("C", params), "co-design-C")
    assert tags == {"ablation": "co-design", "variant": "C", "ablation.model": "ultraflux",
                    "ablation.dataset": "baseline"}
    assert codesign.ablation_tags(params_for("B", params), "co-design-B-lr2")["variant"] == "B"
    off_grid = codesign.ablation_tags(params_for("A", params), "co-design-B")
    assert off_grid["variant"] == "B" and off_grid["ablation.params_match"] == "false"


def test_run_tags_carry_the_ablation_cell(params, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "co-design-A")
    monkeypatch.delenv("ULTRAFLUX_RUN_TAGS", raising=False)
    tags = tracking.run_tags(params_for("A", params))
    assert tags["ablation"] == "co-design" and tags["variant"] == "A" and tags["dvc_exp_name"] == "co-design-A"
    assert tags["objective"] == "l2" and tags["rope.kind"] == "flux" and tags["data.variant"] == "baseline"
    monkeypatch.setenv("DVC_EXP_NAME", "some-exp")
    assert "ablation" not in tracking.run_tags(params)


def synthetic_metrics(glcm, loss, fid=None):
    """What `dvc exp show` reports for a cell: the DVC metrics (numbers only) of each stage."""
    gen = {"glcm_score": glcm, "compression_ratio": 6.0}
    if fid is not None:
        gen["fid"] = fid
    return {"evaluate": {"generation_mean": gen, "vae": {"psnr": 12.0, "ssim": 0.2, "nmse": 1.1}},
            "vae": {"final_loss": 0.4}, "dit_stage1": {"final_loss": loss, "final_val_loss": 2 * loss},
            "dit_stage2": {"final_loss": loss / 2, "final_val_loss": loss}, "curate": {"num_kept": 12}}


def synthetic_results(base):
    fid_set = params_for("D", base)
    fid_set["evaluate"]["fid_inception_weights"] = "/models/inception.pth"
    same = "e" * 64
    return {
        "A": {"status": "success", "exp_name": "co-design-A", "metrics": synthetic_metrics(1.0, 0.4),
              "params": params_for("A", base), "val_curves": {"dit_stage1": [(10, 1.0), (20, 0.8)]},
              "eval_set_sha256": same},
        "B": {"status": "failed", "exp_name": "co-design-B",
              "reason": "[curate] params.yaml: 'rope.kind' must be 'flux', 'yarn' or 'resonance_yarn' (got 'bogus')"},
        "C": {"status": "success", "exp_name": "co-design-C", "metrics": synthetic_metrics(2.0, 0.2),
              "params": params_for("C", base), "val_curves": {"dit_stage1": [(10, 0.9), (20, 0.7)]},
              "eval_set_sha256": same},
        "D": {"status": "success", "exp_name": "co-design-D", "metrics": synthetic_metrics(4.0, 0.1, fid=140.0),
              "params": fid_set, "eval_set_sha256": same},
    }


def test_summary_rows_never_invent_numbers(params):
    rows = table.summary_rows(synthetic_results(params))
    assert [r["variant"] for r in rows] == list("ABCD")
    a, b, c, d = rows
    assert a["fid"] == NOT_COMPUTED and a["hpsv3"] == "not computed (no weights at evaluate.hpsv3_weights)"
    assert d["fid"] == 140.0
    assert a["evaluate.generation_mean.glcm_score"] == 1.0 and d["evaluate.generation_mean.glcm_score"] == 4.0
    assert a["evaluate.vae.psnr"] == 12.0 and c["dit_stage1.final_val_loss"] == 0.4
    assert b["status"] == "failed" and "rope.kind" in b["reason"] and b["fid"] == "n/a (failed)"
    assert b["evaluate.generation_mean.glcm_score"] == "n/a (failed)"
    assert (a["paper_fid"], b["paper_fid"], c["paper_fid"], d["paper_fid"]) == (152.09, 151.41, 147.41, 145.81)
    assert (a["paper_hpsv3"], b["paper_hpsv3"], c["paper_hpsv3"], d["paper_hpsv3"]) == (8.57, 9.17, 10.03, 10.78)
    assert a["dataset"].startswith("Diffusion-4K") and b["dataset"].startswith("MultiAspect")
    assert a["model_loss"] == "Flux, latent L2" and d["model_loss"].startswith("UltraFlux")
    # weights configured but no number came back: said so, not invented
    res = synthetic_results(params)
    del res["D"]["metrics"]["evaluate"]["generation_mean"]["fid"]
    assert table.summary_rows(res)[3]["fid"] == "not reported"


def test_interaction_is_non_additivity():
    rows = [{"variant": L, "x": v} for L, v in zip("ABCD", [152.09, 151.41, 147.41, 145.81])]
    assert table.interaction(rows, "x") == pytest.approx(-0.92)
    rows[1]["x"] = "n/a (failed)"
    assert table.interaction(rows, "x") is None


def test_non_additivity_only_for_comparable_metrics(params):
    """(D-C)-(B-A) is a number only for metrics measured on the shared evaluation set with an objective-independent
    measure, and only when every cell's evaluation set is the same; the others say why not."""
    res = synthetic_results(params)
    res["B"] = {**res["A"], "exp_name": "co-design-B", "params": params_for("B", params),
                "metrics": synthetic_metrics(1.5, 0.3)}
    rows = table.summary_rows(res)
    same, sentence = table.eval_set_check(rows)
    assert same and "every finished cell (A, B, C, D) measured the same images" in sentence
    val = table.interaction_cell(rows, "dit_stage2.final_val_loss", same)
    assert float(val) == pytest.approx((0.1 - 0.2) - (0.3 - 0.4))
    assert float(table.interaction_cell(rows, "evaluate.generation_mean.glcm_score", same)) == pytest.approx(1.5)
    assert "depends on the objective" in table.interaction_cell(rows, "dit_stage2.final_loss", same)
    assert "counts of the data variant's own curation" in table.interaction_cell(rows, "curate.num_kept", same)
    assert "depends on the data variant" in table.interaction_cell(rows, "vae.final_loss", same)
    res["B"]["eval_set_sha256"] = "f" * 64      # one cell measured other images: nothing is compared
    rows = table.summary_rows(res)
    same, sentence = table.eval_set_check(rows)
    assert not same and sentence.startswith("WARNING") and "B: ffffffffffff" in sentence
    assert "evaluation sets differ" in table.interaction_cell(rows, "dit_stage2.final_val_loss", same)
    md = table.to_markdown(rows)
    assert "WARNING: the cells measured different evaluation sets" in md
    assert "| curate.num_kept | 12 | 12 | 12 | 12 | not a measurement: counts of the data variant's" in md


def test_write_summary_csv_markdown_png(tmp_path, params):
    rows, paths = table.write_summary(synthetic_results(params), tmp_path / "abl")
    import csv

    with open(paths["csv"]) as fh:
        rows_csv = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows_csv] == list("ABCD")
    assert rows_csv[0]["fid"] == NOT_COMPUTED and rows_csv[1]["status"] == "failed" and "bogus" in rows_csv[1]["reason"]
    assert float(rows_csv[0]["evaluate.generation_mean.glcm_score"]) == 1.0
    md = paths["md"].read_text()
    assert "| Variant | Dataset | Model / Loss | FID ↓ | HPSv3 ↑ |" in md
    for v in ("152.09", "151.41", "147.41", "145.81", "8.57", "9.17", "10.03", "10.78"):
        assert v in md
    assert "failed: [curate] params.yaml: 'rope.kind'" in md and NOT_COMPUTED in md
    assert "| dit_stage1.final_val_loss | 0.8 | n/a (failed) | 0.4 | 0.2 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["val_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["rows"][3]["fid"] == 140.0


def test_parse_queue_status_and_failure_reason():
    text = ("Task     Name         Created    Status\n"
            "6d5baf7  co-design-B  09:38 AM   Failed\n"
            "1475cdd  co-design-A  09:37 AM   Success\n"
            "a1b2c3d  None         Nov 24     Queued\n\n"
            "Worker status: 1 active, 2 idle\n")
    rows, workers = dvc_queue.parse_queue_status(text)
    assert rows == {"6d5baf7": ("co-design-B", "Failed"), "1475cdd": ("co-design-A", "Success"),
                    "a1b2c3d": ("None", "Queued")}
    assert workers == 3
    log = ("Reproducing experiment 'co-design-B'\nRunning stage 'curate':\n> python stages/curate.py\n"
           "[curate] params.yaml: 'rope.kind' must be one of flux, yarn, resonance_yarn (got 'bogus')\n"
           "ERROR: failed to reproduce 'curate': failed to run: python stages/curate.py, exited with 2\n"
           "ERROR: failed to reproduce 'curate': failed to run: python stages/curate.py, exited with 2\n")
    reason = dvc_queue.reason_from_log(log)
    assert reason.startswith("[curate] params.yaml: 'rope.kind'") and reason.count("ERROR") == 1
    assert "RuntimeError: boom" in dvc_queue.reason_from_log("Traceback...\n  File x\nRuntimeError: boom\n")


def test_queue_status_retries_dvc_s_transient_failures(monkeypatch):
    """DVC's `queue status` fails now and then while a worker rewrites a task's state; the driver asks again."""
    calls = []
    ok = "Task     Name         Created    Status\n1475cdd  co-design-A  09:37 AM   Running\n"

    def fake_dvc(args, cwd, check=True, timeout=600):
        calls.append(check)
        if len(calls) < 3:
            if check:
                raise dvc_queue.DvcError("dvc queue status failed")
            return subprocess.CompletedProcess(args, 255, "", "ERROR: unexpected error - Expecting value")
        return subprocess.CompletedProcess(args, 0, ok, "")

    monkeypatch.setattr(dvc_queue, "_dvc", fake_dvc)
    monkeypatch.setattr(dvc_queue.time, "sleep", lambda s: None)
    assert dvc_queue.queue_status(Path(".")) == {"1475cdd": ("co-design-A", "Running")}
    assert calls == [False, False, False]
    calls.clear()
    monkeypatch.setattr(dvc_queue, "_dvc", lambda args, cwd, check=True, timeout=600: (_ for _ in ()).throw(
        dvc_queue.DvcError("still failing")) if check else subprocess.CompletedProcess(args, 255, "", "x"))
    with pytest.raises(dvc_queue.DvcError):
        dvc_queue.queue_status(Path("."))


@pytest.mark.parametrize("other_state, stops_workers", [("Running", False), ("Queued", False), ("Success", True)])
def test_stop_leaves_other_experiments_workers_alone(monkeypatch, other_state, stops_workers):
    """Ctrl-C of the ablation stops its own cells; DVC's workers (repository-wide) are stopped only when no other
    experiment of this repository is queued or running."""
    calls = []
    status = {"1475cdd": ("co-design-A", "Running"), "2b3c4d5": ("co-design-B", "Queued"),
              "9f9f9f9": ("my-sweep-3", other_state)}
    monkeypatch.setattr(dvc_queue, "_dvc", lambda args, cwd, check=True, timeout=600: calls.append(args))
    monkeypatch.setattr(dvc_queue, "read_queue_status", lambda repo: (status, 1))
    monkeypatch.setattr(dvc_queue.time, "sleep", lambda s: None)
    states = dvc_queue.stop_all(Path("."), {"A": "1475cdd", "B": "2b3c4d5"}, settle=0.05)
    assert states == {"A": "Running", "B": "Queued"}
    assert ["queue", "remove", "2b3c4d5"] in calls and ["queue", "kill", "--force", "1475cdd"] in calls
    assert (["queue", "stop", "--kill"] in calls) == stops_workers


def test_wait_does_not_take_a_momentarily_missing_task_for_gone(monkeypatch):
    """A task between Queued and Running can be absent from one `dvc queue status`; only a task absent for
    MISSING_POLLS polls in a row counts as gone."""
    listings = iter([{"a1": ("co-design-A", "Success"), "d1": ("co-design-D", "Queued")},
                     {"a1": ("co-design-A", "Success")},
                     {"a1": ("co-design-A", "Success"), "d1": ("co-design-D", "Running")},
                     {"a1": ("co-design-A", "Success"), "d1": ("co-design-D", "Success")}])
    monkeypatch.setattr(dvc_queue, "read_queue_status", lambda repo: (next(listings), 1))
    assert dvc_queue.wait(Path("."), {"A": "a1", "D": "d1"}, 60, 0, log=lambda m: None) == {"A": "Success",
                                                                                           "D": "Success"}
    listings = iter([{}] * dvc_queue.MISSING_POLLS)
    assert dvc_queue.wait(Path("."), {"D": "d1"}, 60, 0, log=lambda m: None) == {"D": "missing"}


def test_manifest_identity_through_the_dvc_api(tmp_path):
    """The manifest of a commit is read through dvc.api (not DVC's cache layout): its sha256 and its evaluation
    set's (the sorted eval ids, whatever their order in the manifest)."""
    import pandas as pd

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    (tmp_path / "outputs/curated").mkdir(parents=True)
    path = tmp_path / "outputs/curated/manifest.parquet"
    pd.DataFrame({"id": ["c", "a", "b"], "eval": [True, False, True]}).to_parquet(path)
    payload = path.read_bytes()
    sh("git init -q && dvc init -q && dvc add -q outputs/curated && git add -A && "
       "git -c user.name=t -c user.email=t@t commit -qm m", tmp_path, env)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    path.write_bytes(b"changed in the workspace")
    assert dvc_queue.manifest_identity(tmp_path, rev) == (hashlib.sha256(payload).hexdigest(),
                                                          hashlib.sha256(b"b\nc").hexdigest())
    assert dvc_queue.manifest_identity(tmp_path, "0" * 40) == ("unavailable", "unavailable")


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--set-variant", "E:seed=1"])
    with pytest.raises(SystemExit):
        cli.main(["--variants", "AX"])
    with pytest.raises(SystemExit):
        cli.main(["--jobs", "0"])
    with pytest.raises(SystemExit):
        cli.main(["--suffix", "two words"])


# ------------------------------------------------------------------------------------------------ slow: real DVC
def sh(cmd, cwd, env, timeout=900, ok=(0,)):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=True)
    assert proc.returncode in ok, f"{cmd} -> {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


TINY = {  # a reduced profile: the grid's mechanics, not its numbers, are under test here
    ("data", "synthetic", "num_images"): 24, ("data", "synthetic", "long_side"): 512,
    ("curate", "min_train_images"): 2,   # 24 generated images leave 3 to train on in cell D (the guard's default: 4)
    ("vae_train", "steps"): 2, ("vae_train", "resolution"): 64, ("vae_train", "eval_every"): 2,
    ("dit_stage1", "steps"): 2, ("dit_stage1", "checkpoint_every"): 2,
    ("dit_stage2", "steps"): 2, ("dit_stage2", "checkpoint_every"): 2,
    ("sample", "aspects"): ["1:1", "2:1"], ("sample", "num_inference_steps"): 2,
}


def tiny_repo(dst):
    from ruamel.yaml import YAML

    copy_project(dst)
    rt = YAML()
    p = rt.load((dst / "params.yaml").read_text())
    for keys, v in TINY.items():
        node = p
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = v
    p["sample"]["prompts"] = p["sample"]["prompts"][:1]
    with open(dst / "params.yaml", "w") as fh:
        rt.dump(p, fh)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ablation") / "repo"
    repo.mkdir()
    tiny_repo(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MLFLOW_TRACKING_URI",
                                                            "ULTRAFLUX_RUN_TAGS", "DVC_EXP_NAME", "DVC_ROOT")}
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", repo, env)
    t0 = time.time()
    proc = sh("ultraflux ablation --poll 4 --timeout 1500 --set-variant B:rope.kind=bogus", repo, env, timeout=1800,
              ok=(1,))
    return {"repo": repo, "env": env, "proc": proc, "wall": time.time() - t0}


def not_run_cached(repo):
    """Stages DVC never restores from its run cache: those with a `persist: true` output (dvc/stage/cache.py)."""
    from ultraflux.config import parse_yaml

    stages = parse_yaml((repo / "dvc.yaml").read_text())["stages"]
    return {name for name, st in stages.items() for out in st.get("outs", [])
            if isinstance(out, dict) and any((o or {}).get("persist") for o in out.values())}


def mlflow_runs(repo, filter_string):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("ultraflux")
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


@pytest.mark.slow
def test_grid_survives_a_failed_cell_and_shares_stages(grid):
    repo, out = grid["repo"], grid["proc"].stdout
    import csv

    with open(repo / "outputs/ablation/table1.csv") as fh:
        table = {r["variant"]: r for r in csv.DictReader(fh)}
    want = {"A": "success", "B": "failed", "C": "success", "D": "success"}
    assert {L: table[L]["status"] for L in "ABCD"} == want, out
    assert "rope.kind" in table["B"]["reason"] and "bogus" in table["B"]["reason"]
    assert (repo / "outputs/ablation/logs/co-design-B.log").read_text().count("rope.kind") >= 1
    for L in "ACD":
        assert table[L]["fid"].startswith("not computed") and float(table[L]["evaluate.vae.psnr"]) > 0
        assert len(table[L]["manifest_sha256"]) == 64 and len(table[L]["exp_rev"]) == 40
    assert table["A"]["manifest_sha256"] == table["C"]["manifest_sha256"] != table["D"]["manifest_sha256"]
    # A (baseline data) and D (multi-aspect data) measured the same evaluation set, so their numbers compare
    assert len(table["A"]["eval_set_sha256"]) == 64
    assert table["A"]["eval_set_sha256"] == table["C"]["eval_set_sha256"] == table["D"]["eval_set_sha256"]
    md = (repo / "outputs/ablation/table1.md").read_text()
    assert "every finished cell (A, C, D) measured the same images" in md
    summary = json.loads((repo / "outputs/ablation/summary.json").read_text())
    assert summary["same_eval_set"] is True
    assert summary["non_additivity"]["dit_stage1.final_loss"].startswith("not comparable across cells")
    assert summary["non_additivity"]["curate.num_kept"].startswith("not a measurement")
    for L in "ACD":   # the closing note's figures: the validation velocity MSE on the shared set
        print(L, {k: table[L][k] for k in table[L] if k.endswith("final_val_loss") or k.startswith("evaluate.")})
    assert "152.09" in md and "10.78" in md and "failed: " in md
    assert (repo / "outputs/ablation/table1.png").stat().st_size > 10_000

    # dvc exp show: the three finished cells with their metrics
    shown = json.loads(sh("dvc exp show --json", repo, grid["env"]).stdout)
    exps = {e["name"]: e for b in shown for e in (b.get("experiments") or [])}
    for L in "ACD":
        data = exps[f"co-design-{L}"]["revs"][0]["data"]
        assert "metrics/evaluate.json" in data["metrics"]
    assert exps["co-design-B"]["executor"]["state"] == "failed"

    # run cache: curate and vae once per dataset variant (A: baseline, D: multiaspect; C restores A's), DiT per cell
    stages = [r.data.tags["ultraflux.stage"] for r in mlflow_runs(repo, "tags.`ultraflux.role` = 'stage'")]
    counts = {s: stages.count(s) for s in set(stages)}
    assert counts["curate"] == 2, counts
    # vae is shared too, unless dvc.yaml gives it a persist output (resumable checkpoints), which turns DVC's run
    # cache off for the stage: then C recomputes A's VAE (same inputs, same result, only slower).
    if "vae" in not_run_cached(repo):
        warnings.warn("dvc.yaml: stage vae has a persist output, so DVC's run cache cannot share it between the "
                      "ablation cells (it runs once per cell instead of once per dataset variant)")
    assert counts["vae"] == (3 if "vae" in not_run_cached(repo) else 2), counts
    assert counts["dit_stage1"] == 3 and counts["evaluate"] == 3, counts  # A, C, D; B failed before any stage
    # stage runs are tagged through run_tags while they run
    child = mlflow_runs(repo, "tags.`ultraflux.stage` = 'dit_stage1' and tags.variant = 'C'")
    assert len(child) == 1 and child[0].data.tags["ablation"] == "co-design"

    # MLflow: one parent run per cell, tagged, in one experiment; a summary run with the table
    parents = mlflow_runs(repo, "tags.ablation = 'co-design' and tags.`ultraflux.role` = 'parent'")
    by = {r.data.tags["variant"]: r for r in parents}
    assert sorted(by) == list("ABCD") and len(parents) == 4
    for L, r in by.items():
        assert r.data.tags["dvc_exp_name"] == f"co-design-{L}"
        assert len(r.data.tags["git_commit"]) == 40
    for L in "ACD":
        assert by[L].info.status == "FINISHED" and len(by[L].data.tags["data.manifest_sha256"]) == 64
        assert by[L].data.tags["data.eval_set_sha256"] == table["A"]["eval_set_sha256"]
        assert by[L].data.params["objective"] == codesign.MODELS[codesign.CELLS[L][1]]["objective"]
        assert "evaluate.vae.psnr" in by[L].data.metrics and "dit_stage2.final_loss" in by[L].data.metrics
    assert by["B"].info.status == "FAILED" and "bogus" in by["B"].data.tags["ablation.reason"]
    [summary] = mlflow_runs(repo, "tags.ablation = 'co-design' and tags.`ultraflux.role` = 'summary'")
    assert summary.info.run_name == "co-design-summary"
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient(f"sqlite:///{repo}/mlflow.db").list_artifacts(summary.info.run_id)}
    assert {"table1.csv", "table1.md", "table1.png"} <= arts


@pytest.mark.slow
def test_exp_show_view_fits_a_terminal(grid):
    """`ultraflux exp show`: the four cells with their axes and headline numbers in <= 120 columns; `--changed`
    lists what differs between the cells and no dependency hash."""
    repo, env = grid["repo"], grid["env"]
    view = sh("ultraflux exp show", repo, env).stdout
    lines = view.splitlines()
    assert max(map(len, lines)) <= 120, view
    for L in "ACD":
        row = next(ln for ln in lines if f"co-design-{L} " in ln + " ")
        assert codesign.CELLS[L][0] in row and row.split()[4] not in ("-", "nan"), (L, view)  # s1_val is a number
    changed = sh("ultraflux exp show --changed", repo, env).stdout
    header = changed.splitlines()[0].split()
    assert "p:data.variant" in header and "p:objective" in header and "p:rope.kind" in header, changed
    assert not any(h.startswith(("ultraflux/", "outputs/", "stages/")) or h.endswith(".py") for h in header)
    assert "p:seed" not in header                                            # the same in every row


@pytest.mark.slow
def test_same_params_same_seed_same_metrics(grid):
    """Cell D recomputed from scratch in the workspace (`dvc repro --no-run-cache`; params.yaml is cell D) gives
    byte-identical metrics files to the queued experiment co-design-D."""
    repo, env = grid["repo"], grid["env"]
    sh("dvc repro --no-run-cache", repo, env, timeout=900)
    shown = json.loads(sh("dvc exp show --json", repo, env).stdout)
    rev = next(e["revs"][0]["rev"] for b in shown for e in (b.get("experiments") or []) if e["name"] == "co-design-D")
    differ = {}
    for f in sorted((repo / "metrics").glob("*.json")):
        committed = sh(f"git show {rev}:metrics/{f.name}", repo, env).stdout
        if committed != f.read_text():
            a, b = json.loads(committed), json.loads(f.read_text())
            differ[f.name] = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not differ, f"same params and seed, different metrics: {differ}"


@pytest.mark.slow
def test_curated_manifest_is_byte_reproducible(grid):
    """Runs after the test above: outputs/curated is then cell D recomputed in the workspace."""
    import csv

    with open(grid["repo"] / "outputs/ablation/table1.csv") as fh:
        d = next(r for r in csv.DictReader(fh) if r["variant"] == "D")
    manifest = (grid["repo"] / "outputs/curated/manifest.parquet").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == d["manifest_sha256"]


@pytest.mark.slow
def test_rerun_with_existing_names(grid):
    """Running the command again replaces the experiments of the same names; cells whose stages are all in the run
    cache are restored (no stage runs) and still get a tagged MLflow parent run."""
    repo, env = grid["repo"], grid["env"]
    before = {r.info.run_id for r in mlflow_runs(repo, "tags.`ultraflux.role` = 'stage'")}
    proc = sh("ultraflux ablation --poll 4 --variants A --out outputs/ablation-rerun", repo, env, timeout=900)
    assert "A co-design-A: success" in proc.stdout
    # nothing recomputed except stages the run cache cannot hold (persist outputs); those give byte-identical
    # outputs, so everything downstream of them is restored again
    rerun = {r.data.tags["ultraflux.stage"] for r in mlflow_runs(repo, "tags.`ultraflux.role` = 'stage'")
             if r.info.run_id not in before}
    assert rerun <= not_run_cached(repo), rerun
    runs = mlflow_runs(repo, "tags.variant = 'A' and tags.`ultraflux.role` = 'parent'")
    assert all(r.data.tags["ablation"] == "co-design" for r in runs)
    if not rerun:  # no stage ran: the earlier parent of the same name and commit is reused, no empty one is added
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
        assert "evaluate.vae.psnr" in runs[0].data.metrics
    else:
        assert len(runs) == 2
    shown = json.loads(sh("dvc exp show --json", repo, env).stdout)
    assert [e["name"] for b in shown for e in (b.get("experiments") or [])].count("co-design-A") == 1
    import csv

    with open(repo / "outputs/ablation/table1.csv") as fh:
        first = next(r for r in csv.DictReader(fh) if r["variant"] == "A")
    with open(repo / "outputs/ablation-rerun/table1.csv") as fh:
        again = next(csv.DictReader(fh))
    for k in ("evaluate.generation_mean.glcm_score", "evaluate.generation_mean.compression_ratio", "evaluate.vae.psnr",
              "dit_stage2.final_loss", "manifest_sha256"):
        assert first[k] == again[k], k


def queue_workers(repo):
    """DVC queue worker processes started for ``repo`` (dvc exp queue-worker daemons run with cwd = the repo)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "queue-worker" in cmd and str(p.info["cwd"] or "").startswith(str(repo)):
            found.append(cmd)
    return found


@pytest.mark.slow
def test_sigterm_stops_the_grid_cleanly(grid):
    """SIGTERM while a cell trains: the workers are stopped (none left), the cell is marked interrupted in a partial
    table, its MLflow parent is not left RUNNING, and the command exits 128 + 15."""
    import signal
    import sys

    repo, env = grid["repo"], grid["env"]
    ultraflux = str(Path(sys.executable).with_name("ultraflux"))   # no shell between us and the signal
    proc = subprocess.Popen([ultraflux, "ablation", "--poll", "1", "--variants", "C", "--suffix", "stop", "-S",
                             "dit_stage1.steps=400"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    t0 = time.time()
    for line in proc.stdout:  # wait until the cell runs, then give its stages a few seconds
        lines.append(line)
        if "C:Running" in line:
            break
        assert time.time() - t0 < 600, "".join(lines)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out
    time.sleep(2)
    assert queue_workers(repo) == [], out
    assert "0 active" in sh("dvc queue status", repo, env).stdout
    import csv

    with open(repo / "outputs/ablation/table1.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["variant"] == "C")
    assert row["status"] == "interrupted" and "SIGTERM" in row["reason"], row
    parents = mlflow_runs(repo, "tags.dvc_exp_name = 'co-design-C-stop' and tags.`ultraflux.role` = 'parent'")
    assert parents and all(r.info.status != "RUNNING" for r in parents), [r.info.status for r in parents]
