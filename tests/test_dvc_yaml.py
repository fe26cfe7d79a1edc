"""dvc.yaml lists exactly the params each stage reads, so an edit re-runs only what depends on it."""
import yaml

from ultraflux.stage import STAGE_PARAMS
from conftest import ROOT


def test_stage_params_match_dvc_yaml():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_PARAMS)
    for name, stage in stages.items():
        declared = ["*" if p == {"params.yaml": None} else p for p in stage.get("params", [])]
        assert sorted(declared) == sorted(STAGE_PARAMS[name]), name


def test_metrics_files_are_the_headline_stages():
    """A stage has a DVC metrics file exactly when it has headline numbers; every stage records its results."""
    from ultraflux.stage import HEADLINE

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        metrics = [next(iter(m)) for m in stage.get("metrics", [])]
        assert metrics == ([f"metrics/{name}.json"] if name in HEADLINE else []), name
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert f"outputs/results/{name}.json" in outs, name


def test_every_stage_can_use_the_run_cache():
    """DVC saves no run-cache entry for a stage with an uncached plain output (only metrics and plots may be
    `cache: false`); the ablation shares curate/vae between cells through the run cache."""
    from dvc.repo import Repo

    for stage in Repo(str(ROOT)).index.stages:
        assert all(out.use_cache or out.is_metric or out.is_plot for out in stage.outs), stage.addressing
