"""Stage evaluate: generate for the dev set with the base alone and with the prefix; score BLEU-4 and ROUGE.

Outputs: reports/metrics.json and reports/predictions.jsonl (content, label, base, ptuned per line). Finished
batches are journalled under .ptune/state/evaluate/, so a killed run resumes where it stopped and, with the
same seeds, ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from datasets import load_from_disk

from . import atomic, backends, metrics
from .config import Params
from .determinism import seed_everything
from .generation import generate_all
from .model import device
from .resume_state import Journal, ResumeState

BASE = Path("models/base")
PREFIX = Path("models/ptuning")
DATA = Path("data/processed")
METRICS = Path("reports/metrics.json")
PREDICTIONS = Path("reports/predictions.jsonl")


def run(params: Params) -> dict:
    cfg = params.evaluate
    seed_everything(cfg.seed)
    backend = backends.for_base(BASE)
    tokenizer = backend.load_tokenizer(BASE)
    model, encoder = backend.load_for_inference(BASE, PREFIX, device(), cfg.quantization_bit)

    dev = load_from_disk(str(DATA))["dev"]
    # The first max_examples of the dev set, in file order: the subset is the same on every run.
    if cfg.max_examples is not None:
        dev = dev.select(range(min(cfg.max_examples, len(dev))))
    prompts = dev["input_ids"]
    labels = dev["label"]
    state = ResumeState("evaluate", [BASE, PREFIX, DATA], asdict(cfg))
    outputs, speed = {}, {}
    for name, enc in (("base", None), ("ptuned", encoder)):
        journal = Journal(state.path(f"{name}.jsonl"))
        todo = len(prompts) - sum(len(texts) for texts in journal.done.values())
        t0 = time.perf_counter()
        outputs[name] = generate_all(model, enc, tokenizer, prompts, cfg, cfg.batch_size, cfg.seed, desc=name,
                                     journal=journal, backend=backend)
        speed[name] = round(todo / max(time.perf_counter() - t0, 1e-9), 3)

    result: dict = {"n_examples": len(labels), "empty_predictions": {}}
    for name, preds in outputs.items():
        result[name], result["empty_predictions"][name] = metrics.corpus_scores(preds, labels)

    with atomic.atomic_file(PREDICTIONS) as fh:
        for content, label, base, ptuned in zip(dev["content"], labels, outputs["base"], outputs["ptuned"]):
            fh.write(json.dumps({"content": content, "label": label, "base": base, "ptuned": ptuned},
                                ensure_ascii=False) + "\n")
    atomic.write_json(METRICS, result)
    state.finish()
    # examples/s of what this run generated (not what it read back from the journal), for reports/timings/.
    return {"examples_per_s": speed, "device": str(model.device)}
