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


Interval = tuple[float, float] | None


class Scored(dict):
    """Scores by metric that carry their intervals (metric -> (low, high) or None) in `ci`: a bar chart of them
    draws error bars."""

    def __init__(self, scores: Mapping[str, float], ci: Mapping[str, Interval] | None = None):
        super().__init__(scores)
        self.ci = dict(ci or {})


def _metric_bars(
    ax, table: Mapping[str, Mapping[str, float]], errors: Mapping[str, Mapping[str, Interval]] | None = None
) -> None:
    """Grouped bars: one group per metric, one bar per row of `table` (label -> metric -> score); `errors`
    (label -> metric -> (low, high)) draws each bar's interval as an error bar."""
    width = 0.8 / max(1, len(table))
    top = 0.0
    for i, (label, scores) in enumerate(table.items()):
        xs = [m + i * width for m in range(len(METRIC_NAMES))]
        heights = [scores.get(name, 0.0) for name in METRIC_NAMES]
        ci = (errors or {}).get(label) or getattr(scores, "ci", None) or {}
        yerr = None
        if any(ci.get(name) for name in METRIC_NAMES):
            lows = [h - ci[n][0] if ci.get(n) else 0.0 for n, h in zip(METRIC_NAMES, heights)]
            highs = [ci[n][1] - h if ci.get(n) else 0.0 for n, h in zip(METRIC_NAMES, heights)]
            yerr = [[max(0.0, v) for v in lows], [max(0.0, v) for v in highs]]
            top = max([top, *(ci[n][1] for n in METRIC_NAMES if ci.get(n))])
        ax.bar(xs, heights, width=width, label=label, yerr=yerr, capsize=3 if yerr else 0)
    ax.set_xticks(
        [m + width * (len(table) - 1) / 2 for m in range(len(METRIC_NAMES))], [LABELS[n] for n in METRIC_NAMES]
    )
    top = max([top, *(v for scores in table.values() for v in scores.values())])
    ax.set_ylim(0, max(1.0, top * 1.15))  # scores are never negative; all-zero scores still get an axis
    ax.set_ylabel("score (x100)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(alpha=0.3, axis="y")


def metric_bars(
    table: Mapping[str, Mapping[str, float]], errors: Mapping[str, Mapping[str, Interval]] | None = None
) -> bytes:
    fig, ax = plt.subplots(figsize=(8.5, 3.2), dpi=100)
    _metric_bars(ax, table, errors)
    ax.set_title("BLEU-4 and ROUGE on the dev set" + (" (error bars: bootstrap intervals)" if errors else ""))
    return _png(fig)


def experiments(
    curves: Mapping[str, Sequence[Mapping]],
    table: Mapping[str, Mapping[str, float]],
    errors: Mapping[str, Mapping[str, Interval]] | None = None,
) -> bytes:
    """`ptune compare`: each experiment's training loss, and its P-tuned scores beside the others'."""
    fig, (loss, bars) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=100)
    for label, rows in curves.items():
        _curve(loss, rows, "loss", label=label)
    loss.set_ylabel("training loss")
    loss.set_title("training loss")
    if curves:
        loss.legend(fontsize="small")
    _metric_bars(bars, table, errors)
    bars.set_title("P-tuned model on the dev set" + (" (error bars: each run's interval)" if errors else ""))
    return _png(fig)
