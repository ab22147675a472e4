"""Training primitives: the data order, the learning-rate schedule and the optimizer step, and `Trainer`, which
runs one step of the stage's loop on this process. `ptune train` (stages/train.py) and the benchmarks use these.

Nothing here saves, logs or stops: checkpoints, train_log.csv, live metrics and stop requests belong to the run
around the steps (stages/run_context.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import PtuneError
from ..model import backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch_indices(k: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Rows of the k-th micro-batch: epoch e is a permutation seeded by (seed, e), so any position can be
    recomputed from k alone and a resumed run reads exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, pos = divmod(k, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[pos * batch_size : (pos + 1) * batch_size] or order[:batch_size]


def micro_batches_at(
    step: int, train, cfg: TrainConfig, pad_id: int, dev, rank: int = 0, world: int = 1, *, collate
) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of optimizer step `step` for process `rank` of `world`.

    Each step reads gradient_accumulation_steps global micro-batches of per_device x world rows; rank r takes
    the r-th slice of each, so the data order depends on the step alone, whatever the rank.
    """
    per_device = cfg.per_device_train_batch_size
    out = []
    for micro in range(cfg.gradient_accumulation_steps):
        idx = batch_indices(step * cfg.gradient_accumulation_steps + micro, len(train), per_device * world, cfg.seed)[
            rank * per_device : (rank + 1) * per_device
        ]
        cols = train[idx]  # one read for the batch: a row at a time costs twice as much on the embedded default
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(cols["input_ids"], cols["labels"])]
        out.append({k: v.to(dev) for k, v in collate(rows, pad_id).items()})
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then linear decay to 0 at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = cfg.max_steps - step
    return cfg.learning_rate * remaining / max(1, cfg.max_steps - cfg.warmup_steps)


def check_precision(cfg: TrainConfig, dev: torch.device) -> None:
    if cfg.precision == "fp16" and dev.type != "cuda":
        raise PtuneError("train.precision: fp16 needs a CUDA GPU (loss scaling runs there); use fp32 or bf16 here")


def check_context(model, train, cfg: TrainConfig) -> None:
    """The prefix takes positions too: prefix + the longest example must fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, train["input_ids"]), default=0)
    if isinstance(context, int) and cfg.pre_seq_len + longest > context:
        raise PtuneError(
            f"train.pre_seq_len ({cfg.pre_seq_len}) + the longest training example ({longest} tokens, "
            f"see preprocess.max_source_length/max_target_length) exceed the base model's context of "
            f"{context} tokens; lower train.pre_seq_len or the preprocess lengths"
        )


def optimizer_step(
    model,
    encoder,
    micro_batches: list[dict],
    optim,
    scaler,
    autocast,
    max_grad_norm: float,
    no_sync=contextlib.nullcontext,
    *,
    backend: backends.Backend,
) -> float:
    """One optimizer step over accumulated micro-batches; returns the step's loss (the mean over them).

    `encoder` may be a DistributedDataParallel wrapper; `no_sync()` then skips the gradient all-reduce of every
    micro-batch but the last (accumulating the local gradients first gives the same sum with one exchange).
    `backend` computes the loss.
    """
    step_loss = 0.0
    for i, batch in enumerate(micro_batches):
        with no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            with autocast:
                loss = backend.loss(model, encoder, batch) / len(micro_batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.item()
    if scaler is not None:
        scaler.unscale_(optim)
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optim)
        scaler.update()
    else:
        optim.step()
    optim.zero_grad(set_to_none=True)
    return step_loss


@dataclass(frozen=True)
class Step:
    """What one optimizer step did: its loss (the mean over the processes), learning rate and rows (all ranks)."""

    loss: float
    lr: float
    samples: int


@dataclass
class Trainer:
    """This process's part of training the prefix: the frozen model, the prefix, its optimizer and the data.

    `acc` is the accelerate Accelerator of the process (state/multiprocess.py): its rank, the world, and the
    collectives. `shared` is what the steps train: the prefix itself, or with several processes its DDP wrapper
    (`share()`, once the prefix holds its starting values).
    """

    model: Any
    encoder: Any
    optim: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    autocast: Any
    backend: backends.Backend
    cfg: TrainConfig
    data: Any  # the training split (a datasets.Dataset)
    pad_id: int
    acc: Any
    shared: Any = None

    @classmethod
    def create(cls, model, encoder, backend: backends.Backend, cfg: TrainConfig, data, acc) -> Trainer:
        """AdamW over the prefix; loss scaling for fp16; autocast for bf16 and fp16 (fp32 runs without)."""
        dev = acc.device
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        dtype = DTYPES[cfg.precision]
        autocast = torch.autocast(dev.type, dtype=dtype) if cfg.precision != "fp32" else contextlib.nullcontext()
        return cls(model, encoder, optim, scaler, autocast, backend, cfg, data, pad_id, acc)

    def load(self, saved: dict) -> None:
        """The prefix, optimizer and loss scale of a checkpoint (state/checkpoint.py's load_training)."""
        self.encoder.load_state_dict(saved["prefix"])
        self.optim.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])

    def state_dicts(self) -> dict:
        """What a checkpoint keeps of the training (the inverse of `load`)."""
        return {
            "prefix": self.encoder.state_dict(),
            "optimizer": self.optim.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def share(self) -> None:
        """One process: the encoder itself. Several: a DDP wrapper that averages the prefix's gradients."""
        self.shared = self.acc.prepare_model(self.encoder)
        self.shared.train()

    def step(self, step: int) -> Step:
        """Optimizer step `step` (0-based): the scheduled learning rate, this rank's micro-batches, one update."""
        acc, cfg, world = self.acc, self.cfg, self.acc.num_processes
        lr = lr_at(step, cfg)
        for group in self.optim.param_groups:
            group["lr"] = lr
        micro_batches = micro_batches_at(
            step, self.data, cfg, self.pad_id, acc.device, acc.process_index, world, collate=self.backend.collate
        )
        samples = sum(len(b["input_ids"]) for b in micro_batches) * world
        loss = optimizer_step(
            self.model,
            self.shared,
            micro_batches,
            self.optim,
            self.scaler,
            self.autocast,
            cfg.max_grad_norm,
            no_sync=lambda: acc.no_sync(self.shared),
            backend=self.backend,
        )
        # The mean over ranks (float64: one process keeps its loss bit for bit); every rank checks the same value.
        loss = acc.reduce(torch.tensor(loss, dtype=torch.float64, device=acc.device), "mean").item()
        return Step(loss, lr, samples)
