"""dvc.yaml lists exactly the params each stage reads, so an edit re-runs only what depends on it."""
import yaml

from ultraflux.stage import STAGE_PARAMS
from conftest import ROOT


def test_stage_params_match_dvc_yaml():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_PARAMS)
    for name, stage in stages.items():
        assert sorted(stage.get("params", [])) == sorted(STAGE_PARAMS[name]), name


def test_every_stage_has_metrics_and_code_deps():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert any(str(d).startswith("stages/") for d in stage["deps"]), name
        assert stage.get("metrics"), name
