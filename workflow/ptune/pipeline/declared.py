"""Each stage declared once: what it reads and writes, the params it reads, its help, its resources, whether it runs
in the base model's environment, and where its code starts. dvc.yaml is written from this (dvc_yaml.py) and the
Snakefile builds its rules from dvc.yaml; the CLI, the params scope (config.load) and the code deps read it here.

Not a code dep of any stage, though every stage imports it: what in it changes a result (a path, a param, the
command) is in dvc.yaml, which DVC compares itself, and the rest (help, resources) changes no output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..paths import (
    BASE,
    DEPLOY,
    DEPLOY_CHECK,
    FIGURES,
    GENERAL_SCORES,
    GENERAL_SET,
    INTERVALS,
    METRICS,
    METRICS_CSV,
    PREDICTIONS,
    PREFIX,
    PROCESSED,
    RAW,
    REPORT_HTML,
    REPORT_MD,
    TIMINGS,
    TRAIN_LOG,
    live,
    timings,
)

# params: every key of params.yaml (the report shows them all).
ALL = "*"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    reads: tuple[Path, ...]  # dvc.yaml deps besides code
    writes: tuple[Path, ...]  # outs
    params: tuple[str, ...]  # sections or section.key; ALL for every key
    resources: dict[str, int]  # what a cluster profile submits: mem_mb, runtime (minutes), gpu (a count)
    model_env: bool = False  # loads models/base: runs in the environment its backend needs (model/legacy_env.py)
    synced: bool = False  # its resume state travels to the DVC remote (remote/checkpoints.py)
    metrics: tuple[Path, ...] = ()
    plots: dict[Path, dict] = field(default_factory=dict)  # path -> dvc.yaml plot options
    # Modules its processes start besides ptune.stages.<name> and the runner: `python -m` entries of subprocesses.
    starts: tuple[str, ...] = ()
    # Files of the package, not Python, that it reads (templates).
    data_files: tuple[str, ...] = ()
    why: dict[str, str] = field(default_factory=dict)  # a dep, out or param -> why, written beside it in dvc.yaml
    report: dict[Path, dict] = field(default_factory=dict)  # outputs in Snakemake's own report: options of report()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Everything it writes: outs, metrics and plots."""
        return (*self.writes, *self.metrics, *self.plots)


_WORKER = "ptune.stages.worker"  # a stage on several devices: one process per device (state/multiprocess.py)

STAGES: tuple[Stage, ...] = (
    Stage(
        name="fetch_weights",
        help="put the base model and tokenizer in models/base/",
        reads=(),
        writes=(BASE, timings("fetch_weights")),
        params=("fetch_weights",),
        resources={"mem_mb": 4000, "runtime": 120},
    ),
    Stage(
        name="fetch_data",
        help="write ADGEN-shaped data/raw/train.json and dev.json, and the general set data/general.jsonl",
        reads=(),
        writes=(RAW, GENERAL_SET, timings("fetch_data")),
        params=("fetch_data", "fetch_weights.embedded"),
        resources={"mem_mb": 2000, "runtime": 60},
        why={"fetch_weights.embedded": "the embedded general set is held out from this base's pre-training corpus"},
    ),
    Stage(
        name="preprocess",
        help="apply the prompt template, tokenize and truncate into data/processed/",
        reads=(RAW, BASE),
        writes=(PROCESSED, timings("preprocess")),
        params=("preprocess",),
        resources={"mem_mb": 4000, "runtime": 60},
        model_env=True,
    ),
    Stage(
        name="train",
        help="learn the P-tuning v2 prefix into models/ptuning/",
        reads=(PROCESSED, BASE),
        writes=(PREFIX, timings("train"), live("train")),
        params=("train",),
        resources={"mem_mb": 8000, "gpu": 1, "runtime": 720},
        model_env=True,
        synced=True,
        plots={TRAIN_LOG: {"x": "step", "y": "loss"}},
        starts=(_WORKER,),
        why={
            # Not persist (DVC keeps no run-cache for a stage with one) and not cache: false (a fresh clone would
            # lack it and see train as changed): each run writes it anew from its checkpoint's rows.
            str(live("train")): "live metrics, written while it trains (reporting/live.py; $PTUNE_TRACKERS)",
        },
    ),
    Stage(
        name="evaluate",
        help="generate for the dev set, score BLEU-4 / ROUGE into reports/metrics.json, with intervals; score the "
        "general set with the prefix off and on",
        reads=(PROCESSED, BASE, PREFIX, GENERAL_SET),
        writes=(PREDICTIONS, GENERAL_SCORES, timings("evaluate"), live("evaluate")),
        params=("evaluate", "preprocess", "fetch_weights.allow_pickle"),
        resources={"mem_mb": 8000, "gpu": 1, "runtime": 240},
        model_env=True,
        synced=True,
        metrics=(METRICS, INTERVALS),
        starts=(_WORKER,),
        why={
            str(GENERAL_SET): "what the prefix costs outside its task: loss with it off and on (data/general.py)",
            "preprocess": "the prompt format decides the tokens an answer ends with",
            "fetch_weights.allow_pickle": "a reference checkpoint's pytorch_model.bin is read only when allowed",
            str(live("evaluate")): "progress, written as batches finish (live metrics, like train's)",
        },
    ),
    Stage(
        name="deploy",
        help="write the serving bundle to models/deploy/ and smoke-test it",
        reads=(BASE, PREFIX, METRICS),
        writes=(DEPLOY, DEPLOY_CHECK, timings("deploy")),
        params=(
            "deploy",
            "preprocess",
            "evaluate.quantization",
            "fetch_weights.allow_pickle",
            "fetch_weights.trust_remote_code",
            "fetch_data",
            "report.reference",
        ),
        resources={"mem_mb": 8000, "runtime": 60},
        model_env=True,
        starts=("ptune.serve",),  # its check serves the bundle as a user does: `ptune serve api` (serve/process.py)
        why={
            str(METRICS): "a bundle ships only an evaluated prefix, with its scores",
            "preprocess": "the prompt format the prefix was trained on goes into the bundle",
            "evaluate.quantization": "the bundle serves the base as it was evaluated",
            "fetch_weights.allow_pickle": "a reference checkpoint's pytorch_model.bin is read only when allowed",
            "fetch_weights.trust_remote_code": "the check's server runs a chatglm base's code only when allowed",
            "fetch_data": "the model card names the data set (its hub id, for hub data)",
            "report.reference": "the model card compares the scores with the published figures",
        },
    ),
    Stage(
        name="report",
        help="write reports/report.html and report.md: scores, training, examples, cost, deploy, provenance",
        reads=(
            METRICS,
            INTERVALS,
            PREDICTIONS,
            GENERAL_SCORES,
            TRAIN_LOG,
            DEPLOY_CHECK,
            *(timings(s) for s in ("fetch_weights", "fetch_data", "preprocess", "train", "evaluate", "deploy")),
            BASE,
            RAW,
        ),
        writes=(REPORT_HTML, REPORT_MD, *FIGURES.values(), METRICS_CSV, TIMINGS),
        params=(ALL,),
        resources={"mem_mb": 2000, "runtime": 30},
        data_files=("reporting/templates/report.html.j2", "reporting/templates/report.md.j2"),
        why={
            str(BASE): "provenance: what fetch_weights recorded about the base model",
            str(RAW): "provenance: the data's sha256",
        },
        report={
            REPORT_HTML: {"category": "1. ptune report", "labels": {"what": "the whole report, one page"}},
            FIGURES["metrics"]: {"category": "2. Scores", "labels": {"what": "BLEU-4 and ROUGE, base vs P-tuned"}},
            FIGURES["rouge_l"]: {"category": "2. Scores", "labels": {"what": "per-example ROUGE-L histogram"}},
            FIGURES["training"]: {"category": "3. Training", "labels": {"what": "loss and learning rate"}},
            METRICS_CSV: {"category": "2. Scores", "labels": {"what": "scores table"}},
        },
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)  # in DAG order
SYNCED: tuple[str, ...] = tuple(s.name for s in STAGES if s.synced)

# `dvc plots show` / `dvc plots diff REV...` draw these (the training loss is declared by the train stage). Run while
# a stage runs, they show how far it got: train_log.csv and reports/live/ are written as it goes.
PLOTS: tuple[tuple[str, dict], ...] = (
    ("learning rate", {"x": "step", "y": {str(TRAIN_LOG): "learning_rate"}}),
    ("scores", {"template": "bar_horizontal", "x": "score", "y": {str(METRICS_CSV): "label"}}),
    (
        "training throughput (live)",
        {"x": "step", "y": {str(live("train") / "plots/metrics/samples_per_s.tsv"): "samples_per_s"}},
    ),
    (
        "evaluation progress (live)",
        {"x": "step", "y": {str(live("evaluate") / "plots/metrics/examples.tsv"): "examples"}},
    ),
)
