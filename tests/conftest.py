import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Stage commands (`python stages/...`) and `dvc` must come from the same environment as the tests.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def copy_project(dst: Path) -> None:
    """Copy the project's tracked and untracked-but-not-ignored files (no results) into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("outputs/", "metrics/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def full_params() -> dict:
    """The repository's params.yaml as the library receives it: validated, every schema default filled in."""
    from ultraflux.config import load_validated

    return load_validated(ROOT / "params.yaml", check_paths=False)


def params_section(name: str, **overrides) -> dict:
    """One complete, validated section of the repository's params.yaml with ``overrides`` applied (a library call
    gets every key of its section, never a partial dict: tests/test_params_single_source.py)."""
    from ultraflux.config import load_params, validated_section

    return validated_section({name: {**load_params(ROOT / "params.yaml")[name], **overrides}}, name)


@pytest.fixture
def params():
    return full_params()
