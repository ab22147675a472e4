"""Where ptune reads and writes, relative to the project root: the one place the code names these paths.

dvc.yaml declares the stages' paths for DVC and Snakemake; a test (tests/test_paths.py) checks that INPUTS and
OUTPUTS below are exactly its deps and outs, and STAGES its stage order.
"""

from __future__ import annotations

from pathlib import Path

# The checkout this package is installed from (`pip install -e .`): the schema, scripts and requirements live there.
REPO = Path(__file__).resolve().parents[2]

# The pipeline's stages in DAG order; each is a module of ptune.stages with `run(params)`, and a `ptune` command.
STAGES = ("fetch_weights", "fetch_data", "preprocess", "train", "evaluate", "deploy", "report")
# The stages that load models/base: they run in the environment its backend needs (model.backends, legacy_env).
MODEL_STAGES = ("preprocess", "train", "evaluate", "deploy")
# The stages whose resume state travels to the DVC remote (`ptune checkpoint push|pull`, remote/checkpoints.py).
SYNCED_STAGES = ("train", "evaluate")

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


# What each stage reads (dvc.yaml's deps) and writes (its outs, metrics and plots).
INPUTS: dict[str, tuple[Path, ...]] = {
    "fetch_weights": (),
    "fetch_data": (),
    "preprocess": (RAW, BASE),
    "train": (PROCESSED, BASE),
    "evaluate": (PROCESSED, BASE, PREFIX),
    "deploy": (BASE, PREFIX, METRICS),
    "report": (METRICS, PREDICTIONS, TRAIN_LOG, DEPLOY_CHECK, *(timings(s) for s in STAGES[:-1]), BASE, RAW),
}
OUTPUTS: dict[str, tuple[Path, ...]] = {
    "fetch_weights": (BASE, timings("fetch_weights")),
    "fetch_data": (RAW, timings("fetch_data")),
    "preprocess": (PROCESSED, timings("preprocess")),
    "train": (PREFIX, timings("train"), live("train"), TRAIN_LOG),
    "evaluate": (PREDICTIONS, timings("evaluate"), live("evaluate"), METRICS),
    "deploy": (DEPLOY, DEPLOY_CHECK, timings("deploy")),
    "report": (REPORT_HTML, REPORT_MD, *FIGURES.values(), METRICS_CSV, TIMINGS),
}
