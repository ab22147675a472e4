"""The Python floor: pyproject.toml's requires-python, and an older interpreter stopped at start with one sentence."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

import ptune

from conftest import REPO

# An interpreter below the floor, where this machine has one: Debian 12's python3 is 3.11.2.
OLD_PYTHONS = [p for p in ("/usr/bin/python3",) if Path(p).is_file()]


def test_requires_python_is_the_floor_ptune_checks():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == ">=" + ".".join(map(str, ptune.MIN_PYTHON))


@pytest.mark.parametrize("python", OLD_PYTHONS or [None])
def test_an_older_python_stops_at_import_naming_the_floor(python):
    if python is None:
        pytest.skip("no Python older than 3.11.4 on this machine")
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 11, 4))"], capture_output=True)
    if version.stdout.strip() != b"False":
        pytest.skip(f"{python} is not older than 3.11.4")
    proc = subprocess.run(
        [python, "-c", "import ptune.cli"],
        cwd=REPO / "workflow",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "ptune needs Python 3.11.4 or newer" in proc.stderr and "Traceback" not in proc.stderr
