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
