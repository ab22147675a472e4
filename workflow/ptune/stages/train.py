"""Stage train: learn a P-tuning v2 prefix on data/processed/train with the base frozen; save only the prefix.

One loop to read top to bottom: load, (resume), step, log, checkpoint, save. Outputs: models/ptuning/
(prefix.safetensors + prefix_config.json), reports/train_log.csv (step,loss,learning_rate,samples_per_s; rewritten
whole, atomically, at each row, so it can be watched while it grows) and reports/live/train/ (the same rows
through the trackers $PTUNE_TRACKERS names, reporting/live.py). Checkpoints go to .ptune/state/train/<key>/
(outside the declared outputs, which DVC and Snakemake delete before a rerun): a killed run resumes from the last
one and ends with the prefix an uninterrupted run makes. SIGTERM, SIGINT or SIGHUP end the step being computed,
write a checkpoint at it and stop (state/stopping.py): the rerun resumes from that very step. With train.devices > 1
the processes agree after each step whether to stop, so that all of them end the same one (state/multiprocess.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from ..config import Params, TrainConfig
from ..errors import PtuneError
from ..model import backends, device_info
from ..model.loading import assert_frozen, device
from ..paths import BASE, TRAIN_LOG, live
from ..paths import PREFIX as OUT
from ..paths import PROCESSED as DATA
from ..remote import checkpoints
from ..remote.dvc_remote import checkpoint_push_every
from ..reporting import live as live_metrics
from ..state import atomic, checkpoint, faults, multiprocess, stopping
from ..state.determinism import seed_everything
from ..state.resume import ResumeState

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Fields that change neither the data order nor the numbers: editing them keeps checkpoints usable.
NOT_IN_RESUME_KEY = ("logging_steps", "save_steps", "save_total_limit")


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


def _check_precision(cfg: TrainConfig, dev: torch.device) -> None:
    if cfg.precision == "fp16" and dev.type != "cuda":
        raise PtuneError("train.precision: fp16 needs a CUDA GPU (loss scaling runs there); use fp32 or bf16 here")


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


LOG_HEADER = ("step", "loss", "learning_rate", "samples_per_s")


def write_log(rows: list) -> None:
    """reports/train_log.csv with every row so far: the whole file anew, atomically (never appended to: after a DVC
    run it may be a hard link into DVC's cache), so that a reader, or a kill, only ever meets whole rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LOG_HEADER)
    writer.writerows(rows)
    atomic.write_text(TRAIN_LOG, buf.getvalue())


def live_values(row) -> dict[str, float]:
    """One train_log.csv row as the live trackers get it."""
    return {name: float(value) for name, value in zip(LOG_HEADER[1:], row[1:])}


def save_checkpoint(
    state: ResumeState,
    step: int,
    encoder,
    optim,
    scaler,
    rows: list,
    keep: int,
    rng_per_rank: list,
    window_losses: list[float] = (),
) -> None:
    """Everything resuming needs (safetensors, never a pickle; the RNG states of every process); the oldest beyond
    `keep` removed. Called on rank 0 only: the prefix and optimizer are the same on every rank after each step."""
    checkpoint.save_training(
        state.path(f"checkpoint-{step:08d}{CKPT_SUFFIX}"),
        step=step,
        prefix=encoder.state_dict(),
        optimizer=optim.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        log_rows=rows,
        rng_per_rank=rng_per_rank,
        window_losses=window_losses,
    )
    for old in sorted(state.dir.glob(f"checkpoint-*{CKPT_SUFFIX}"))[:-keep]:
        old.unlink()


def latest_checkpoint(state: ResumeState) -> Path | None:
    found = sorted(state.dir.glob(f"checkpoint-*{CKPT_SUFFIX}"))
    return found[-1] if found else None


def _check_context(model, train, cfg: TrainConfig) -> None:
    """The prefix takes positions too: prefix + the longest example must fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, train["input_ids"]), default=0)
    if isinstance(context, int) and cfg.pre_seq_len + longest > context:
        raise PtuneError(
            f"train.pre_seq_len ({cfg.pre_seq_len}) + the longest training example ({longest} tokens, "
            f"see preprocess.max_source_length/max_target_length) exceed the base model's context of "
            f"{context} tokens; lower train.pre_seq_len or the preprocess lengths"
        )


def _agreed_stop(acc, dev: torch.device) -> stopping.Request | None:
    """Several processes: the stop request any of them has got (the highest signal number), so that all of them
    stop after the same step, and none is left waiting in a collective operation for one that has gone."""
    from accelerate.utils import gather_object

    own = stopping.requested()
    signum = int(acc.reduce(torch.tensor(own.signum if own else 0, device=dev), "max").item())
    if not signum:
        return None  # one that came during the reduction counts at the next step, on every rank
    # Once, on stopping: the reason of a process that got that signal, the same in every process's message.
    reasons = gather_object([own.reason if own is not None and own.signum == signum else ""])
    return stopping.note(signum, next(r for r in reasons if r))


def _stop(
    state: ResumeState,
    step: int,
    cfg: TrainConfig,
    encoder,
    optim,
    scaler,
    rows,
    window,
    saved,
    push_every,
    tracker,
    acc,
):
    """Stop on request after `step` (state/stopping.py): a checkpoint at that step (unless the step just wrote
    one), `stopped.json` beside it, the live metrics closed; then raise stopping.Stopped. Several processes: every
    one comes here after the same step; rank 0 writes (and pushes) while the others wait."""
    world = acc.num_processes
    name = state.path(f"checkpoint-{step:08d}{CKPT_SUFFIX}")
    pushed = False
    if world > 1:
        from accelerate.utils import gather_object

        rng = None if saved else gather_object([checkpoint.rng_state()])  # every rank's generators
        log.info("stopping after step %d, as all %d processes agreed", step, world)
    else:
        rng = [checkpoint.rng_state()]
    if acc.is_main_process:
        if not saved:
            save_checkpoint(state, step, encoder, optim, scaler, rows, cfg.save_total_limit, rng, window)
        stopping.record(state.dir, step=step, max_steps=cfg.max_steps, checkpoint=name.name)
        tracker.close()
        # The instance may be going away: send the checkpoint where the next one can find it.
        pushed = bool(push_every) and checkpoints.push_quietly("train")
    if world > 1:
        acc.wait_for_everyone()  # the launcher ends the others once one has exited: not before rank 0 is done
    where = ", pushed to the DVC remote (`ptune restore` brings it to a fresh instance)" if pushed else ""
    processes = f" (all {world} processes)" if world > 1 else ""
    request = stopping.requested()
    raise stopping.Stopped(
        request,
        f"train: stopped ({request.reason}) after step {step} of {cfg.max_steps}{processes}; {name} holds it{where}. "
        "`dvc repro`, `snakemake --cores 1 report` or `ptune train` resumes from that step",
    )


def run(params: Params) -> dict:
    cfg = params.train
    # Checks that need no model come first: a wrong setting fails at once, not after minutes of loading.
    _check_precision(cfg, device())
    backend = backends.for_base(BASE)
    backend.check_quantization(cfg.quantization, "train", device())
    if cfg.devices > 1 and backend.name != backends.TRANSFORMERS:
        raise PtuneError(
            f"train.devices: {cfg.devices} is implemented for transformers-native models; ChatGLM-6B's "
            "prefix lives inside its remote-code model, which ptune trains on one GPU: set "
            "train.devices: 1"
        )
    if cfg.devices > 1 and not multiprocess.in_worker():
        return {**multiprocess.launch("train", params, cfg.devices)[0], "devices": cfg.devices}

    push_every = checkpoint_push_every()  # read first: a bad value should fail before hours of work, not after
    trackers = live_metrics.chosen()  # $PTUNE_TRACKERS, for the same reason
    seed_everything(cfg.seed)  # the same seed on every rank: the prefix (and its dropout) starts equal everywhere
    acc = multiprocess.accelerator()
    dev, world, rank = acc.device, acc.num_processes, acc.process_index
    if world != cfg.devices:
        raise PtuneError(
            f"train.devices is {cfg.devices}, but this process is one of {world}; let `ptune train` "
            "launch the processes itself"
        )
    dtype = DTYPES[cfg.precision]
    # The frozen base in the compute dtype on a GPU (half the memory); on the CPU it stays fp32 under autocast.
    # The prefix, fp32 master weights, is the only trainable module (for chatglm it lives inside the model).
    model, encoder = backend.load_for_training(BASE, dev, dtype if dev.type == "cuda" else torch.float32, cfg)
    total = assert_frozen(model, encoder)
    trainable = sum(p.numel() for p in encoder.parameters())
    log.info(
        "trainable parameters: %d of %d (%.4f%%); base frozen",
        trainable,
        total + trainable,
        100 * trainable / (total + trainable),
    )

    # Here, not at the top: the benchmarks import this module on GPU images without these packages.
    from accelerate.utils import gather_object
    from datasets import load_from_disk

    train = load_from_disk(str(DATA))["train"]
    _check_context(model, train, cfg)
    per_device = cfg.per_device_train_batch_size
    global_batch = per_device * world
    if world > 1 and len(train) < global_batch:
        raise PtuneError(
            f"train.devices: {world} x per_device_train_batch_size {per_device} needs at least "
            f"{global_batch} training examples, {DATA} has {len(train)}; lower one of the two"
        )
    if rank == 0:
        log.info(
            "effective batch: %d per device x %d accumulation x %d device(s) = %d",
            per_device,
            cfg.gradient_accumulation_steps,
            world,
            global_batch * cfg.gradient_accumulation_steps,
        )
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    autocast = torch.autocast(dev.type, dtype=dtype) if cfg.precision != "fp32" else contextlib.nullcontext()

    key_params = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_RESUME_KEY}
    with acc.main_process_first():  # rank 0 removes stale state before the others look
        state = ResumeState("train", [BASE, DATA], key_params)
    start, rows, resumed_window = 0, [], []
    if (ckpt_path := latest_checkpoint(state)) is not None:
        # Onto the CPU: RNG states must be CPU tensors, and load_state_dict moves the rest to the device.
        ckpt = checkpoint.load_training(ckpt_path, rank)  # restores this rank's RNG states too
        encoder.load_state_dict(ckpt["prefix"])
        optim.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start, rows, resumed_window = ckpt["step"], ckpt["log_rows"], ckpt["window_losses"]
        log.info("resuming from %s: step %d of %d", ckpt_path, start, cfg.max_steps)
    acc.wait_for_everyone()  # every rank has read the checkpoint before rank 0 may write (and prune) the next

    # One process: the encoder itself. Several: a DDP wrapper that averages the prefix's gradients.
    shared = acc.prepare_model(encoder)
    shared.train()
    t_start = time.perf_counter()
    t_log, samples_since, window_losses, saved = t_start, 0, list(resumed_window), 0
    tracker = None
    if acc.is_main_process:
        # The curve so far (the checkpoint's rows), then each new row as it is made: no step twice after a resume.
        write_log(rows)
        tracker = live_metrics.Live(live("train"), ((r[0], live_values(r)) for r in rows), trackers)
    quiet = {"disable": True} if rank != 0 else {}  # one progress bar, rank 0's
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc="train prefix",
        unit="step",
        mininterval=2,
        **quiet,
    )
    # From here a stop request ends the step being computed and is saved (state/stopping.py); before, while
    # loading, there is nothing to save and it stops at once.
    with stopping.deferred():
        for step in bar:
            lr = lr_at(step, cfg)
            for group in optim.param_groups:
                group["lr"] = lr
            micro_batches = micro_batches_at(step, train, cfg, pad_id, dev, rank, world, collate=backend.collate)
            samples_since += sum(len(b["input_ids"]) for b in micro_batches) * world
            step_loss = optimizer_step(
                model,
                shared,
                micro_batches,
                optim,
                scaler,
                autocast,
                cfg.max_grad_norm,
                no_sync=lambda: acc.no_sync(shared),
                backend=backend,
            )
            # The mean over ranks (float64: one process keeps its loss bit for bit); every rank checks the same value.
            step_loss = acc.reduce(torch.tensor(step_loss, dtype=torch.float64, device=dev), "mean").item()
            if not math.isfinite(step_loss) or step_loss == 0.0:
                hint = (
                    " fp16 overflows here: use bf16 (or fp32)"
                    if cfg.precision == "fp16"
                    else " lower train.learning_rate or check the data"
                )
                raise PtuneError(
                    f"train: the loss is {step_loss} at step {step + 1};{hint}. Nothing was saved "
                    f"to {OUT}; checkpoints before this step are kept in {state.dir}"
                )
            window_losses.append(step_loss)
            faults.point("step")
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps:
                elapsed = time.perf_counter() - t_log
                # loss: the mean over the steps since the last row. samples/s is the one column that varies
                # between reruns; reports compare the others.
                mean_loss = sum(window_losses) / len(window_losses)
                rows.append((step + 1, round(mean_loss, 6), f"{lr:.6g}", round(samples_since / max(elapsed, 1e-9), 2)))
                t_log, samples_since, window_losses = time.perf_counter(), 0, []
                if acc.is_main_process:
                    write_log(rows)
                    tracker.log(step + 1, live_values(rows[-1]))
            periodic = (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps
            if periodic:
                rng = gather_object([checkpoint.rng_state()])  # every rank's generators (one CUDA generator per GPU)
                if acc.is_main_process:
                    save_checkpoint(
                        state, step + 1, encoder, optim, scaler, rows, cfg.save_total_limit, rng, window_losses
                    )
                    faults.point("checkpoint")
                    saved += 1
                    if (
                        push_every and saved % push_every == 0
                    ):  # so that a fresh instance can resume (docs/surviving.md)
                        checkpoints.push_quietly("train")
            # SIGTERM, SIGINT or SIGHUP during this step (to this process, or, with several, to any of them)
            if (stopping.requested() if world == 1 else _agreed_stop(acc, dev)) is not None:
                _stop(
                    state,
                    step + 1,
                    cfg,
                    encoder,
                    optim,
                    scaler,
                    rows,
                    window_losses,
                    periodic,
                    push_every,
                    tracker,
                    acc,
                )

        train_s = time.perf_counter() - t_start

        # A request that comes while the outputs are written lets them finish: the stage then ends complete.
        if acc.is_main_process:
            with atomic.atomic_dir(OUT) as tmp:
                backend.save_prefix(model, encoder, tmp, BASE)
            write_log(rows)
            tracker.close()
            state.finish()
        acc.wait_for_everyone()
    if stopping.requested() is not None:
        log.warning("a stop was requested while the outputs were written; they are complete, so train finished")
    # Every micro-batch holds batch_size rows (or the whole set when it is smaller): see batch_indices.
    per_step = cfg.gradient_accumulation_steps * min(per_device, len(train)) * world
    return {
        "trainable_parameters": trainable,
        "total_parameters": total + trainable,
        "resumed_from_step": start,
        "precision": cfg.precision,
        "quantization": cfg.quantization,
        "device": str(dev),
        "backend": backend.name,
        "transformers": transformers.__version__,
        "device_name": device_info.device_name(dev),
        "effective_batch": global_batch * cfg.gradient_accumulation_steps,
        "steps": cfg.max_steps,
        "samples_seen": cfg.max_steps * per_step,
        # Speed of the steps this process ran (a resumed run did not time the ones before it).
        "train_s": round(train_s, 3),
        "samples_per_s": round((cfg.max_steps - start) * per_step / max(train_s, 1e-9), 2),
        **device_info.peak_memory(dev),
    }
