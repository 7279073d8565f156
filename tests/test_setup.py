"""tools/setup.sh installs only when the requirements changed (a stamp of them in .venv)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["tools/setup.sh", "tools/constraints.txt", "tools/requirements-dev.txt",
         "packages/collider-kernels/pyproject.toml", "packages/collider-autograd/pyproject.toml",
         "packages/collider-models/pyproject.toml"]
# Stands in for .venv/bin/python: records pip calls, answers the version query, skips the rest.
SHIM = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo pip >> "$(dirname "$0")/calls"; exit 0; fi
case "$2" in *sys.version*) exec {sys.executable} "$@" ;; esac
echo other >> "$(dirname "$0")/calls"
"""


def _copy(tmp: Path) -> Path:
    for name in FILES:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp / name)
    python = tmp / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(SHIM)
    python.chmod(0o755)
    return python.parent / "calls"


def _setup(tmp: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    out = subprocess.run(["bash", "tools/setup.sh"], cwd=tmp, env=env, capture_output=True, text=True, check=True)
    return out.stdout


def test_second_setup_skips_pip_until_a_requirement_changes(tmp_path):
    calls = _copy(tmp_path)
    _setup(tmp_path)
    assert calls.read_text().count("pip") == 3  # pip itself, torch/triton, the packages
    calls.unlink()
    assert "is current" in _setup(tmp_path)
    assert "pip" not in calls.read_text()  # only the corpus step ran
    with open(tmp_path / "tools" / "requirements-dev.txt", "a") as f:
        f.write("# changed\n")
    calls.unlink()
    _setup(tmp_path)
    assert calls.read_text().count("pip") == 3
