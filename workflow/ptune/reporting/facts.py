"""The facts of the report, gathered from the pipeline's outputs: headline scores (base, P-tuned, reference),
training, evaluation with examples, cost, deploy and provenance. Both renderings (render.py) use only these.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import yaml

from .. import paths
from ..config import Params, ReportConfig
from ..paths import BASE, DEPLOY_CHECK, GENERAL_SCORES, INTERVALS, METRICS, PREDICTIONS, TRAIN_LOG
from ..paths import RAW as RAW_DATA
from ..pipeline.declared import NAMES as STAGES
from . import provenance
from .figures import Scored
from .metrics import METRIC_NAMES, per_example

MODELS = {"base": "base model", "ptuned": "P-tuned"}
# How to talk to the deployed model; each server reads models/deploy by default.
SERVE_COMMANDS = (
    ("ptune serve web", "web chat demo (Gradio) on http://127.0.0.1:7860"),
    ("ptune serve api", "HTTP API on http://127.0.0.1:8000 (POST /, /v1/chat/completions)"),
    ("ptune chat", "chat in this terminal"),
)
RANDOM_SEED = 0  # the "random" examples are the same ones on every rerun


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _ci(block: dict | None) -> tuple[float, float] | None:
    return (block["low"], block["high"]) if block else None


def reference_verdict(score: float, ref_score: float, ci: tuple[float, float] | None, tolerance: float) -> str:
    """ "within": the reference's figure lies inside the P-tuned score's interval (the run cannot be told apart
    from it); "above" / "below": the whole interval lies above or below it. Without an interval (no bootstrap),
    the fixed tolerance decides ("match" within it)."""
    if ci is not None:
        low, high = ci
        return "within" if low - 1e-9 <= ref_score <= high + 1e-9 else ("above" if low > ref_score else "below")
    gap = score - ref_score
    return "match" if abs(gap) <= tolerance + 1e-9 else ("above" if gap > 0 else "below")


def headline(metrics: dict, cfg: ReportConfig, intervals: dict | None = None) -> dict:
    """Scores of base, P-tuned and reference with their intervals, and the differences that say whether tuning
    worked: the gain's paired interval, whether it is clear of noise, and where the reference falls."""
    ci = (intervals or {}).get("scores") or {}
    rows = []
    for m in MODELS:
        bounds = {k: _ci(ci.get(m, {}).get(k)) for k in METRIC_NAMES}
        # Scored: the score chart draws each bar's interval as an error bar
        rows.append(
            {"label": MODELS[m], "scores": Scored({k: metrics[m][k] for k in METRIC_NAMES}, bounds), "ci": bounds}
        )
    gain = ci.get("gain", {})
    diffs = [
        {
            "label": "P-tuned − base",
            "scores": {k: metrics["ptuned"][k] - metrics["base"][k] for k in METRIC_NAMES},
            "ci": {k: _ci(gain.get(k)) for k in METRIC_NAMES},
            "noise_free": {k: gain[k]["clear"] if k in gain else None for k in METRIC_NAMES},
            "p_le_0": {k: gain[k]["p_le_0"] if k in gain else None for k in METRIC_NAMES},
            "verdict": None,
        }
    ]
    ref = cfg.reference
    if ref is not None:
        none = dict.fromkeys(METRIC_NAMES)
        rows.append({"label": f"reference: {ref.name}", "scores": {k: ref.score(k) for k in METRIC_NAMES}, "ci": none})
        gap = {k: metrics["ptuned"][k] - ref.score(k) for k in METRIC_NAMES}
        diffs.append(
            {
                "label": "P-tuned − reference",
                "scores": gap,
                "ci": none,
                "noise_free": none,
                "p_le_0": none,
                "verdict": {
                    k: reference_verdict(metrics["ptuned"][k], ref.score(k), rows[1]["ci"][k], ref.tolerance)
                    for k in METRIC_NAMES
                },
            }
        )
    boot = (intervals or {}).get("bootstrap") or {}
    return {
        "metrics": METRIC_NAMES,
        "rows": rows,
        "diffs": diffs,
        "lead": "rouge-l",
        "tolerance": ref.tolerance if ref is not None else None,
        "n_examples": metrics["n_examples"],
        "empty_predictions": metrics["empty_predictions"],
        "intervals": bool(ci),
        "confidence": boot.get("confidence"),
        "resamples": boot.get("resamples"),
        "noise": noise_verdict(gain, "rouge-l", boot.get("confidence")),
    }


def noise_verdict(gain: dict, lead: str, confidence: float | None) -> str:
    """One sentence: is the P-tuned − base gain clear of noise on the lead metric (and on how many of the rest)."""
    if not gain:
        return "No intervals were computed (evaluate.bootstrap_resamples is 0): whether the gain is noise is not known."
    g = gain[lead]
    span = f"its {confidence * 100:g} % interval on ROUGE-L, [{g['low']:+.2f}, {g['high']:+.2f}]"
    clear = [k for k in METRIC_NAMES if gain[k]["clear"]]
    if g["clear"] and g["low"] > 0:
        what = f"The gain is clear of noise: {span}, excludes 0"
    elif g["clear"]:
        what = f"P-tuning made it worse, clearly: {span}, lies below 0"
    else:
        what = f"The gain is not clear of noise: {span}, includes 0"
    return (
        f"{what} (the gain was ≤ 0 in {g['p_le_0'] * 100:.1f} % of the paired bootstrap resamples); "
        f"{len(clear)} of {len(METRIC_NAMES)} metrics have intervals clear of 0."
    )


def general_set(intervals: dict | None, rows: list[dict]) -> dict:
    """What the prefix costs outside its task: the general set's loss and perplexity with the prefix off and on,
    the cost's interval, and the generations side by side."""
    g = (intervals or {}).get("general") or {}
    given = bool(g.get("given")) and bool(rows)
    return {
        "given": given,
        "n_examples": g.get("n_examples", 0),
        "tokens": g.get("tokens"),
        "loss": g.get("loss"),
        "perplexity": g.get("perplexity"),
        "samples": [r for r in rows if r.get("generated")],
    }


def training(log_rows: list[dict], timing: dict) -> dict:
    trainable, total = timing.get("trainable_parameters"), timing.get("total_parameters")
    return {
        "steps": timing.get("steps", int(log_rows[-1]["step"]) if log_rows else None),
        "samples_seen": timing.get("samples_seen"),
        "wall_s": timing.get("wall_s"),
        "train_s": timing.get("train_s"),
        "samples_per_s": timing.get("samples_per_s"),
        "peak_rss_bytes": timing.get("peak_rss_bytes"),
        "peak_gpu_memory_bytes": timing.get("peak_gpu_memory_bytes"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total if trainable and total else None,
        "precision": timing.get("precision"),
        "device": timing.get("device_name") or timing.get("device"),
        "resumed_from_step": timing.get("resumed_from_step"),
        "first_loss": (int(log_rows[0]["step"]), float(log_rows[0]["loss"])) if log_rows else None,
        "last_loss": (int(log_rows[-1]["step"]), float(log_rows[-1]["loss"])) if log_rows else None,
    }


def _example(i: int, p: dict, scores: dict) -> dict:
    return {
        "index": i,
        "content": p["content"],
        "label": p["label"],
        "base": p["base"],
        "ptuned": p["ptuned"],
        "rouge_l": {m: scores[m][i] for m in MODELS},
    }


def evaluation(predictions: list[dict], metrics: dict, timing: dict, cfg: ReportConfig) -> dict:
    """Per-example ROUGE-L of both models (as evaluate scores them), and the examples worth reading."""
    labels = [p["label"] for p in predictions]
    scores = {m: [s["rouge-l"] for s, _ in per_example([p[m] for p in predictions], labels)] for m in MODELS}
    # Best and worst by the P-tuned model's ROUGE-L; ties in dev-set order, so reruns pick the same ones.
    order = sorted(range(len(predictions)), key=lambda i: (-scores["ptuned"][i], i))
    n = min(cfg.n_samples, len(order) // 2)
    best, worst = order[:n], sorted(order[len(order) - n :], key=lambda i: (scores["ptuned"][i], i)) if n else []
    shown = set(best) | set(worst)
    rest = [i for i in range(len(predictions)) if i not in shown] or list(range(len(predictions)))
    randoms = sorted(random.Random(RANDOM_SEED).sample(rest, min(cfg.n_random, len(rest))))
    speed = timing.get("examples_per_s") or {}
    return {
        "n_examples": metrics["n_examples"],
        "empty_predictions": metrics["empty_predictions"],
        "examples_per_s": {m: speed.get(m) for m in MODELS},
        "wall_s": timing.get("wall_s"),
        "device": timing.get("device"),
        "rouge_l_scores": scores,
        "median_rouge_l": {m: sorted(v)[len(v) // 2] if v else None for m, v in scores.items()},
        "groups": [
            {
                "id": "best",
                "title": f"The {len(best)} best (P-tuned ROUGE-L)",
                "examples": [_example(i, predictions[i], scores) for i in best],
            },
            {
                "id": "worst",
                "title": f"The {len(worst)} worst (P-tuned ROUGE-L)",
                "examples": [_example(i, predictions[i], scores) for i in worst],
            },
            {
                "id": "random",
                "title": f"{len(randoms)} at random",
                "examples": [_example(i, predictions[i], scores) for i in randoms],
            },
        ],
    }


def cost(timings: dict, cfg: ReportConfig) -> dict:
    """Hours per stage, on the GPU or the CPU, and compute units (CU) where the instance's rate is given.
    An instance bills while it runs, idle or not: these are the stages' own hours, a lower bound."""
    rows = []
    for stage in STAGES:
        t = timings.get(stage)
        if not t or stage == "report":  # the report's own time is not known until it is written
            continue
        on_gpu = str(t.get("device", "cpu")).startswith("cuda")
        hours = t["wall_s"] / 3600
        rows.append(
            {
                "stage": stage,
                "wall_s": t["wall_s"],
                "device": "GPU" if on_gpu else "CPU",
                "gpu_h": hours if on_gpu else 0.0,
                "cpu_h": 0.0 if on_gpu else hours,
                "host": t.get("host"),
            }
        )
    total_h = sum(r["gpu_h"] + r["cpu_h"] for r in rows)
    spent = total_h * cfg.cu_per_hour if cfg.cu_per_hour is not None else None
    return {
        "rows": rows,
        "gpu_h": sum(r["gpu_h"] for r in rows),
        "cpu_h": sum(r["cpu_h"] for r in rows),
        "total_h": total_h,
        "wall_s": sum(r["wall_s"] for r in rows),
        "cu_per_hour": cfg.cu_per_hour,
        "cu_spent": spent,
        "cu_quota": cfg.cu_quota,
        "cu_remaining": cfg.cu_quota - spent if spent is not None and cfg.cu_quota is not None else None,
    }


def deploy(check: dict) -> dict:
    known = ("bundle", "prompt", "answer", "latency_s", "load_s")
    return {
        **{k: check.get(k) for k in known},
        # whatever else the deploy check recorded (e.g. the server it asked), shown as it is
        "other": {k: v for k, v in sorted(check.items()) if k not in known and not isinstance(v, (dict, list))},
        "commands": [{"command": c, "what": w} for c, w in SERVE_COMMANDS],
        "recorded": bool(check),
    }


def provenance_facts(params: Params, timings: dict) -> dict:
    devices = {
        stage: t.get("device_name") or t.get("device")
        for stage, t in timings.items()
        if t.get("device_name") or t.get("device")
    }
    return {
        "git": provenance.git_commit(),
        "versions": provenance.package_versions(),
        "base_model": provenance.base_model(BASE),
        "data_sha256": provenance.sha256_files(RAW_DATA),
        "devices": devices,
        "hosts": sorted({t.get("host") for t in timings.values() if t.get("host")}),
        "params_yaml": yaml.safe_dump(params.raw, allow_unicode=True, sort_keys=False).rstrip(),
    }


def _read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.is_file() else []
    )


def collect(params: Params) -> dict:
    """Every fact the report shows, read from the pipeline's outputs; both renderings use only these."""
    metrics = _read_json(METRICS)
    intervals = _read_json(INTERVALS)
    predictions = [json.loads(line) for line in PREDICTIONS.read_text(encoding="utf-8").splitlines() if line]
    with open(TRAIN_LOG, encoding="utf-8", newline="") as fh:
        log_rows = list(csv.DictReader(fh))
    timings = {stage: _read_json(paths.timings(stage)) for stage in STAGES if paths.timings(stage).is_file()}
    return {
        "headline": headline(metrics, params.report, intervals),
        "general": general_set(intervals, _read_jsonl(GENERAL_SCORES)),
        "training": training(log_rows, timings.get("train", {})),
        "log_rows": log_rows,
        "evaluation": evaluation(predictions, metrics, timings.get("evaluate", {}), params.report),
        "cost": cost(timings, params.report),
        "deploy": deploy(_read_json(DEPLOY_CHECK)),
        "provenance": provenance_facts(params, timings),
        "timings": timings,
    }
