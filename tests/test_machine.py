"""The paper profile on the wrong machine: no more curation workers than cores unless a Ray cluster is named."""
from ultraflux.data import engines


def test_workers_never_exceed_the_cores_here(monkeypatch, capsys):
    monkeypatch.setattr(engines, "cores", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert engines.resolve_workers(64) == 2                       # the paper profile's 64 on a 2-core box
    assert "curate.workers = 64 but this machine has 2 cores: using 2" in capsys.readouterr().err
    assert engines.resolve_workers(64, "ray") == 2                # a Ray started here counts the same cores
    assert engines.resolve_workers(0) == 2 and engines.resolve_workers(1) == 1
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert engines.resolve_workers(64, "ray") == 64               # a cluster gets what was asked
    assert engines.resolve_workers(64, "local") == 2


def test_the_paper_profile_is_refused_on_a_machine_without_its_gpus(params, tmp_path):
    """The paper profile (real weights, 8 processes) on a CPU-only machine: `params check` says so (exit 3) and so
    does the stage launcher, before any work; the embedded profile passes."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    from ultraflux.config import apply_profile, load_params
    from ultraflux.launch import machine_problems

    assert machine_problems(params, gpus=0) == []                          # embedded: tiny models, 1 process
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    apply_profile(ROOT / "configs/paper-4k.yaml", p)
    paper = load_params(p)
    [problem] = machine_problems(paper, gpus=0)
    assert "model.pretrained" in problem and "no CUDA GPU" in problem and "ultraflux plan --gpus 8" in problem
    [problem] = machine_problems(paper, gpus=2)
    assert "launch.processes = 8 processes per machine but this machine has 2 CUDA GPU(s)" in problem
    assert machine_problems(paper, gpus=8) == []
    (tmp_path / "flux").mkdir()   # the paths exist (valid params), the GPUs do not
    (tmp_path / "vae").mkdir()
    text = p.read_text().replace(paper["data"]["source"], "")
    text = text.replace(paper["model"]["pretrained"], str(tmp_path / "flux"))
    p.write_text(text.replace(paper["model"]["vae_pretrained"], str(tmp_path / "vae")))
    proc = subprocess.run([sys.executable, "-m", "ultraflux.cli", "params", "check", "--params", str(p)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 3 and "not on this machine" in proc.stderr and "no CUDA GPU" in proc.stderr
