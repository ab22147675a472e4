"""ptune.paths names the paths the code reads and writes; dvc.yaml declares them for DVC and Snakemake. They agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from ptune import paths

from conftest import REPO, STAGES


def _paths(entries) -> set[Path]:
    return {Path(p) for entry in entries or [] for p in ([entry] if isinstance(entry, str) else entry)}


def test_every_stage_reads_and_writes_what_dvc_yaml_declares():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert tuple(stages) == paths.STAGES == STAGES
    for name, stage in stages.items():
        assert _paths(stage.get("deps")) == set(paths.INPUTS[name]), name
        written = set().union(*(_paths(stage.get(kind)) for kind in ("outs", "metrics", "plots")))
        assert written == set(paths.OUTPUTS[name]), name
        assert stage["cmd"] == f"ptune {name}"
