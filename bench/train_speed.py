"""Training throughput of ptune's P-tuning v2 loop, side by side with transformers.Trainer + PEFT prefix tuning.

    python bench/train_speed.py                  # the embedded model and data: ptune vs Trainer + PEFT, and the ratio
    python bench/train_speed.py --chatglm-shape  # ptune only: random ChatGLM-6B-shaped base, bf16 (a GPU)

The default mode needs models/base and data/processed (`make report`, or `dvc repro preprocess`) and reads the
`train` section of params.yaml. Both sides train the same prefix (pre_seq_len, projection) on the same frozen
base, on the same batches in the same order, with the same optimizer settings, in the same process and thread
count; rounds alternate between them. samples/s counts the steps after a warm-up, including reading and padding
each batch. The baseline is a plain `transformers.Trainer` over a PEFT `PrefixTuningConfig` model: on
transformers v5 PEFT's prefix still trains (its `past_key_values=` is accepted by `forward`, with a deprecation
warning), it is only at generation that v5 ignores it, which this benchmark does not do.

`--chatglm-shape` is the reference recipe: pre_seq_len 128, source + target length 64 + 64, effective batch 16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "bench"))

from ptune.state.determinism import configure_threads  # noqa: E402

THREADS = configure_threads()  # before torch starts its thread pools: the thread count `ptune train` uses

import torch  # noqa: E402

from ptune.compute.training import batch_indices, lr_at, micro_batches_at, optimizer_step  # noqa: E402
from ptune.model.backends import native  # noqa: E402
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for  # noqa: E402


def ptune_round(train, cfg, steps: int, warmup: int) -> tuple[float, float]:
    """ptune's loop body (train.run's, minus logging and checkpoints): samples/s after `warmup`, last loss."""
    from ptune.state.determinism import seed_everything

    seed_everything(cfg.seed)
    # The frozen base and the prefix exactly as `ptune train` loads them (fp32 on the CPU).
    model, encoder = native().load_for_training(Path("models/base"), torch.device("cpu"), torch.float32, cfg)
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    encoder.train()
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        batches = micro_batches_at(step, train, cfg, pad_id, torch.device("cpu"), collate=native().collate)
        loss = optimizer_step(
            model, encoder, batches, optim, None, contextlib.nullcontext(), cfg.max_grad_norm, backend=native()
        )
    wall = time.perf_counter() - t0
    return (steps - warmup) * cfg.per_device_train_batch_size / wall, loss


def trainer_round(train, cfg, steps: int, warmup: int) -> tuple[float, float]:
    """A plain transformers.Trainer over a PEFT PrefixTuningConfig model, fed the same batches in the same order;
    its defaults otherwise (the fused AdamW, the linear schedule)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    batch = cfg.per_device_train_batch_size
    # ptune's batches in ptune's order, read in order (train_sampling_strategy "sequential"): the DataLoader
    # fetches each batch with one read, as it does from any datasets.Dataset.
    order = [i for k in range(steps + 1) for i in batch_indices(k, len(train), batch, cfg.seed)]
    same_batches = train.select(order)

    class Clock(TrainerCallback):
        def __init__(self):
            self.at: dict[int, float] = {}
            self.loss = float("nan")

        def on_step_end(self, args, state, control, **kwargs):
            self.at[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.loss = (logs or {}).get("loss", self.loss)

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.float32)
    pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    model = get_peft_model(
        base,
        PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.pre_seq_len,
            prefix_projection=cfg.prefix_projection,
            encoder_hidden_size=cfg.prefix_hidden_size,
        ),
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            lr_scheduler_type="linear",
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            seed=cfg.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            train_sampling_strategy="sequential",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=same_batches,
            data_collator=lambda rows: native().collate(rows, pad_id),
            callbacks=[clock],
        )
        trainer.train()
    wall = clock.at[steps] - clock.at[warmup]
    return (steps - warmup) * batch / wall, clock.loss


def compare(args) -> int:
    import logging
    import warnings

    from datasets import load_from_disk

    from ptune import config

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT's past_key_values= on v5, once per step
    if not Path("models/base/config.json").is_file() or not Path("data/processed").is_dir():
        print("models/base and data/processed are missing: run `make report` (or `dvc repro preprocess`) first")
        return 2
    cfg = config.load("params.yaml").train
    if cfg.gradient_accumulation_steps != 1:
        print("this comparison reads one micro-batch per step: set train.gradient_accumulation_steps to 1")
        return 2
    train = load_from_disk("data/processed")["train"]
    steps = args.warmup + args.steps
    cfg = dataclasses.replace(cfg, max_steps=steps)  # both linear schedules decay to 0 over the benchmark's steps
    ours, theirs = [], []
    for r in range(args.rounds):  # alternate, so that a busy moment of the machine does not favour one side
        ours.append(ptune_round(train, cfg, steps, args.warmup))
        theirs.append(trainer_round(train, cfg, steps, args.warmup))
        print(
            f"round {r + 1}: ptune {ours[-1][0]:.1f} samples/s, Trainer + PEFT {theirs[-1][0]:.1f} samples/s",
            flush=True,
        )
    best_ours, best_theirs = max(s for s, _ in ours), max(s for s, _ in theirs)
    print(
        f"CPU, {THREADS} threads; embedded base ({sum(p.numel() for p in _base_params())} params), "
        f"pre_seq_len {cfg.pre_seq_len}, projection {cfg.prefix_projection}, batch "
        f"{cfg.per_device_train_batch_size}; {args.steps} timed steps after {args.warmup}, best of {args.rounds}"
    )
    print(f"ptune loop:                 {best_ours:8.1f} samples/s (last loss {ours[-1][1]:.3f})")
    print(f"transformers.Trainer + PEFT: {best_theirs:7.1f} samples/s (last logged loss {theirs[-1][1]:.3f})")
    print(
        f"ratio ptune / Trainer + PEFT: {best_ours / best_theirs:.2f}x (best of each); per round "
        + ", ".join(f"{o / t:.2f}x" for (o, _), (t, _) in zip(ours, theirs))
        + f", median {statistics.median(o / t for (o, _), (t, _) in zip(ours, theirs)):.2f}x"
    )
    return 0


def _base_params():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained("models/base").parameters()


def chatglm_shape(args) -> int:
    from eval_speed import chatglm_shaped

    model, _, _, _ = chatglm_shaped(0, seed=0, layers=args.layers)
    dev = next(model.parameters()).device
    encoder = PrefixEncoder(prefix_config_for(model, args.pre_seq_len, False, 0, "random")).to(dev)  # fp32
    optim = torch.optim.AdamW(encoder.parameters(), lr=2e-2)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)

    def micro():
        ids = torch.randint(5, 130000, (args.batch_size, args.seq_len), generator=gen).to(dev)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step():
        return optimizer_step(
            model, encoder, [micro() for _ in range(args.accumulation)], optim, None, autocast, 1.0, backend=native()
        )

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    samples = args.steps * args.batch_size * args.accumulation
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(
        f"device: {name}; ChatGLM-6B shape ({args.layers} layers), bf16 base, fp32 prefix {args.pre_seq_len}; "
        f"batch {args.batch_size} x accumulation {args.accumulation}, {args.seq_len} tokens"
    )
    print(f"{wall / args.steps:.3f} s/step, {samples / wall:.1f} samples/s, last loss {loss:.3f}")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chatglm-shape", action="store_true", help="ptune alone on a ChatGLM-6B-shaped base (GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 60, or 10 with --chatglm-shape)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (embedded comparison)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side (embedded comparison)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accumulation", type=int, default=1)
    args = ap.parse_args()
    if args.chatglm_shape:
        args.steps = args.steps or 10
        return chatglm_shape(args)
    args.steps = args.steps or 60
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
