"""params.yaml validation and the paper-profile switch (values checked against the seed)."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ultraflux.config import ParamsError, apply_profile, load_params, validate
from ultraflux.training.layout import stage_layout
from conftest import ROOT, copy_project


def test_default_params_are_valid(params):
    assert validate(params) == params   # complete already: validating again adds nothing


def edited(params, key, value, delete=False):
    bad = copy.deepcopy(params)
    node = bad
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return bad


# (key, wrong value, what the message must say): the edits that were silently accepted or crashed late, and more.
WRONG_EDITS = [
    ("dit_stage1.stepz", 5, "'dit_stage1.stepz' is not a known key (did you mean 'dit_stage1.steps'?)"),
    ("curate.flat.treshold", 1, "'curate.flat.treshold' is not a known key (did you mean 'curate.flat.threshold'?)"),
    ("curate.checkpoint_every", 5, "'curate.checkpoint_every' is not a known key (it belongs in vae_train, "
     "dit_stage1 or dit_stage2, not in 'curate')"),   # a key put in the wrong section
    ("shift", 3.0, "'shift' is not a known key (it belongs in dit_stage1 or dit_stage2, not at the top level)"),
    ("vae_train.checkpoint_every", 0, "'vae_train.checkpoint_every' must be greater than or equal to 1"),
    ("dit_stage2.lr", 1e30, "'dit_stage2.lr' must be less than or equal to 1"),   # diverges: NaN after a few steps
    ("dit_stage1.steps", 10_000_000, "'dit_stage1.steps': must be at most 1,000,000 (got 10,000,000)"),
    ("curate.max_image_pixels", "big", "'curate.max_image_pixels' must be a valid integer"),
    ("curate.entropy_min", 70, "'curate.entropy_min' must be less than or equal to 8"),
    ("rope.snap_all_bands", "maybe", "'rope.snap_all_bands' must be a valid boolean"),
    ("judge.timeout_s", -5, "'judge.timeout_s' must be greater than 0"),
    ("loss.levels", 0, "'loss.levels' must be greater than or equal to 1"),
    ("model.tiny.axes_dims_rope", "x", "'model.tiny.axes_dims_rope' must be a valid list"),
    ("model.tiny.axes_dims_rope", [4, 6, 8], "must sum to attention_head_dim"),
    ("dit_stage1.steps", -3, "'dit_stage1.steps' must be greater than or equal to 1"),
    ("dit_stage1.steps", 5.0, "'dit_stage1.steps' must be a valid integer"),
    ("dit_stage1.lr", "1e-4", "'dit_stage1.lr' must be a valid number"),
    ("vae_train.batch_size", 0, "'vae_train.batch_size' must be greater than or equal to 1"),
    ("vae_train.resolution", 100, "'vae_train.resolution' must be a multiple of 16"),
    ("sample.aspects", ["1:1", "5:7"], "'sample.aspects[1]' must be '1:1'"),
    ("rope.kind", "alibi", "'rope.kind' must be 'flux', 'yarn' or 'resonance_yarn'"),
    ("objective", "l1", "'objective' must be 'l2' or 'ultraflux'"),
    ("dit_stage2.t_max", 1200, "'dit_stage2.t_max' must be less than or equal to 999"),
    ("dit_stage2.t_min", 500, "'dit_stage2': t_min (500) must not exceed t_max (459)"),
    ("data.source", "/no/such/folder", "'data.source' must be a readable folder of images"),
    ("curate.aesthetic.keep_top", 1.5, "'curate.aesthetic.keep_top' must be less than or equal to 1"),
    ("curate.aesthetic.stage2_top", 0.5, "stage2_top (0.5) must not exceed keep_top (0.3)"),
    ("loss.c_min", 2.0, "'loss': c_min (2.0) must not exceed c_max (1.0)"),
    ("seed", -1, "'seed' must be greater than or equal to 0"),
    ("curate.workers", -1, "'curate.workers' must be greater than or equal to 0"),
    ("curate.holdout_fraction", 1.0, "'curate.holdout_fraction' must be less than 1"),
    ("curate.engine", "spark", "'curate.engine' must be 'local' or 'ray'"),
    ("sample.prompts", ["a lake", "  "], "'sample.prompts[1]': must not be blank"),
    ("sample.num_inference_steps", True, "'sample.num_inference_steps' must be a valid integer"),
    ("refiner.min_words", 200, "'refiner': min_words (200) must not exceed max_words (100)"),
    ("rope.yarn_beta", 2.0, "yarn_alpha (1.25) must exceed yarn_beta (2.0)"),
    ("model.pretrained", "/no/such/flux", "'model.pretrained' must be a local diffusers-format directory"),
    ("tracking.experiment", "", "'tracking.experiment': must not be blank"),
    ("diagnostic", {"x": 1}, "'diagnostic' is not a known key"),
    ("curate.gray", "exact", "'curate.gray' must be 'luma' or 'opencv'"),
    ("curate.image_format", "webp", "'curate.image_format' must be 'jpeg' or 'png'"),
    ("curate.image_quality", 0, "'curate.image_quality' must be greater than or equal to 1"),
    ("curate.shard_max_mb", 0, "'curate.shard_max_mb' must be greater than or equal to 1"),
    ("curate.min_train_images", -1, "'curate.min_train_images' must be greater than or equal to 0"),
]


@pytest.mark.parametrize("key,value,needle", WRONG_EDITS, ids=[f"{k}={v!r}" for k, v, _ in WRONG_EDITS])
def test_wrong_edit_is_refused_naming_the_key(params, key, value, needle):
    with pytest.raises(ParamsError) as err:
        validate(edited(params, key, value), "other.yaml")
    assert needle in str(err.value)
    assert all(line.startswith("other.yaml: ") for line in str(err.value).splitlines()[1:] or [str(err.value)])


def test_all_problems_are_reported_at_once(params):
    bad = edited(edited(edited(params, "dit_stage1.stepz", 5), "loss.levels", 0), "judge.timeout_s", -5)
    with pytest.raises(ParamsError) as err:
        validate(bad, "other.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems" and len(err.value.problems) == 3
    assert {ln.split("'")[1] for ln in lines[1:]} == {"dit_stage1.stepz", "loss.levels", "judge.timeout_s"}


def test_workers_zero_means_every_core(params):
    validate(edited(params, "curate.workers", 0))


def test_missing_key_is_named(params):
    with pytest.raises(ParamsError, match="missing key 'dit_stage1.lr'"):
        validate(edited(params, "dit_stage1.lr", None, delete=True))


def test_cli_check_names_the_file_it_read(tmp_path):
    bad = tmp_path / "other.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  steps: 60 ", "  stepz: 60 ", 1))
    ultraflux = Path(sys.executable).with_name("ultraflux")
    proc = subprocess.run([str(ultraflux), "params", "check", "--params", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{bad}: 'dit_stage1.stepz' is not a known key (did you mean 'dit_stage1.steps'?)" in proc.stderr
    ok = subprocess.run([str(ultraflux), "params", "check", "--params", str(ROOT / "params.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_stage_refuses_bad_params_before_any_work(tmp_path):
    """A stage with a wrong key exits 2 naming it, and writes no output, no MLflow store."""
    copy_project(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("entropy_min: 7.0", "entropy_min: 70", 1))
    proc = subprocess.run([sys.executable, "stages/curate.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DVC_ROOT": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "params.yaml: 'curate.entropy_min' must be less than or equal to 8 (got 70)" in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_stage_refuses_an_unwritable_output(tmp_path):
    copy_project(tmp_path)
    (tmp_path / "outputs").write_text("a file where the outputs folder should be")
    proc = subprocess.run([sys.executable, "stages/curate.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DVC_ROOT": str(tmp_path)})
    assert proc.returncode == 2
    assert "dvc.yaml: output 'outputs/curated' cannot be created" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_schema_aspects_are_the_bucket_table():
    from ultraflux.data.buckets import DEFAULT_ASPECTS
    from ultraflux.schema import ASPECTS

    assert list(ASPECTS) == list(DEFAULT_ASPECTS)


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
        assert cfg["global_batch"] == 64 and stage_layout(cfg, stage, 8) == (1, 8)  # 1 x 8 GPUs x 8 (seed Sec. 2.2)
    # Table 3 curriculum timestep ranges and stage-2 aesthetic subset.
    assert (paper["dit_stage1"]["t_min"], paper["dit_stage1"]["t_max"]) == (0, 999)
    assert (paper["dit_stage2"]["t_min"], paper["dit_stage2"]["t_max"]) == (0, 459)
    assert paper["curate"]["aesthetic"]["stage2_top"] == 0.05 and paper["curate"]["aesthetic"]["keep_top"] == 0.30
    # Sec. 2.1 thresholds.
    assert paper["curate"]["flat"] == {"patch": 240, "threshold": 800.0, "max_fraction": 0.5}
    assert paper["curate"]["entropy_min"] == 7.0 and paper["curate"]["quality"]["threshold"] == 4.0
    # Table 3 VAE post-training: 512x512, 384 images/step (8 GPUs), AdamW 1e-4 / 1e-2, weights (0.2, 0.1, 1).
    v = paper["vae_train"]
    assert v["resolution"] == 512 and v["global_batch"] == 384 and stage_layout(v, "vae_train", 8) == (48, 1)
    assert paper["launch"]["processes"] == 8 and "zero2" in paper["launch"]["config"]
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
    # The comments survive the rewrite; those that described the tiny value give way to the profile's own.
    text = p.read_text()
    assert "# seed Sec. 2.1" in text and "# seed Table 3 \"DiT objective\"" in text
    assert "stage2_top: 0.05             # seed Table 3: stage-2 subset = ArtiMuse top-5%\n" in text
    assert "tiny profile: 15%" not in text and "tiny: 1/8" not in text and "tiny: 128" not in text
    named = [ln for ln in text.splitlines() if any(f" {k.rsplit('.', 1)[-1]}:" in ln for k in changed)]
    assert not [ln for ln in named if "tiny" in ln], named


def test_profile_with_unknown_key_is_rejected(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    (tmp_path / "bad.yaml").write_text("dit_stage1:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ParamsError, match="dit_stage1.learning_rate"):
        apply_profile(tmp_path / "bad.yaml", p)


def test_stage_refuses_official_weights_with_the_embedded_rope(tmp_path):
    """Official UltraFlux weights (config.json with the release's RoPE keys) with rope.train_len 8: the DiT stage
    stops before any work, naming the key."""
    import json

    copy_project(tmp_path)
    weights = tmp_path / "UltraFlux-v1" / "transformer"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "method": "yarn",
                                                     "ntk_factor": 1.0}))
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace('pretrained: ""', f'pretrained: "{weights.parent}"', 1))
    proc = subprocess.run([sys.executable, "stages/dit.py", "dit_stage1"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "DVC_ROOT": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rope.train_len must be 64 (got 8)" in proc.stderr and "params.yaml" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
