"""The report's figures, drawn with matplotlib into PNG bytes that depend only on the data (no timestamp)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import METRIC_NAMES  # noqa: E402

LABELS = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # No metadata: the PNG bytes then depend only on what is drawn.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _curve(ax, rows: Sequence[Mapping], column: str, label: str | None = None) -> None:
    ax.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], marker=".", label=label)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def training_curves(rows: Sequence[Mapping]) -> bytes:
    """Training loss and learning rate against the optimizer step (reports/train_log.csv)."""
    fig, (loss, lr) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    _curve(loss, rows, "loss")
    loss.set_ylabel("training loss")
    loss.set_title("training loss (mean per logging window)")
    _curve(lr, rows, "learning_rate")
    lr.set_ylabel("learning rate")
    lr.set_title("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _png(fig)


def score_histogram(scores: Mapping[str, Sequence[float]], metric: str = "rouge-l") -> bytes:
    """Distribution of per-example scores, one outlined histogram per model on the same 5-point bins."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bins = list(range(0, 105, 5))
    for label, values in scores.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, label=f"{label} (n={len(values)})")
    ax.set_xlabel(f"per-example {LABELS.get(metric, metric)}")
    ax.set_ylabel("examples")
    ax.set_xlim(0, 100)
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def _metric_bars(ax, table: Mapping[str, Mapping[str, float]]) -> None:
    """Grouped bars: one group per metric, one bar per row of `table` (label -> metric -> score)."""
    width = 0.8 / max(1, len(table))
    for i, (label, scores) in enumerate(table.items()):
        xs = [m + i * width for m in range(len(METRIC_NAMES))]
        ax.bar(xs, [scores.get(name, 0.0) for name in METRIC_NAMES], width=width, label=label)
    ax.set_xticks(
        [m + width * (len(table) - 1) / 2 for m in range(len(METRIC_NAMES))], [LABELS[n] for n in METRIC_NAMES]
    )
    top = max((v for scores in table.values() for v in scores.values()), default=0.0)
    ax.set_ylim(0, max(1.0, top * 1.15))  # scores are never negative; all-zero scores still get an axis
    ax.set_ylabel("score (x100)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(alpha=0.3, axis="y")


def metric_bars(table: Mapping[str, Mapping[str, float]]) -> bytes:
    fig, ax = plt.subplots(figsize=(8.5, 3.2), dpi=100)
    _metric_bars(ax, table)
    ax.set_title("BLEU-4 and ROUGE on the dev set")
    return _png(fig)


def experiments(curves: Mapping[str, Sequence[Mapping]], table: Mapping[str, Mapping[str, float]]) -> bytes:
    """`ptune compare`: each experiment's training loss, and its P-tuned scores beside the others'."""
    fig, (loss, bars) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=100)
    for label, rows in curves.items():
        _curve(loss, rows, "loss", label=label)
    loss.set_ylabel("training loss")
    loss.set_title("training loss")
    if curves:
        loss.legend(fontsize="small")
    _metric_bars(bars, table)
    bars.set_title("P-tuned model on the dev set")
    return _png(fig)
