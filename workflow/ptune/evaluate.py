"""Stage evaluate: generate for the dev set with the base alone and with the prefix; score BLEU-4 and ROUGE.

Outputs: reports/metrics.json and reports/predictions.jsonl (content, label, base, ptuned per line).
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

from . import atomic, metrics
from .config import Params
from .determinism import seed_everything
from .generation import generate_all
from .model import device, load_frozen, load_tokenizer
from .prefix_encoder import PrefixEncoder

BASE = Path("models/base")
PREFIX = Path("models/ptuning")
DATA = Path("data/processed")
METRICS = Path("reports/metrics.json")
PREDICTIONS = Path("reports/predictions.jsonl")


def run(params: Params) -> None:
    cfg = params.evaluate
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(BASE)
    model = load_frozen(BASE, device())
    encoder = PrefixEncoder.load(PREFIX, model).to(model.device)
    encoder.eval()

    dev = load_from_disk(str(DATA))["dev"]
    if cfg.max_examples is not None:
        dev = dev.select(range(min(cfg.max_examples, len(dev))))
    prompts = dev["input_ids"]
    labels = dev["label"]
    outputs = {}
    for name, enc in (("base", None), ("ptuned", encoder)):
        outputs[name] = generate_all(model, enc, tokenizer, prompts, cfg, cfg.batch_size, cfg.seed, desc=name)

    result: dict = {"n_examples": len(labels), "empty_predictions": {}}
    for name, preds in outputs.items():
        result[name], result["empty_predictions"][name] = metrics.corpus_scores(preds, labels)

    with atomic.atomic_file(PREDICTIONS) as fh:
        for content, label, base, ptuned in zip(dev["content"], labels, outputs["base"], outputs["ptuned"]):
            fh.write(json.dumps({"content": content, "label": label, "base": base, "ptuned": ptuned},
                                ensure_ascii=False) + "\n")
    atomic.write_json(METRICS, result)
