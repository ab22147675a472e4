"""ptune on one CUDA GPU, one command: training and evaluation speed on a ChatGLM-6B-shaped base, as one table.

    python bench/gpu_suite.py              # one CUDA GPU with bitsandbytes; about 6-8 minutes on an H100 or H200
    python bench/gpu_suite.py --dry-run    # tiny shapes on the CPU in fp32: checks the script (the test suite runs it)

It measures what the pipeline runs, through ptune's own code: a random base shaped like ChatGLM-6B (28 layers,
hidden 4096, vocabulary 130,528; no real weights, no network) is saved as a model directory, then
- training: `ptune train`'s loop body (the native backend's load_for_training, micro_batches_at, optimizer_step) at
  batch 16 x 128 tokens (64 + 64), pre_seq_len 128, AdamW at the reference's 2e-2, with the base in bf16, 4-bit and
  8-bit (bitsandbytes): samples/s, peak GPU memory and the loss over a short real training on data the prefix can
  learn (answers drawn from 256 tokens), which must fall. The same bf16 base also runs a plain loop (the model's
  logits at every position and the usual shifted cross-entropy), for the ratio;
- evaluation: `ptune evaluate`'s generation (load_for_inference, then generate_all: length-sorted, left-padded
  batches, the reference's sampling top_p 0.7, temperature 0.95) of 1,070 synthetic prompts of 30-70 tokens, 64 new
  tokens each (the end token lies outside the vocabulary, so every row generates all 64; the script counts them), for
  the base and the P-tuned model (the bf16 run's prefix, 128), at the batch sizes fixed below; the ratio is against
  one prompt per generate (the reference's loop) on a few prompts, extrapolated to 1,070; and whether greedy batched
  equals greedy one at a time on a few prompts (on a GPU in bf16 a near-tie may flip: reported, not required).
Each part has a time guard (a loop stops there and its rate is what ran); a part that fails (out of memory, say)
prints its error in the table and the rest still run. Prints one table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: everything loads from the directory written here

from ptune.state.determinism import configure_threads  # noqa: E402

THREADS = configure_threads()  # before torch starts its thread pools, as a stage does

import torch  # noqa: E402
import yaml  # noqa: E402

from ptune.compute.evaluation import Unattended, generate_all  # noqa: E402
from ptune.compute.training import DTYPES, lr_at, micro_batches_at, optimizer_step  # noqa: E402
from ptune.config import GenerationConfig, TrainConfig  # noqa: E402
from ptune.model.backends import native  # noqa: E402
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for  # noqa: E402
from ptune.model.prefixed import forward as prefixed_forward  # noqa: E402
from ptune.state.multiprocess import local_device  # noqa: E402

OUT = REPO / "bench" / "results" / "gpu_suite.json"
BUDGET_S = 480  # the issue's 8 minutes on one H100 or H200
# (samples/s at least, seconds for the 1,070 prompts at most), by the GPU's name.
GOALS = {"H200": (110.0, 15.0), "H100": (100.0, 20.0)}
# ChatGLM-6B's shape as a transformers GLM: 28 layers, hidden 4096, 32 heads, vocabulary 130,528, an untied output
# layer. Its FFN is 4096 -> 16,384 -> 4096 with GELU (two matrices); GLM's is gated (three), so 10,923 gives the same
# parameters and FLOPs: 6.7 B parameters, as ChatGLM-6B with this vocabulary. (bench/eval_speed.py and train_speed.py's
# --chatglm-shape use a gated 16,384: 8.6 B parameters, about 1.3 times the work.)
CHATGLM_6B = {
    "vocab_size": 130528,
    "hidden_size": 4096,
    "intermediate_size": 10923,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 2048,
}
TINY = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 512,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything fixed in advance: shapes, step counts, batch sizes, and each part's time guard (seconds)."""

    shape: dict
    pre_seq_len: int = 128
    batch: int = 16
    source_len: int = 64
    target_len: int = 64
    answer_vocab: int = 256  # answers drawn from this many tokens: something a prefix can learn on random weights
    train_rows: int = 256
    train_steps: int = 24
    warmup_steps: int = 2  # untimed, at the start of each run
    plain_steps: int = 10
    n_prompts: int = 1070  # ADGEN's dev set
    prompt_len: tuple[int, int] = (30, 70)  # ADGEN prompts with ChatGLM's tokenizer
    new_tokens: int = 64  # the reference's max_target_length
    eval_batches: tuple[int, ...] = (256, 535)  # 535: the 1,070 prompts in two batches
    one_at_a_time: int = 4  # prompts for the reference's loop
    greedy_check: int = 4
    guard_train_s: float = 40.0
    guard_plain_s: float = 15.0
    guard_eval_s: float = 40.0
    guard_loop_s: float = 15.0


FULL = Plan(shape=CHATGLM_6B)
DRY = Plan(
    shape=TINY,
    pre_seq_len=8,
    batch=4,
    source_len=16,
    target_len=16,
    answer_vocab=16,
    train_rows=32,
    train_steps=20,
    warmup_steps=1,
    plain_steps=3,
    n_prompts=24,
    new_tokens=8,
    eval_batches=(8, 12),
    one_at_a_time=2,
    greedy_check=4,
    guard_train_s=20.0,
    guard_plain_s=10.0,
    guard_eval_s=20.0,
    guard_loop_s=10.0,
)


class Guard(Exception):
    """A part's time guard was reached."""


SUITE_END = [float("inf")]  # main sets it: every loop also stops there, so that the whole suite keeps to BUDGET_S


def deadline(guard_s: float) -> float:
    """When a loop stops: after its part's guard, or at the suite's end, whichever comes first (it always runs its
    warm-up and one timed step, or one batch)."""
    return min(time.perf_counter() + guard_s, SUITE_END[0])


class IdTokenizer:
    """What generation needs of a tokenizer on random weights: pad and end ids, and a decode (to id strings). The end
    id lies outside the vocabulary, so no row ends early; decode records how many tokens each batch generated."""

    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.eos_token_id = vocab_size
        self.widths: list[int] = []

    def batch_decode(self, rows, skip_special_tokens=True):
        self.widths.append(rows.shape[1])
        return [" ".join(map(str, r.tolist())) for r in rows]


class Rows:
    """Training rows as datasets.Dataset serves them to micro_batches_at (`rows[indices]` -> columns); datasets
    itself is not on the GPU image."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: list[int]) -> dict:
        return {"input_ids": [self.input_ids[i] for i in idx], "labels": [self.labels[i] for i in idx]}


def synthetic_data(plan: Plan, seed: int) -> tuple[Rows, list[list[int]]]:
    """Training rows (a random prompt, an answer from `answer_vocab` tokens) and evaluation prompts of 30-70 tokens."""
    gen = torch.Generator().manual_seed(seed)
    top = min(plan.shape["vocab_size"], 130000)
    ids, labels = [], []
    for _ in range(plan.train_rows):
        prompt = torch.randint(5, top, (plan.source_len,), generator=gen).tolist()
        answer = torch.randint(5, 5 + plan.answer_vocab, (plan.target_len,), generator=gen).tolist()
        ids.append(prompt + answer)
        labels.append([-100] * plan.source_len + answer)
    low, high = plan.prompt_len
    lengths = torch.randint(low, high + 1, (plan.n_prompts,), generator=gen).tolist()
    prompts = [torch.randint(5, top, (n,), generator=gen).tolist() for n in lengths]
    return Rows(ids, labels), prompts


def build_base(directory: Path, prefix_dir: Path, plan: Plan, dev: torch.device, dtype: torch.dtype) -> int:
    """A random GLM of the plan's shape saved as a model directory (what fetch_weights leaves in models/base), and an
    untrained prefix beside it (the bf16 training replaces it with its own); returns the parameter count."""
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(**plan.shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with dev:  # initialised where it will run: seconds on a GPU for 6.7 B parameters
            model = GlmForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory)
    PrefixEncoder(prefix_config_for(model, plan.pre_seq_len, False, 0, str(directory))).save(prefix_dir)
    return sum(p.numel() for p in model.parameters())


def train_config(plan: Plan, precision: str, quantization: str) -> TrainConfig:
    """params.yaml's train section (read as it stands, without the schema: jsonschema is not on the GPU image) with
    the reference recipe's values (pre_seq_len 128, lr 2e-2 decaying over 3,000 steps, no projection) and this
    run's; the suite runs the first steps of that schedule."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["train"]
    return dataclasses.replace(
        TrainConfig(**raw),
        seed=7,
        pre_seq_len=plan.pre_seq_len,
        prefix_projection=False,
        prefix_dropout=0.0,
        max_steps=3000,
        per_device_train_batch_size=plan.batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-2,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        precision=precision,
        quantization=quantization,
        devices=1,
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def loss_trend(losses: list[float]) -> dict:
    k = min(3, max(1, len(losses) // 2))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"loss_first": round(first, 4), "loss_last": round(last, 4), "loss_falls": last < first}


def train_run(model_dir: Path, prefix_dir: Path, rows: Rows, plan: Plan, dev, precision: str, quantization: str):
    """`ptune train`'s loop body on the saved base: load_for_training, then micro_batches_at + optimizer_step."""
    backend = native()
    cfg = train_config(plan, precision, quantization)
    dtype = DTYPES[precision]
    backend.check_quantization(quantization, "train", dev)
    t0 = time.perf_counter()
    # As train.run: the base in the compute dtype on a GPU; on the CPU fp32 under autocast.
    model, encoder = backend.load_for_training(model_dir, dev, dtype if dev.type == "cuda" else torch.float32, cfg)
    sync(dev)
    load_s = time.perf_counter() - t0
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    autocast = torch.autocast(dev.type, dtype=dtype) if precision != "fp32" else contextlib.nullcontext()
    pad_id = model.config.pad_token_id or 0
    encoder.train()
    reset_peak(dev)
    losses, end, t_timed, guard = [], deadline(plan.guard_train_s), None, False
    for step in range(plan.train_steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        batches = micro_batches_at(step, rows, cfg, pad_id, dev, collate=backend.collate)
        losses.append(
            optimizer_step(model, encoder, batches, optim, None, autocast, cfg.max_grad_norm, backend=backend)
        )
        if step + 1 == plan.warmup_steps:
            sync(dev)
            t_timed = time.perf_counter()
        if time.perf_counter() > end and step + 1 > plan.warmup_steps:
            guard = True
            break
    sync(dev)
    timed = len(losses) - plan.warmup_steps
    wall = time.perf_counter() - t_timed
    row = {
        "samples_per_s": round(timed * plan.batch / wall, 2),
        "s_per_step": round(wall / timed, 4),
        "steps": len(losses),
        "timed_steps": timed,
        "peak_gib": peak_gib(dev),
        "load_s": round(load_s, 1),
        "guard_hit": guard,
        **loss_trend(losses),
        "losses": [round(x, 4) for x in losses],
    }
    if quantization == "none":
        backend.save_prefix(model, encoder, prefix_dir, model_dir)  # evaluation's P-tuned model: this trained prefix
        row["plain"] = plain_run(model, encoder, rows, plan, dev, precision)
    return row


def plain_run(model, encoder, rows: Rows, plan: Plan, dev, precision: str) -> dict:
    """The baseline: the same prefix, batches and AdamW, but the model's logits at every position and the usual
    shifted cross-entropy (what the model's own loss computes), not ptune's logits only where a target follows."""
    cfg = train_config(plan, precision, "none")
    dtype = DTYPES[precision]
    autocast = torch.autocast(dev.type, dtype=dtype) if precision != "fp32" else contextlib.nullcontext()
    optim = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate)
    reset_peak(dev)
    end, t_timed, done, guard = deadline(plan.guard_plain_s), None, 0, False
    for step in range(plan.plain_steps):
        batch = micro_batches_at(step, rows, cfg, model.config.pad_token_id or 0, dev, collate=native().collate)[0]
        with autocast:
            logits = prefixed_forward(model, encoder, batch["input_ids"], batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.max_grad_norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
        loss.item()  # as optimizer_step: the loss is read every step
        done += 1
        if done == plan.warmup_steps:
            sync(dev)
            t_timed = time.perf_counter()
        if time.perf_counter() > end and done > plan.warmup_steps:
            guard = True
            break
    sync(dev)
    wall = time.perf_counter() - t_timed
    timed = done - plan.warmup_steps
    return {
        "samples_per_s": round(timed * plan.batch / wall, 2),
        "s_per_step": round(wall / timed, 4),
        "timed_steps": timed,
        "peak_gib": peak_gib(dev),
        "guard_hit": guard,
    }


def generate_timed(model, encoder, tok, prompts, cfg, batch_size: int, dev, guard_s: float) -> dict:
    """ptune evaluate's generate_all over `prompts`, timed; stops after the batch that passes the guard."""
    end = deadline(guard_s)
    done = {"examples": 0}

    class Guarded(Unattended):
        def progress(self, batches: int, examples: int) -> None:
            done["examples"] = examples
            if time.perf_counter() > end and examples < len(prompts):
                raise Guard

    tok.widths.clear()
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    with contextlib.suppress(Guard):
        generate_all(model, encoder, tok, prompts, cfg, batch_size, 11, f"batch {batch_size}", native(), run=Guarded())
    sync(dev)
    wall = time.perf_counter() - t0
    n = done["examples"]
    return {
        "batch_size": batch_size,
        "prompts": n,
        "wall_s": round(wall, 2),
        "examples_per_s": round(n / wall, 3),
        "peak_gib": peak_gib(dev),
        "new_tokens_per_row": min(tok.widths) if tok.widths else 0,
        "guard_hit": n < len(prompts),
    }


def eval_runs(model_dir: Path, prefix_dir: Path, prompts, plan: Plan, dev) -> dict:
    """`ptune evaluate`'s load and generation: the base alone and P-tuned, at each fixed batch size, then the
    reference's loop (one prompt per generate) on a few prompts, and greedy batched vs one at a time."""
    backend = native()
    dev = local_device() if dev.type == "cuda" else dev  # what ptune evaluate passes (cuda:0; train has "cuda")
    t0 = time.perf_counter()
    model, encoder = backend.load_for_inference(model_dir, prefix_dir, dev)  # in the dtype ptune evaluate gets
    sync(dev)
    out = {"load_s": round(time.perf_counter() - t0, 1), "dtype": str(model.dtype).removeprefix("torch."), "rows": []}
    out["attention"] = getattr(model.config, "_attn_implementation", None)
    tok = IdTokenizer(plan.shape["vocab_size"])
    sampling = GenerationConfig(max_new_tokens=plan.new_tokens, do_sample=True, top_p=0.7, temperature=0.95)
    # Prompts spread over the lengths, for the loop.
    sample = [prompts[i] for i in range(0, len(prompts), max(1, len(prompts) // plan.one_at_a_time))]
    sample = sample[: plan.one_at_a_time]
    for name, enc in (("base", None), ("ptuned", encoder)):
        generate_all(model, enc, tok, prompts[:2], sampling, 2, seed=0, desc="warm-up", backend=backend)
        for batch_size in plan.eval_batches:
            row = _part(generate_timed, model, enc, tok, prompts, sampling, batch_size, dev, plan.guard_eval_s)
            out["rows"].append({"model": name, "batch_size": batch_size, **row})
        loop = _part(generate_timed, model, enc, tok, sample, sampling, 1, dev, plan.guard_loop_s)
        out["rows"].append({"model": name, "batch_size": 1, "one_at_a_time": True, **loop})
    out["greedy_check"] = _part(greedy_check, model, encoder, tok, prompts[: plan.greedy_check], sampling)
    return out


def greedy_check(model, encoder, tok, prompts, sampling: GenerationConfig) -> dict:
    """How many prompts get the same greedy answer in one batch as alone (P-tuned): all of them on the CPU."""
    greedy = dataclasses.replace(sampling, do_sample=False)
    batched = generate_all(model, encoder, tok, prompts, greedy, len(prompts), 0, "greedy, batched", native())
    alone = generate_all(model, encoder, tok, prompts, greedy, 1, 0, "greedy, one at a time", native())
    return {"prompts": len(prompts), "identical": sum(a == b for a, b in zip(batched, alone))}


def _part(fn, *args) -> dict:
    """One part of the suite; an error (out of GPU memory, say) becomes its row, and the rest still run."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def describe(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"name": f"CPU ({THREADS} threads)", "capability": None, "memory_gib": None}
    return {
        "name": torch.cuda.get_device_name(dev),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(dev)),
        "memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1),
    }


def versions() -> dict:
    import transformers

    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb,
    }


def missing(dry_run: bool, without_bnb: bool) -> str | None:
    """What this machine lacks for the full suite, said at once (before minutes of building)."""
    if dry_run:
        return None
    if not torch.cuda.is_available():
        return (
            f"no CUDA GPU: torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU build'}) sees "
            "none. Run on one CUDA GPU, or `python bench/gpu_suite.py --dry-run` to check the script on the CPU"
        )
    if not without_bnb and importlib.util.find_spec("bitsandbytes") is None:
        return (
            "bitsandbytes is not installed: the 4-bit and 8-bit rows need it (`pip install -e '.[quantization]'`, or "
            "carry its wheel: bench/README.md). `--without-bitsandbytes` runs the rest"
        )
    return None


def goals_for(device: str) -> tuple[float, float] | None:
    return next((g for key, g in GOALS.items() if key in device), None)


def fmt(value, spec: str = "", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def table(result: dict) -> str:
    """The one table (markdown, to paste into bench/README.md)."""
    plan, dev = result["plan"], result["device"]
    goals = goals_for(dev["name"])
    v = result["versions"]
    lines = [
        f"ptune GPU suite{' (DRY RUN: tiny shapes on the CPU, no figures)' if result['dry_run'] else ''}, "
        f"{result['date']}: {dev['name']}; torch {v['torch']}, transformers {v['transformers']}, bitsandbytes "
        f"{v['bitsandbytes'] or 'not installed'}",
        f"base: random weights, {plan['shape']['num_hidden_layers']} layers x {plan['shape']['hidden_size']}, "
        f"vocabulary {plan['shape']['vocab_size']:,} ({result['base_parameters']:,} parameters), saved as a model "
        "directory and loaded by ptune",
        "",
        f"Training: `ptune train`'s step, batch {plan['batch']} x {plan['source_len'] + plan['target_len']} tokens "
        f"({plan['source_len']} + {plan['target_len']}), pre_seq_len {plan['pre_seq_len']}, AdamW lr 2e-2; "
        f"{plan['train_steps']} steps, the first {plan['warmup_steps']} untimed",
        "",
        "| run | base | samples/s | s/step | peak GiB | load s | loss first → last | falls | vs plain | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["train"]:
        label = {"bf16": "bf16", "4bit": "4-bit NF4", "8bit": "8-bit LLM.int8"}[row["base"]]
        if "skipped" in row or "error" in row:
            lines.append(f"| ptune | {label} | {row.get('skipped') or row['error']} | | | | | | | |")
            continue
        plain = row.get("plain") or {}
        ratio = (
            f"{row['samples_per_s'] / plain['samples_per_s']:.2f}×"
            if plain.get("samples_per_s")
            else plain.get("error")
        )
        goal = "–"
        if goals and row["base"] == "bf16":
            goal = f"≥ {goals[0]:.0f}: {'met' if row['samples_per_s'] >= goals[0] else 'not met'}"
        lines.append(
            f"| ptune | {label} | {row['samples_per_s']:.1f}{' (guard)' if row['guard_hit'] else ''} | "
            f"{row['s_per_step']:.3f} | {fmt(row['peak_gib'])} | {row['load_s']:.1f} | "
            f"{row['loss_first']:.2f} → {row['loss_last']:.2f} | {'yes' if row['loss_falls'] else 'NO'} | "
            f"{fmt(ratio)} | {goal} |"
        )
        if plain.get("samples_per_s"):
            lines.append(
                f"| plain loop | {label} | {plain['samples_per_s']:.1f} | {plain['s_per_step']:.3f} | "
                f"{fmt(plain['peak_gib'])} | | | | 1.00× | |"
            )
    ev = result["eval"]
    n = plan["n_prompts"]
    lines += [
        "",
        f"Evaluation: `ptune evaluate`'s generation, {n:,} prompts of {plan['prompt_len'][0]}-{plan['prompt_len'][1]} "
        f"tokens, {plan['new_tokens']} new tokens each, top_p 0.7, temperature 0.95; base loaded in "
        f"{ev.get('dtype', '?')} (attention: {ev.get('attention')})",
        "",
        f"| model | batch | {n:,} prompts, wall s | examples/s | peak GiB | new tokens/row | vs one at a time | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    loops = {r["model"]: r for r in ev.get("rows", []) if r.get("one_at_a_time")}
    for row in ev.get("rows", []):
        name = {"base": "base", "ptuned": f"P-tuned (prefix {plan['pre_seq_len']})"}[row["model"]]
        if "error" in row:
            lines.append(f"| {name} | {row.get('batch_size', '')} | {row['error']} | | | | | |")
            continue
        rate = row["examples_per_s"]
        full_s = n / rate if rate else None
        if row.get("one_at_a_time"):
            lines.append(
                f"| {name}, one prompt per generate | 1 | ~{fmt(full_s, '.1f')} (from {row['prompts']} prompts) | "
                f"{rate:.3f} | {fmt(row['peak_gib'])} | {row['new_tokens_per_row']} | 1.00× | |"
            )
            continue
        loop = loops.get(row["model"], {})
        ratio = f"{rate / loop['examples_per_s']:.1f}×" if loop.get("examples_per_s") else "–"
        wall = f"~{full_s:.1f} (guard, {row['prompts']} done)" if row["guard_hit"] else f"{row['wall_s']:.1f}"
        goal = f"≤ {goals[1]:.0f} s: {'met' if full_s <= goals[1] else 'not met'}" if goals else "–"
        lines.append(
            f"| {name} | {row['batch_size']} | {wall} | {rate:.1f} | {fmt(row['peak_gib'])} | "
            f"{row['new_tokens_per_row']} | {ratio} | {goal} |"
        )
    check = ev.get("greedy_check")
    if check:
        same = (
            f"{check['identical']} of {check['prompts']} prompts identical" if "error" not in check else check["error"]
        )
        lines.append(f"\nGreedy, P-tuned, batched vs one at a time: {same}")
    if "error" in ev:
        lines.append(f"\nEvaluation failed: {ev['error']}")
    lines.append(
        f"Total {result['total_s']:.0f} s (build {result['build_s']:.0f} s), budget {BUDGET_S} s: "
        f"{'within' if result['total_s'] <= BUDGET_S else 'OVER'}"
        + ("" if goals else f"; goals are set for an H200 or H100, not judged on {dev['name']}")
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, fp32: checks the script")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the JSON (default {OUT.relative_to(REPO)})")
    ap.add_argument("--workdir", type=Path, help="where the random base is saved (default: a temporary directory)")
    ap.add_argument("--without-bitsandbytes", action="store_true", help="skip the 4-bit and 8-bit rows")
    args = ap.parse_args()
    why = missing(args.dry_run, args.without_bitsandbytes)
    if why:
        print(f"gpu_suite: {why}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    SUITE_END[0] = t_start + BUDGET_S - 30  # 30 s for the greedy check, freeing memory and the table
    plan = DRY if args.dry_run else FULL
    dev = torch.device("cpu" if args.dry_run else "cuda")
    device = describe(dev)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptune-gpu-suite-"))
    model_dir, prefix_dir = work / "base", work / "prefix"
    try:
        params = build_base(model_dir, prefix_dir, plan, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the built model is gone; each part loads the saved one, as the stages do
        rows, prompts = synthetic_data(plan, seed=0)
        build_s = time.perf_counter() - t_start
        print(f"built and saved the random base ({params:,} parameters) in {build_s:.0f} s", flush=True)
        train = []
        for precision, quantization in (("bf16", "none"), ("bf16", "4bit"), ("bf16", "8bit")):
            row = {"base": "bf16" if quantization == "none" else quantization, "precision": precision}
            if quantization != "none" and (args.dry_run or args.without_bitsandbytes):
                why = "dry run: bitsandbytes needs a CUDA GPU" if args.dry_run else "--without-bitsandbytes"
                train.append({**row, "skipped": f"skipped ({why})"})
                continue
            train.append({**row, **_part(train_run, model_dir, prefix_dir, rows, plan, dev, precision, quantization)})
            print(f"trained: {train[-1]['base']} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        ev = _part(eval_runs, model_dir, prefix_dir, prompts, plan, dev)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "suite": "bench/gpu_suite.py" + (" --dry-run" if args.dry_run else ""),
        "dry_run": args.dry_run,
        "date": datetime.date.today().isoformat(),
        "device": device,
        "versions": versions(),
        "plan": dataclasses.asdict(plan),
        "base_parameters": params,
        "goals": {"gpu": next((k for k in GOALS if k in device["name"]), None), "by_gpu": GOALS},
        "build_s": round(build_s, 1),
        "train": train,
        "eval": ev,
        "total_s": round(time.perf_counter() - t_start, 1),
        "budget_s": BUDGET_S,
    }
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"JSON: {args.out}")
    failed = [r for r in train if "error" in r] + [r for r in ev.get("rows", []) if "error" in r]
    return 1 if failed or "error" in ev else 0


if __name__ == "__main__":
    sys.exit(main())
