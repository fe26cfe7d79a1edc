"""A real `dvc repro` on a source in which curation keeps one image stops at `curate` with the guard message."""
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import copy_project
from data_fixtures import textured
from ultraflux.config import load_params


def one_keeper_source(folder):
    """One textured photo-like image and five flat ones, all captioned."""
    folder.mkdir()
    Image.fromarray(textured(768, 576, seed=1)).save(folder / "keeper.png")
    (folder / "keeper.txt").write_text("A landscape of layered hills.")
    for i in range(5):
        level = 40 + 30 * i
        Image.fromarray(np.full((576, 768, 3), level, np.uint8)).save(folder / f"flat_{i}.png")
        (folder / f"flat_{i}.txt").write_text("A flat grey card.")


@pytest.mark.slow
def test_dvc_repro_stops_at_curate_when_too_few_images_remain(tmp_path):
    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    one_keeper_source(tmp_path / "photos")
    params = load_params(repo / "params.yaml")
    params["data"]["source"] = str(tmp_path / "photos")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MLFLOW_TRACKING_URI")}
    subprocess.run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", cwd=repo,
                   shell=True, check=True)
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "curate.min_train_images = 4 but " in out and "training image(s) remain" in out
    assert "flat 5" in out  # what each filter removed
    # ... and which key to relax, in which direction, to which value (uniform cards: every patch is flat)
    assert "flat (5 removed): raise curate.flat.max_fraction from 0.5 to 1 to let up to all 5 past" in out, out
    assert "Running stage 'curate'" in out and "Running stage 'vae'" not in out
    assert not (repo / "outputs/vae").exists() and not (repo / "metrics/curate.json").exists()
