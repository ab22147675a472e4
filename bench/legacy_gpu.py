"""ChatGLM-6B's P-tuning v2 training step, through its own remote code, on one CUDA GPU: step time and peak memory.

    python bench/legacy_gpu.py                # full size (28 layers, hidden 4096), fp16 then INT4, random weights
    python bench/legacy_gpu.py --dry-run      # a 2-layer model on the CPU in fp32, 2 x 2 short micro-batches:
                                              # checks this script (every code path but CUDA), no figures

What it measures is the step `ptune train` runs for the chatglm backend and the chatglm6b-v100 preset: the base
frozen (fp16, or INT4 through the model's own quantize()), its built-in prefix (pre_seq_len 128, fp32) trained with
AdamW under fp16 autocast and loss scaling, one optimizer step = batch 1 x 16 accumulated micro-batches of 64 + 64
tokens; each configuration also with the reference's gradient checkpointing (`--checkpointing off` to skip it).
The tutorial's figures to compare with: about 4 h for 3,000 steps on a V100 with INT4 (4.8 s/step), and at least
6.7 GB of GPU memory with INT4 and gradient checkpointing.

Self-contained: it imports the remote code (configuration_chatglm.py, modeling_chatglm.py, quantization.py) from the
snapshot directory (--snapshot, default ../shared/chatglm-6b-snapshot, or ./shared/chatglm-6b-snapshot) and builds
the model from its class with random weights, so neither the tokenizer nor from_pretrained (the parts that fail on
transformers 5) nor the weights are needed. Requirements:
  - torch with CUDA, and transformers 4.27-4.33 or 5.x (--dry-run checked on 4.33.3, 5.17.0 and 5.24.0);
  - for INT4, `cpm_kernels` (pure Python: `pip install cpm_kernels`, or copy its wheel) and the CUDA runtime library
    where cpm_kernels looks (/usr/local/cuda/lib64/libcudart.so, or on the linker's path; this script also tries
    the nvidia-cuda-runtime wheel that a pip CUDA torch brings). cpm_kernels imports pkg_resources (setuptools < 81).
The INT4 kernels in quantization.py are cubins for sm_61 to sm_86 only: on a GPU of compute capability 9 or more
(H100, H200) they cannot load, and INT4 runs with a stand-in written in torch (same packed int4 storage, so the same
memory; different kernels, so the time is only indicative). The output says which ran.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = (REPO.parent / "shared" / "chatglm-6b-snapshot", REPO / "shared" / "chatglm-6b-snapshot")
PACKAGE = "chatglm6b_remote"
# A 2-layer model for --dry-run; token ids moved into its small vocabulary.
DRY_SHAPE = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "inner_hidden_size": 256,
    "vocab_size": 1000,
    "mask_token_id": 1,
    "gmask_token_id": 2,
    "pad_token_id": 3,
    "bos_token_id": 4,
    "eos_token_id": 5,
}


def import_remote_code(snapshot: Path):
    """The snapshot's files as a package (their relative imports need one), without transformers' module cache."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(snapshot)]
    sys.modules[PACKAGE] = package
    return (
        importlib.import_module(f"{PACKAGE}.configuration_chatglm"),
        importlib.import_module(f"{PACKAGE}.modeling_chatglm"),
    )


def cuda_runtime_for_cpm_kernels() -> str | None:
    """cpm_kernels finds libcudart.so only in $CUDA_PATH/lib64, /usr/local/cuda/lib64 or through the linker; a pip
    CUDA torch brings it as nvidia/cu*/lib/libcudart.so.N. Point CUDA_PATH at a directory that names it so."""
    if os.path.exists("/usr/local/cuda/lib64/libcudart.so"):
        return "/usr/local/cuda/lib64/libcudart.so"
    found = sorted(p for path in sys.path for p in glob.glob(f"{path}/nvidia/**/libcudart.so*", recursive=True))
    if not found:
        return None
    lib64 = Path(tempfile.mkdtemp(prefix="cudart-")) / "lib64"
    lib64.mkdir()
    (lib64 / "libcudart.so").symlink_to(found[-1])
    os.environ["CUDA_PATH"] = str(lib64.parent)
    ctypes.CDLL(found[-1])
    return found[-1]


def torch_int4_stand_in(quantization) -> None:
    """Replace the two CUDA kernels of quantization.py by torch code with the same storage: two int4 per int8."""

    def compress_int4_weight(weight: torch.Tensor) -> torch.Tensor:
        nibbles = weight.to(torch.int16) & 0xF
        return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).to(torch.uint8).view(torch.int8)

    def extract_weight_to_half(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == 8:
            return weight.half() * scale[:, None]
        high = weight >> 4  # arithmetic shift: the sign comes with it
        low = (weight << 4) >> 4  # int8 wraps, then sign-extends the low nibble
        return torch.stack((high, low), dim=-1).view(weight.shape[0], -1).half() * scale[:, None]

    quantization.compress_int4_weight = compress_int4_weight
    quantization.extract_weight_to_half = extract_weight_to_half


def check_int4_stand_in() -> None:
    """The stand-in's packing round-trips every int4 value (what --dry-run can check of INT4 without CUDA)."""
    holder = types.SimpleNamespace()
    torch_int4_stand_in(holder)
    values = torch.arange(-7, 8, dtype=torch.int8).repeat(4, 2)
    scale = torch.full((values.shape[0],), 0.5, dtype=torch.half)
    back = holder.extract_weight_to_half(holder.compress_int4_weight(values), scale, 4)
    if not torch.equal(back, values.half() * 0.5):
        raise AssertionError("the INT4 stand-in does not round-trip")


def int4_kernels(dev: torch.device) -> str:
    """Which INT4 code will run: the model's own CUDA kernels, or the torch stand-in (and why)."""
    capability = torch.cuda.get_device_capability(dev)
    why = None
    if capability < (6, 1) or capability[0] > 8:
        why = f"its kernels are cubins for sm_61-sm_86, this GPU is sm_{capability[0]}{capability[1]}"
    else:
        cudart = cuda_runtime_for_cpm_kernels()
        quantization = importlib.import_module(f"{PACKAGE}.quantization")
        if quantization.kernels is None:
            why = "cpm_kernels did not load (is it installed? is setuptools < 81 there for pkg_resources?)"
        elif cudart is None:
            why = "no libcudart.so for cpm_kernels"
    if why is None:
        return "the model's CUDA kernels (cpm_kernels)"
    torch_int4_stand_in(importlib.import_module(f"{PACKAGE}.quantization"))
    return f"a torch stand-in: {why}"


def build(snapshot: Path, pre_seq_len: int, dry_run: bool, seed: int):
    configuration, modeling = import_remote_code(snapshot)
    raw = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures", "auto_map")}
    if dry_run:
        raw.update(DRY_SHAPE)
    config = configuration.ChatGLMConfig(**raw, pre_seq_len=pre_seq_len, prefix_projection=False)
    # empty_init: allocate without initialising (13 GB on the host in seconds); random values come below.
    model = modeling.ChatGLMForConditionalGeneration(config, empty_init=True)
    return model, config


@torch.no_grad()
def randomise(model, seed: int) -> None:
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "layernorm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02)


def micro_batch(config, source: int, target: int, gen: torch.Generator, dev: torch.device) -> dict:
    """Random ids laid out as ptune (and the reference) lays them out: prompt [gMASK] <sop> target <eop>."""
    low, high = 10, config.vocab_size if config.vocab_size < 130000 else 130000
    a = torch.randint(low, high, (source - 1,), generator=gen).tolist()
    b = torch.randint(low, high, (target - 2,), generator=gen).tolist()
    ids = a + [config.gmask_token_id, config.bos_token_id] + b + [config.eos_token_id]
    context = ids.index(config.bos_token_id)
    labels = [-100] * context + ids[context:]
    return {"input_ids": torch.tensor([ids], device=dev), "labels": torch.tensor([labels], device=dev)}


def measure(model, config, dev: torch.device, args, checkpointing: bool) -> dict:
    prefix = model.transformer.prefix_encoder
    model.train()  # as the reference: its prefix dropout (0.1) is on; checkpointing only acts in training mode
    model.transformer.gradient_checkpointing = checkpointing
    optim = torch.optim.AdamW(prefix.parameters(), lr=2e-2)
    cuda = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    # INT4: as the reference (model.half(), prefix in fp32, no autocast): quantize()'s autograd function
    # computes a weight gradient in the input's dtype, which autocast would leave mixed.
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if cuda and not getattr(args, "no_autocast", False)
        else contextlib.nullcontext()
    )
    gen = torch.Generator().manual_seed(args.seed)

    def step() -> float:
        total = 0.0
        for _ in range(args.accumulation):
            batch = micro_batch(config, args.source_length, args.target_length, gen, dev)
            with autocast:
                loss = model(**batch).loss.float() / args.accumulation
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(optim)
        torch.nn.utils.clip_grad_norm_(prefix.parameters(), 1.0)
        (scaler.step(optim), scaler.update()) if scaler else optim.step()
        optim.zero_grad(set_to_none=True)
        return total

    step()  # warm-up: kernels, allocator, TorchScript
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.steps
    return {
        "s_per_step": round(per_step, 3),
        "hours_for_3000_steps": round(per_step * 3000 / 3600, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "last_loss": round(losses[-1], 4),
    }


def enable_input_grads(model) -> None:
    """What the reference's enable_input_require_grads() does (transformers 5 cannot call it on this model):
    reentrant checkpointing passes gradients back only when a layer's input requires them."""
    model.transformer.word_embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="a 2-layer model on the CPU, fp32: checks the script")
    ap.add_argument("--snapshot", type=Path, help="the ChatGLM-6B snapshot (remote code and config.json)")
    ap.add_argument("--precisions", default="fp16,int4", help="comma-separated: fp16, int4 (default: both)")
    ap.add_argument("--checkpointing", choices=("both", "off", "on"), default="both")
    ap.add_argument("--pre-seq-len", type=int, help="default 128 (dry run: 8)")
    ap.add_argument("--source-length", type=int, help="default 64 (dry run: 8)")
    ap.add_argument("--target-length", type=int, help="default 64 (dry run: 8)")
    ap.add_argument("--accumulation", type=int, help="micro-batches per step, default 16 (dry run: 2)")
    ap.add_argument("--steps", type=int, help="timed steps, default 3 (dry run: 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    defaults = (
        {"pre_seq_len": 8, "source_length": 8, "target_length": 8, "accumulation": 2, "steps": 1}
        if args.dry_run
        else {"pre_seq_len": 128, "source_length": 64, "target_length": 64, "accumulation": 16, "steps": 3}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    snapshot = args.snapshot or next((p for p in SNAPSHOTS if (p / "modeling_chatglm.py").is_file()), None)
    if snapshot is None:
        print(f"no snapshot found at {', '.join(map(str, SNAPSHOTS))}; pass --snapshot", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    import transformers

    t0 = time.perf_counter()
    model, config = build(snapshot, args.pre_seq_len, args.dry_run, args.seed)
    model = model.to(dev)
    randomise(model, args.seed)
    model = model.float() if args.dry_run else model.half()
    model.requires_grad_(False)
    model.transformer.prefix_encoder.requires_grad_(True)
    model.transformer.prefix_encoder.float()
    enable_input_grads(model)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    print(
        f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; built in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(
        f"recipe: pre_seq_len {args.pre_seq_len}, batch 1 x accumulation {args.accumulation}, "
        f"{args.source_length} + {args.target_length} tokens, {args.steps} timed steps after one warm-up"
    )
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for precision in args.precisions.split(","):
        label = f"{precision} (dry run: fp32)" if args.dry_run else precision
        if precision == "int4":
            if args.dry_run:
                check_int4_stand_in()
                label = "int4 (dry run: fp32; quantize() needs CUDA; the torch stand-in's packing round-trips)"
            else:
                label = f"int4 via {int4_kernels(dev)}"
                model.quantize(4)
                args.no_autocast = True
                torch.cuda.empty_cache()
        elif precision != "fp16":
            print(f"unknown precision {precision!r}: fp16 or int4", file=sys.stderr)
            return 2
        for checkpointing in modes:
            r = {
                "precision": label,
                "gradient_checkpointing": checkpointing,
                **measure(model, config, dev, args, checkpointing),
            }
            results.append(r)
            memory = f", peak {r['peak_gib']} GiB" if r["peak_gib"] is not None else ""
            print(
                f"{label}, checkpointing {'on' if checkpointing else 'off'}: {r['s_per_step']} s/step "
                f"({r['hours_for_3000_steps']} h for 3,000 steps){memory}; loss {r['last_loss']}",
                flush=True,
            )
    print(json.dumps({"device": device_name, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
