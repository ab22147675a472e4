"""Where ptune reads and writes, relative to the project root: the one place the code names these paths.

Which stage reads and writes which of them is declared once, in pipeline/declared.py, and dvc.yaml is written from
that (`ptune pipeline write`).
"""

from __future__ import annotations

from pathlib import Path

# The checkout this package runs from: the project's own, for a stage (stages/runner.py); the schema, scripts and
# requirements live there.
REPO = Path(__file__).resolve().parents[2]

BASE = Path("models/base")
RAW = Path("data/raw")
PROCESSED = Path("data/processed")
PREFIX = Path("models/ptuning")
DEPLOY = Path("models/deploy")

REPORTS = Path("reports")
TRAIN_LOG = REPORTS / "train_log.csv"
METRICS = REPORTS / "metrics.json"
PREDICTIONS = REPORTS / "predictions.jsonl"
DEPLOY_CHECK = REPORTS / "deploy_check.json"
TIMINGS_DIR = REPORTS / "timings"  # one file per stage (stagelog.timed)
TIMINGS = REPORTS / "timings.json"  # all of them, merged by the report
REPORT_MD = REPORTS / "report.md"
REPORT_HTML = REPORTS / "report.html"
FIGURES = {
    "training": REPORTS / "figures/training.png",
    "metrics": REPORTS / "figures/metrics.png",
    "rouge_l": REPORTS / "figures/rouge_l.png",
}
METRICS_CSV = REPORTS / "plots/metrics.csv"
GENERAL_SET = Path("data/general.jsonl")  # the general, out-of-task set (data/general.py), written by fetch_data
INTERVALS = REPORTS / "intervals.json"  # bootstrap intervals beside metrics.json (reporting/intervals.py)
GENERAL_SCORES = REPORTS / "general.jsonl"  # the general set's per-example losses and generations
LIVE_DIR = REPORTS / "live"  # live metrics while a stage runs (reporting/live.py): one folder per stage

# Git-ignored working files: the stage log, locks, and the resume state of each stage.
PTUNE_DIR = Path(".ptune")
STAGE_LOG = PTUNE_DIR / "stage.log"
LOCK_DIR = PTUNE_DIR / "locks"
STATE_DIR = PTUNE_DIR / "state"

# In a model directory: what fetch_weights recorded about where the model came from and what it may run.
SOURCE_RECORD = "ptune_source.json"


def timings(stage: str) -> Path:
    return TIMINGS_DIR / f"{stage}.json"


def live(stage: str) -> Path:
    return LIVE_DIR / stage
