"""`ptune compare [EXP ...]`: experiments side by side — the params they changed, their scores with each run's
interval, their training curves — as a table on stdout and one self-contained HTML page with a plot; and
`ptune seeds`: the same params trained with K seeds, as DVC experiments, so `ptune compare` shows the spread.

DVC keeps the experiments (`dvc exp run -S train.pre_seq_len=8`); this reads them through its Python API
(`dvc.api.exp_show` for params and metrics, `dvc.api.read` for each one's reports/train_log.csv) and only lays
them out. Runs that differ in `train.seed` alone are one group: its spread across seeds (mean, sd, min–max of each
score) is a second table, beside each run's own bootstrap interval over the dev examples (reports/intervals.json).
The two answer different questions: the interval, how much the score would move on other dev examples of the
same kind; the spread, how much it moves when only training's randomness changes.
"""

from __future__ import annotations

import base64
import csv
import io
import statistics
import subprocess
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
LEAD = "rouge-l"
SEED = "train.seed"
# reports/intervals.json as exp_show names its columns (the file's name first only where two files share a key)
INTERVAL = "scores.ptuned.{metric}.{end}"


def _interval_value(row: dict, metric: str, end: str):
    key = INTERVAL.format(metric=metric, end=end)
    for k, v in row.items():
        if k == key or k.endswith(":" + key):
            return v
    return None


def interval_text(row: dict, metric: str = LEAD) -> str:
    low, high = _interval_value(row, metric, "low"), _interval_value(row, metric, "high")
    return "n/a" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


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
        [
            {
                **{k: _plain(r.get(k)) for k in changed},
                **{k: r.get(k) for k in SCORES},
                f"ptuned.{LEAD} interval": interval_text(r),
            }
            for r in rows
        ],
        index=[_label(r) for r in rows],
    )
    frame.index.name = "experiment"
    return frame


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Runs whose params differ only in train.seed, by what they share (the params that differ between groups),
    each group of at least two runs."""
    params = [k for k in rows[0] if k.split(".", 1)[0] in PARAM_SECTIONS and k != SEED]
    changed = [k for k in params if len({repr(r.get(k)) for r in rows}) > 1]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = ", ".join(f"{k}={_plain(r.get(k))}" for k in changed) or "same params"
        groups.setdefault(key, []).append(r)
    return {k: v for k, v in groups.items() if len({repr(r.get(SEED)) for r in v}) > 1}


def spread(rows: list[dict]):
    """Per group of seeds: n, the seeds, and mean, sd (n − 1), min and max of each score across them."""
    import pandas as pd

    out = []
    for key, members in seed_groups(rows).items():
        line: dict = {"group": key, "n": len(members), "seeds": " ".join(str(_plain(r.get(SEED))) for r in members)}
        for score in SCORES:
            values = [float(r[score]) for r in members if r.get(score) is not None]
            if not values:
                continue
            line[f"{score} mean"] = statistics.fmean(values)
            line[f"{score} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            line[f"{score} min–max"] = f"{min(values):.2f}–{max(values):.2f}"
        out.append(line)
    return pd.DataFrame(out).set_index("group") if out else None


def seed_values(k: int, first: int | None, params_path: Path = Path("params.yaml")) -> list[int]:
    """K seeds: train.seed of params.yaml (the run already made, restored from the cache) and the next K − 1."""
    import yaml

    if first is None:
        first = int(yaml.safe_load(params_path.read_text(encoding="utf-8"))["train"]["seed"])
    return [first + i for i in range(k)]


def seeds(k: int = 3, first: int | None = None, run: bool = True, jobs: int = 1, repo: str = ".") -> list[str]:
    """Queue one DVC experiment per training seed (`dvc exp run --queue -n seed-S -S train.seed=S`) and, with
    `run`, run the queue (`dvc exp run --run-all`): each in its own temporary workspace, every stage that does not
    read train.seed restored from the cache, each experiment kept by DVC (`dvc exp show`, `dvc exp apply`).
    Returns the experiment names."""
    if k < 2:
        raise PtuneError(f"--k {k}: a spread needs at least 2 seeds")
    names = []
    for seed in seed_values(k, first, Path(repo) / "params.yaml"):
        name = f"seed-{seed}"
        _dvc(["exp", "run", "--queue", "-n", name, "-S", f"{SEED}={seed}"], repo)
        names.append(name)
    if run:
        _dvc(["exp", "run", "--run-all", "-j", str(jobs)], repo)
    return names


def _dvc(args: list[str], repo: str) -> None:
    cmd = ["dvc", *args]
    proc = subprocess.run(cmd, cwd=repo, check=False)
    if proc.returncode != 0:
        raise PtuneError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see its output above")


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
{spread}
<p><img alt="training loss and scores per experiment" src="data:image/png;base64,{png}"></p>
</body></html>
"""
SPREAD_HTML = """<h2>Spread across training seeds</h2>
<p>Runs that differ only in <code>train.seed</code>: mean, standard deviation (n − 1) and range of each score across
the seeds. Set it beside each run's own interval (the table above, bootstrap over the dev examples): a gain smaller
than the seed-to-seed spread, or inside the intervals, is not yet a finding.</p>
{table}
"""


def run(names: Sequence[str], out: Path, repo: str = ".") -> str:
    """Write `out` (HTML) and its PNG beside it; return the table as text for the terminal."""
    import dvc.api

    rows = select(dvc.api.exp_show(repo=repo), names)
    frame = table(rows)
    curves = {_label(r): training_log(r, repo) for r in rows}
    frame["final loss"] = [float(log[-1]["loss"]) if log else None for log in curves.values()]
    scores = {_label(r): {m: r.get(f"ptuned.{m}") or 0.0 for m in METRIC_NAMES} for r in rows}
    errors = {
        _label(r): {
            m: (lo, hi)
            if (lo := _interval_value(r, m, "low")) is not None and (hi := _interval_value(r, m, "high")) is not None
            else None
            for m in METRIC_NAMES
        }
        for r in rows
    }
    spread_frame = spread(rows)
    png = figures.experiments(curves, scores, errors)
    with atomic.atomic_file(out.with_suffix(".png"), "wb") as fh:
        fh.write(png)
    atomic.write_text(
        out,
        PAGE.format(
            table=frame.to_html(float_format=lambda v: f"{v:.4g}"),  # escapes text
            spread=""
            if spread_frame is None
            else SPREAD_HTML.format(table=spread_frame.to_html(float_format=lambda v: f"{v:.4g}")),
            png=base64.b64encode(png).decode(),
        ),
    )
    text = frame.to_string(float_format=lambda v: f"{v:.4g}")
    if spread_frame is not None:
        text += "\n\nSpread across training seeds (runs that differ only in train.seed):\n"
        text += spread_frame.to_string(float_format=lambda v: f"{v:.4g}")
    return text
