"""Training throughput of ptune's P-tuning v2 step (the one `ptune train` runs), in samples/s and peak memory.

    python bench/train_speed.py --chatglm-shape      # random ChatGLM-6B-shaped base, bf16, the reference recipe

The reference recipe: pre_seq_len 128, source + target length 64 + 64, effective batch 16. The comparison with
transformers.Trainer + PEFT asked for in the training issue is not implemented yet (see the issue note).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "bench"))

from eval_speed import chatglm_shaped  # noqa: E402
from ptune.prefix_encoder import PrefixEncoder, prefix_config_for  # noqa: E402
from ptune.train import optimizer_step  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chatglm-shape", action="store_true", required=True)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

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
        return optimizer_step(model, encoder, [micro() for _ in range(args.accumulation)], optim, None, autocast, 1.0)

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
    print(f"device: {name}; ChatGLM-6B shape ({args.layers} layers), bf16 base, fp32 prefix {args.pre_seq_len}; "
          f"batch {args.batch_size} x accumulation {args.accumulation}, {args.seq_len} tokens")
    print(f"{wall / args.steps:.3f} s/step, {samples / wall:.1f} samples/s, last loss {loss:.3f}")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
