"""Stage train: learn a P-tuning v2 prefix on data/processed/train with the base frozen; save only the prefix.

One loop to read top to bottom: load, step, log, save. Outputs: models/ptuning/ (prefix.safetensors +
prefix_config.json) and reports/train_log.csv (step,loss,learning_rate,samples_per_s).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import torch
from datasets import load_from_disk
from tqdm import tqdm

from . import atomic, prefixed
from .config import Params, TrainConfig
from .determinism import seed_everything
from .model import assert_frozen, device, load_frozen
from .prefix_encoder import PrefixEncoder, prefix_config_for

log = logging.getLogger(__name__)

BASE = Path("models/base")
DATA = Path("data/processed")
OUT = Path("models/ptuning")
TRAIN_LOG = Path("reports/train_log.csv")
IGNORE_INDEX = -100


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training (generation pads on the left)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(n_rows: int, batch_size: int, seed: int):
    """Endless seeded epochs of shuffled row indices."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_rows, generator=gen).tolist()
        for start in range(0, n_rows - batch_size + 1 if n_rows >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then linear decay to 0 at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = cfg.max_steps - step
    return cfg.learning_rate * remaining / max(1, cfg.max_steps - cfg.warmup_steps)


def run(params: Params) -> None:
    cfg = params.train
    seed_everything(cfg.seed)
    dev = device()
    model = load_frozen(BASE, dev)
    total = assert_frozen(model)
    encoder = PrefixEncoder(prefix_config_for(model, cfg.pre_seq_len, cfg.prefix_projection,
                                              cfg.prefix_hidden_size, base_model=str(BASE))).to(dev)
    trainable = sum(p.numel() for p in encoder.parameters())
    log.info("trainable parameters: %d of %d (%.4f%%); base frozen", trainable, total + trainable,
             100 * trainable / (total + trainable))

    train = load_from_disk(str(DATA))["train"]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = batches(len(train), cfg.per_device_train_batch_size, cfg.seed)

    rows: list[tuple] = []
    encoder.train()
    t_log, samples_since, window_losses = time.perf_counter(), 0, []
    bar = tqdm(range(cfg.max_steps), desc="train prefix", unit="step", mininterval=2)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            idx = next(order)
            batch = {k: v.to(dev) for k, v in collate([train[i] for i in idx], pad_id).items()}
            loss = prefixed.forward(model, encoder, **batch).loss / cfg.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.item()
            samples_since += len(idx)
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.max_grad_norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
        window_losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps:
            elapsed = time.perf_counter() - t_log
            # samples/s is the one column that varies between reruns; reports compare the others.
            rows.append((step + 1, round(step_loss, 6), f"{lr:.6g}", round(samples_since / max(elapsed, 1e-9), 2)))
            t_log, samples_since, window_losses = time.perf_counter(), 0, []

    with atomic.atomic_dir(OUT) as tmp:
        encoder.save(tmp)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "loss", "learning_rate", "samples_per_s"])
    writer.writerows(rows)
    atomic.write_text(TRAIN_LOG, buf.getvalue())
