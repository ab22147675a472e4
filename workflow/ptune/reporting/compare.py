"""`ptune compare [EXP ...]`: experiments side by side — the params they changed, their scores, their training
curves — as a table on stdout and one self-contained HTML page with a plot.

DVC keeps the experiments (`dvc exp run -S train.pre_seq_len=8`); this reads them through its Python API
(`dvc.api.exp_show` for params and metrics, `dvc.api.read` for each one's reports/train_log.csv) and only lays
them out.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Sequence
from pathlib import Path

from .. import paths
from ..errors import PtuneError
from ..pipeline.declared import NAMES
from ..state import atomic
from . import figures
from .metrics import METRIC_NAMES

TRAIN_LOG = str(paths.TRAIN_LOG)
PARAM_SECTIONS = NAMES  # one params section per stage
SCORES = [f"ptuned.{m}" for m in METRIC_NAMES] + ["base.rouge-l"]


def _label(row: dict) -> str:
    return row["Experiment"] or row["rev"]


def select(rows: list[dict], names: Sequence[str]) -> list[dict]:
    """The rows of `dvc exp show` to compare: those named (experiment name, git revision or `workspace`), or by
    default the baseline commit and every experiment of it that finished."""
    if names:
        chosen = []
        for name in names:
            match = [r for r in rows if name in (r["Experiment"], r["rev"])]
            if not match:
                known = ", ".join(_label(r) for r in rows)
                raise PtuneError(f"no experiment or revision {name!r}; `dvc exp show` lists: {known}")
            chosen.append(match[0])
        return chosen
    chosen = [r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace"]
    chosen += [r for r in rows if r["Experiment"] and r.get("State") in (None, "Success")]
    if len(chosen) < 2:
        raise PtuneError(
            "nothing to compare yet; run experiments first, e.g. "
            "`dvc exp run -S train.pre_seq_len=8`, or name revisions: `ptune compare workspace HEAD`"
        )
    return chosen


def _plain(value):
    """exp_show gives numbers as floats; 8.0 reads better as 8."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def table(rows: list[dict]):
    """One line per experiment: the params that differ between them, then the scores and the final loss."""
    import pandas as pd

    params = [k for k in rows[0] if k.split(".", 1)[0] in PARAM_SECTIONS]
    changed = [k for k in params if len({repr(r.get(k)) for r in rows}) > 1]
    frame = pd.DataFrame(
        [{**{k: _plain(r.get(k)) for k in changed}, **{k: r.get(k) for k in SCORES}} for r in rows],
        index=[_label(r) for r in rows],
    )
    frame.index.name = "experiment"
    return frame


def training_log(row: dict, repo: str) -> list[dict]:
    import dvc.api

    rev = None if row["rev"] == "workspace" else (row["Experiment"] or row["rev"])
    try:
        text = dvc.api.read(TRAIN_LOG, repo=repo, rev=rev)
    except Exception as exc:  # noqa: BLE001 - DVC raises many kinds; the message says which revision lacks it
        raise PtuneError(f"cannot read {TRAIN_LOG} of {_label(row)}: {exc}") from None
    return list(csv.DictReader(io.StringIO(text)))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ptune compare</title>
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:1250px;margin:0 auto;padding:0 1.5em 2em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #d9dde5;padding:.3em .6em;text-align:right}}
th{{background:#f3f5f9}}img{{max-width:100%}}</style></head>
<body><h1>ptune compare</h1>
<p>Params that differ between the experiments, the P-tuned model's scores (and the base model's ROUGE-L), and the
training loss, as DVC recorded them (<code>dvc exp show</code>).</p>
{table}
<p><img alt="training loss and scores per experiment" src="data:image/png;base64,{png}"></p>
</body></html>
"""


def run(names: Sequence[str], out: Path, repo: str = ".") -> str:
    """Write `out` (HTML) and its PNG beside it; return the table as text for the terminal."""
    import dvc.api

    rows = select(dvc.api.exp_show(repo=repo), names)
    frame = table(rows)
    curves = {_label(r): training_log(r, repo) for r in rows}
    frame["final loss"] = [float(log[-1]["loss"]) if log else None for log in curves.values()]
    scores = {_label(r): {m: r.get(f"ptuned.{m}") or 0.0 for m in METRIC_NAMES} for r in rows}
    png = figures.experiments(curves, scores)
    with atomic.atomic_file(out.with_suffix(".png"), "wb") as fh:
        fh.write(png)
    atomic.write_text(
        out,
        PAGE.format(
            table=frame.to_html(float_format=lambda v: f"{v:.4g}"),  # escapes text
            png=base64.b64encode(png).decode(),
        ),
    )
    return frame.to_string(float_format=lambda v: f"{v:.4g}")
