"""dvc.yaml, written from the stages' declarations (declared.py) and the code each runs (code.py).

DVC and Snakemake read dvc.yaml; nobody edits it: `ptune pipeline write` writes it, `ptune pipeline check` (run by the
tests, so CI) fails when the committed file differs from what the declarations and the code's imports give.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..paths import REPO
from . import code
from .declared import ALL, PLOTS, STAGES, Stage

DVC_YAML = Path("dvc.yaml")

HEADER = """\
# Written by `ptune pipeline write`; do not edit. Each stage is declared once, in workflow/ptune/pipeline/declared.py
# (what it reads and writes, the params it reads, its help and resources), and its deps end with the code it runs:
# its module and every module of the package these import, found in the import graph (workflow/ptune/pipeline/code.py).
# So `dvc repro` after an edit of params.yaml or of the code reruns exactly the stages that read or run what changed,
# and what their changed outputs feed. `ptune pipeline check` (the tests run it) fails when this file is out of date.
# Each stage is one `ptune <stage>` command; a stage reads only the params listed here (config.load refuses others).
# `meta.resources` carries per-stage extras into the Snakemake rules (the Snakefile builds one rule per stage from
# this file): mem_mb, runtime (minutes) and gpu (a count) are what a cluster profile (profiles/slurm,
# profiles/kubernetes) submits; a profile can override each of them.
"""
PLOTS_COMMENT = """\
# `dvc plots show` / `dvc plots diff REV...` draw these (the training loss is declared by the train stage). Run
# while a stage runs, they show how far it got: train_log.csv and reports/live/ are written as it goes.
"""
CODE_COMMENT = "# the code it runs (workflow/ptune/pipeline/code.py)"


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, allow_unicode=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    # In a flow mapping, a comma or colon would end a plain string: strings go in double quotes (JSON's are YAML's).
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _scalar(value)


def _item(text: str, why: str | None, indent: str) -> str:
    return f"{indent}- {text}" + (f"  # {why}" if why else "")


def _block(value: dict, indent: str) -> list[str]:
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines += [f"{indent}{_scalar(key)}:", *_block(item, indent + "  ")]
        else:
            lines.append(f"{indent}{_scalar(key)}: {_scalar(item)}")
    return lines


def _stage(stage: Stage) -> list[str]:
    why = stage.why
    lines = [f"  {stage.name}:", f"    desc: {_scalar(stage.help)}", f"    cmd: ptune {stage.name}", "    deps:"]
    lines += [_item(str(p), why.get(str(p)), "      ") for p in stage.reads]
    lines += [f"      {CODE_COMMENT}", *(_item(f, None, "      ") for f in code.stage_files(stage.name))]
    lines.append("    params:")
    if ALL in stage.params:
        lines.append("      - params.yaml:  # all of it")
    else:
        lines += [_item(k, why.get(k), "      ") for k in stage.params]
    lines.append("    outs:")
    lines += [_item(str(p), why.get(str(p)), "      ") for p in stage.writes]
    if stage.metrics:
        lines += ["    metrics:", *(_item(str(p), why.get(str(p)), "      ") for p in stage.metrics)]
    if stage.plots:
        lines.append("    plots:")
        for path, options in stage.plots.items():
            lines += [f"      - {path}:", *_block(options, "          ")]
    lines += ["    meta:", f"      resources: {_flow(stage.resources)}"]
    if stage.report:
        lines.append(
            "      # Outputs that Snakemake's own report (`snakemake --report FILE`) shows: path -> report()'s options."
        )
        lines.append("      report:")
        lines += [f"        {path}: {_flow(options)}" for path, options in stage.report.items()]
    return lines


def render() -> str:
    """dvc.yaml's text."""
    lines = [HEADER.rstrip("\n"), "stages:"]
    for i, stage in enumerate(STAGES):
        lines += ([""] if i else []) + _stage(stage)
    lines += ["", PLOTS_COMMENT.rstrip("\n"), "plots:"]
    for name, options in PLOTS:
        lines += [f"  - {name}:", *_block(options, "      ")]
    return "\n".join(lines) + "\n"


def write(root: Path = REPO) -> str:
    """Write dvc.yaml at `root` (through a temporary file); returns what it says it did."""
    path = root / DVC_YAML
    text = render()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return f"{path}: up to date"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return f"{path}: written ({len(STAGES)} stages, {sum(len(code.stage_files(s.name)) for s in STAGES)} code deps)"


def check(root: Path = REPO) -> str | None:
    """None when dvc.yaml at `root` is what write() writes; else what differs and what to do."""
    path = root / DVC_YAML
    have = path.read_text(encoding="utf-8") if path.is_file() else ""
    want = render()
    if have == want:
        return None
    diff = "".join(
        difflib.unified_diff(
            have.splitlines(keepends=True), want.splitlines(keepends=True), f"{path} (as it is)", f"{path} (declared)"
        )
    )
    return (
        f"{path} is not what the stages' declarations and the code's imports give; run `ptune pipeline write` and "
        f"commit it (never edit dvc.yaml by hand: edit workflow/ptune/pipeline/declared.py):\n{diff}"
    )
