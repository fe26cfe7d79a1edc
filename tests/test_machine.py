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
