"""Stage report: reports/report.md (metrics base vs P-tuned, loss curve, samples, params) and
reports/timings.json (every stage's wall time, merged from reports/timings/)."""

from __future__ import annotations

import base64
import datetime as dt
import platform
import time
import csv
import io
import json
import logging
from pathlib import Path

import yaml

from . import atomic
from .cli import STAGES
from .config import Params, ReferenceFigures
from .metrics import METRIC_NAMES
from .remote import check_survival

REPORTS = Path("reports")
METRICS = REPORTS / "metrics.json"
PREDICTIONS = REPORTS / "predictions.jsonl"
TRAIN_LOG = REPORTS / "train_log.csv"
DEPLOY_CHECK = REPORTS / "deploy_check.json"
TIMINGS_DIR = REPORTS / "timings"
OUT_MD = REPORTS / "report.md"
OUT_TIMINGS = REPORTS / "timings.json"


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def loss_curve_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("P-tuning v2: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    # No metadata: the PNG bytes then depend only on the curve.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _metrics_table(m: dict) -> list[str]:
    lines = ["| model | " + " | ".join(n.upper() for n in METRIC_NAMES) + " |",
             "|---|" + "---:|" * len(METRIC_NAMES)]
    for name in ("base", "ptuned"):
        lines.append(f"| {name} | " + " | ".join(f"{m[name][k]:.2f}" for k in METRIC_NAMES) + " |")
    lines.append("| P-tuned − base | " + " | ".join(f"{m['ptuned'][k] - m['base'][k]:+.2f}"
                                                    for k in METRIC_NAMES) + " |")
    return lines


def _reference_table(measured: dict, ref: ReferenceFigures) -> list[str]:
    """The P-tuned scores next to published ones; a rerun is expected within ±tolerance of them."""
    lines = [f"Reference: {ref.source}. Reruns vary by ±{ref.tolerance:g}.", "",
             "| metric | measured | reference | difference | within ±" + f"{ref.tolerance:g} |",
             "|---|---:|---:|---:|---|"]
    for name in METRIC_NAMES:
        diff = measured[name] - ref.metrics[name]
        lines.append(f"| {name.upper()} | {measured[name]:.2f} | {ref.metrics[name]:.2f} | {diff:+.2f} | "
                     f"{'yes' if abs(diff) <= ref.tolerance else 'no'} |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(params: Params, metrics: dict, predictions: list[dict], log_rows: list[dict], deploy: dict) -> str:
    out = ["# ptune report", ""]
    out += ["## Metrics", "", f"{metrics['n_examples']} dev examples; empty predictions: "
            + ", ".join(f"{k} {v}" for k, v in sorted(metrics["empty_predictions"].items())), ""]
    out += _metrics_table(metrics) + [""]
    if params.report.reference is not None:
        out += ["### P-tuned against the reference", ""] + _reference_table(metrics["ptuned"], params.report.reference)
        out.append("")
    out += ["## Training", ""]
    if log_rows:
        png = base64.b64encode(loss_curve_png(log_rows)).decode()
        out += [f"![training loss](data:image/png;base64,{png})", "",
                f"{log_rows[-1]['step']} steps; loss {float(log_rows[0]['loss']):.3f} at step {log_rows[0]['step']}"
                f" → {float(log_rows[-1]['loss']):.3f} at step {log_rows[-1]['step']}.", ""]
    n = params.report.n_samples
    if n:
        out += [f"## Samples (first {min(n, len(predictions))} dev examples)", "",
                "| content | label | base | P-tuned |", "|---|---|---|---|"]
        out += [f"| {_cell(p['content'])} | {_cell(p['label'])} | {_cell(p['base'])} | {_cell(p['ptuned'])} |"
                for p in predictions[:n]]
        out.append("")
    out += ["## Deploy", "", f"Bundle `{deploy['bundle']}`; smoke prompt `{deploy['prompt']}` answered:", "",
            f"> {deploy['answer'] or '(empty)'}", "",
            f"Answer a prompt yourself: `python -m ptune.bundle {deploy['bundle']} '<content>'`", ""]
    out += ["## Params", "", "```yaml", yaml.safe_dump(params.raw, allow_unicode=True, sort_keys=False).rstrip(),
            "```", ""]
    return "\n".join(out)


def run(params: Params) -> None:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    metrics = _read_json(METRICS)
    predictions = [json.loads(line) for line in PREDICTIONS.read_text(encoding="utf-8").splitlines() if line]
    with open(TRAIN_LOG, encoding="utf-8", newline="") as fh:
        log_rows = list(csv.DictReader(fh))
    atomic.write_text(OUT_MD, render(params, metrics, predictions, log_rows, _read_json(DEPLOY_CHECK)))
    timings = {stage: _read_json(TIMINGS_DIR / f"{stage}.json") for stage in STAGES
               if (TIMINGS_DIR / f"{stage}.json").is_file()}
    timings["report"] = {"stage": "report", "started": started.isoformat(timespec="seconds"),
                         "wall_s": round(time.perf_counter() - t0, 3), "host": platform.node()}
    atomic.write_json(OUT_TIMINGS, timings)
    # The last stage of every run: where a `dvc repro` user learns that nothing pushed would survive the instance.
    warning = check_survival()
    if warning:
        logging.getLogger(__name__).warning("\n%s", warning)
