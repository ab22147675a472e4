"""Stage report: one page that says whether the run worked.

Writes reports/report.html (one self-contained file, figures inlined, opens offline) and reports/report.md with
the same facts (reporting/facts.py gathers them): headline scores (base, P-tuned, reference figures), training,
evaluation with examples, cost, deploy and provenance. The figures also go to reports/figures/ (Snakemake's own
report shows them), the scores to reports/plots/metrics.csv (`dvc plots show` draws them), and every stage's
timings, merged, to reports/timings.json.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import platform
import time

from ..config import Params
from ..paths import FIGURES, METRICS_CSV, REPORT_HTML, REPORT_MD
from ..paths import TIMINGS as OUT_TIMINGS
from ..remote.dvc_remote import check_survival
from ..reporting import figures
from ..reporting.facts import MODELS, collect
from ..reporting.metrics import METRIC_NAMES
from ..reporting.render import render_html, render_markdown
from ..state import atomic


def draw(facts: dict) -> dict[str, bytes]:
    table = {row["label"]: row["scores"] for row in facts["headline"]["rows"]}
    scores = facts["evaluation"]["rouge_l_scores"]
    return {
        "training": figures.training_curves(facts["log_rows"]),
        "metrics": figures.metric_bars(table),
        "rouge_l": figures.score_histogram({MODELS[m]: v for m, v in scores.items()}),
    }


def metrics_csv(facts: dict) -> str:
    """Long format for `dvc plots`: one row per metric and model (and reference)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "metric", "model", "score"])
    for row in facts["headline"]["rows"]:
        for metric in METRIC_NAMES:
            writer.writerow(
                [f"{figures.LABELS[metric]} {row['label']}", metric, row["label"], round(row["scores"][metric], 4)]
            )
    return buf.getvalue()


def run(params: Params) -> None:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    facts = collect(params)
    facts["generated"] = started.isoformat(timespec="seconds")
    images = draw(facts)
    for name, png in images.items():
        with atomic.atomic_file(FIGURES[name], "wb") as fh:
            fh.write(png)
    atomic.write_text(METRICS_CSV, metrics_csv(facts))
    atomic.write_text(REPORT_HTML, render_html(facts, images))
    atomic.write_text(REPORT_MD, render_markdown(facts, images))
    timings = dict(facts["timings"])
    timings["report"] = {
        "stage": "report",
        "started": facts["generated"],
        "wall_s": round(time.perf_counter() - t0, 3),
        "host": platform.node(),
    }
    atomic.write_json(OUT_TIMINGS, timings)
    # The last stage of every run: where a `dvc repro` user learns that nothing pushed would survive the instance.
    warning = check_survival()
    if warning:
        logging.getLogger(__name__).warning("\n%s", warning)
