"""params.yaml validation and the paper-profile switch (values checked against the seed)."""
import copy
import shutil

import pytest
from ultraflux.config import ParamsError, apply_profile, load_params, validate
from conftest import ROOT


def test_default_params_are_valid(params):
    assert validate(params) is params


@pytest.mark.parametrize("key,value,needle", [
    ("dit_stage1.steps", -3, "'dit_stage1.steps' must be a positive integer"),
    ("vae_train.batch_size", 0, "'vae_train.batch_size' must be a positive integer"),
    ("sample.aspects", ["1:1", "5:7"], "'sample.aspects' has an unknown aspect ratio '5:7'"),
    ("rope.kind", "alibi", "'rope.kind' must be one of flux, yarn, resonance_yarn"),
    ("objective", "l1", "'objective' must be one of l2, ultraflux"),
    ("dit_stage2.t_max", 1200, "'dit_stage2.t_min' and t_max must be integers"),
    ("data.source", "/no/such/folder", "'data.source' must be a readable folder"),
    ("curate.aesthetic.keep_top", 1.5, "'curate.aesthetic.keep_top' must be a fraction"),
])
def test_bad_value_names_the_key(params, key, value, needle):
    bad = copy.deepcopy(params)
    node = bad
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ParamsError, match="params.yaml") as err:
        validate(bad)
    assert needle in str(err.value)


def test_missing_key_is_named(params):
    bad = copy.deepcopy(params)
    del bad["dit_stage1"]["lr"]
    with pytest.raises(ParamsError, match="missing key 'dit_stage1.lr'"):
        validate(bad)


def test_unquoted_aspects_read_as_yaml_1_2(tmp_path):
    # `dvc exp run -S` rewrites params.yaml and drops the quotes: 16:9 must stay a string (PyYAML's YAML 1.1 would
    # read it as the base-60 integer 969).
    text = (ROOT / "params.yaml").read_text().replace('aspects: ["1:1", "2:1", "1:2", "16:9"]', "aspects: [1:1, 16:9]")
    assert "aspects: [1:1, 16:9]" in text
    (tmp_path / "p.yaml").write_text(text)
    params = validate(load_params(tmp_path / "p.yaml"))
    assert params["sample"]["aspects"] == ["1:1", "16:9"]


def test_paper_profile_matches_seed(tmp_path):
    """configs/paper-4k.yaml applied to params.yaml gives the seed's Sec. 2.2 / Table 3 values."""
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    changed = apply_profile(ROOT / "configs/paper-4k.yaml", p)
    assert "dit_stage1.lr" in changed
    paper = load_params(p)
    # Sec. 2.2 DiT training: AdamW lr 1e-6, effective batch 64, ~30K + 2K steps.
    for stage, steps in (("dit_stage1", 30000), ("dit_stage2", 2000)):
        cfg = paper[stage]
        assert cfg["lr"] == 1e-6 and cfg["steps"] == steps
        assert cfg["batch_size"] * cfg["grad_accum"] * 8 == 64  # 8 GPUs (seed Sec. 2.2)
    # Table 3 curriculum timestep ranges and stage-2 aesthetic subset.
    assert (paper["dit_stage1"]["t_min"], paper["dit_stage1"]["t_max"]) == (0, 999)
    assert (paper["dit_stage2"]["t_min"], paper["dit_stage2"]["t_max"]) == (0, 459)
    assert paper["curate"]["aesthetic"]["stage2_top"] == 0.05 and paper["curate"]["aesthetic"]["keep_top"] == 0.30
    # Sec. 2.1 thresholds.
    assert paper["curate"]["flat"] == {"patch": 240, "threshold": 800.0, "max_fraction": 0.5}
    assert paper["curate"]["entropy_min"] == 7.0 and paper["curate"]["quality"]["threshold"] == 4.0
    # Table 3 VAE post-training: 512x512, 384 images/step (8 GPUs), AdamW 1e-4 / 1e-2, weights (0.2, 0.1, 1).
    v = paper["vae_train"]
    assert v["resolution"] == 512 and v["batch_size"] * v["grad_accum"] * 8 == 384
    assert (v["lr"], v["weight_decay"]) == (1e-4, 1e-2)
    assert (v["lambda_vae"], v["lambda_perc"], v["lambda_l2"]) == (0.2, 0.1, 1.0)
    assert v["flat_top_fraction"] == 0.5
    # Table 3 objective and RoPE.
    assert paper["loss"]["wavelet"] == "haar" and paper["loss"]["levels"] == 1
    assert (paper["loss"]["c_min"], paper["loss"]["c_max"]) == (0.2, 1.0)
    r = paper["rope"]
    assert (r["theta"], r["ntk_factor"], r["yarn_alpha"], r["yarn_beta"], r["max_scale"], r["train_len"]) == \
        (10000, 1.0, 1.25, 0.75, 2.0, 64)
    # Sec. 10: 50 sampling steps; 4K buckets.
    assert paper["sample"]["num_inference_steps"] == 50 and paper["curate"]["buckets"]["scale"] == 1.0
    # The comments survive the rewrite.
    assert "# seed Sec. 2.1" in p.read_text()


def test_profile_with_unknown_key_is_rejected(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    (tmp_path / "bad.yaml").write_text("dit_stage1:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ParamsError, match="dit_stage1.learning_rate"):
        apply_profile(tmp_path / "bad.yaml", p)
