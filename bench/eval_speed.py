"""Evaluation speed: the reference's one-prompt-per-generate loop vs ptune's batched generation, side by side.

    python bench/eval_speed.py                          # the embedded model in models/base, dev prompts
    python bench/eval_speed.py --chatglm-shape          # random weights shaped like ChatGLM-6B, bf16 (GPU)

Both paths run in this one process on the same model and the same prompts, with the reference's sampling
settings (top_p 0.7, temperature 0.95) unless --greedy, and print examples/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from ptune.compute.evaluation import generate_all  # noqa: E402
from ptune.config import GenerationConfig  # noqa: E402
from ptune.model.backends import native  # noqa: E402
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for  # noqa: E402


class IdTokenizer:
    """Enough of a tokenizer for generation on random weights: pad/eos ids and a decode to id strings."""

    pad_token_id = 0
    eos_token_id = 2

    @staticmethod
    def batch_decode(rows, skip_special_tokens=True):
        return [" ".join(map(str, r.tolist())) for r in rows]


def chatglm_shaped(pre_seq_len: int, seed: int, layers: int = 28):
    from transformers import GlmConfig, GlmForCausalLM

    # ChatGLM-6B's shape: 28 layers, hidden 4096, 32 heads (no GQA), FFN 16384, vocab 130,528.
    config = GlmConfig(
        vocab_size=130528,
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = GlmForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    encoder = None
    if pre_seq_len:
        encoder = PrefixEncoder(prefix_config_for(model, pre_seq_len, False, 0, "random")).to(dev)
    gen = torch.Generator().manual_seed(seed)
    # ADGEN prompts are 30-70 tokens long with ChatGLM's tokenizer.
    prompts = [
        torch.randint(5, 130000, (int(n),), generator=gen).tolist()
        for n in torch.randint(30, 70, (4096,), generator=gen)
    ]
    return model, encoder, IdTokenizer(), prompts


def embedded(model_dir: Path, data_dir: Path, prefix_dir: Path | None):
    from datasets import load_from_disk

    from ptune.model.loading import load_frozen, load_tokenizer

    model = load_frozen(model_dir)
    encoder = PrefixEncoder.load(prefix_dir, model).to(model.device) if prefix_dir else None
    prompts = load_from_disk(str(data_dir))["dev"]["input_ids"]
    return model, encoder, load_tokenizer(model_dir), prompts


def rate(model, encoder, tok, prompts, cfg, batch_size) -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_all(
        model, encoder, tok, prompts, cfg, batch_size=batch_size, seed=0, desc=f"batch {batch_size}", backend=native()
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return len(prompts) / wall, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chatglm-shape", action="store_true", help="random ChatGLM-6B-shaped model in bf16")
    ap.add_argument("--layers", type=int, default=28, help="with --chatglm-shape: fewer layers for a smoke test")
    ap.add_argument("--pre-seq-len", type=int, default=0, help="with --chatglm-shape: a random prefix")
    ap.add_argument("--model", type=Path, default=REPO / "models/base")
    ap.add_argument("--data", type=Path, default=REPO / "data/processed")
    ap.add_argument("--prefix", type=Path, help="a trained prefix directory (default: none, the base alone)")
    ap.add_argument("--n-sequential", type=int, default=64, help="prompts for the one-at-a-time loop")
    ap.add_argument("--n-batched", type=int, default=64, help="prompts for the batched path")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    if args.chatglm_shape:
        model, encoder, tok, prompts = chatglm_shaped(args.pre_seq_len, seed=0, layers=args.layers)
    else:
        model, encoder, tok, prompts = embedded(args.model, args.data, args.prefix)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_p=0.7, temperature=0.95)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {device}; model: {'ChatGLM-6B shape, random, bf16' if args.chatglm_shape else args.model}; "
        f"prefix: {encoder.config.pre_seq_len if encoder else 0}; max_new_tokens {args.max_new_tokens}; "
        f"{'greedy' if args.greedy else 'sampling top_p 0.7 temperature 0.95'}"
    )
    rate(model, encoder, tok, prompts[:2], cfg, 2)  # warm-up: kernels, allocator, caches
    seq, seq_wall = rate(model, encoder, tok, prompts[: args.n_sequential], cfg, 1)
    print(f"reference loop (1 prompt per generate): {seq:8.3f} examples/s  ({args.n_sequential} in {seq_wall:.1f} s)")
    results = {"device": device, "sequential_examples_per_s": seq, "batched": {}}
    for bs in args.batch_size:
        n = max(args.n_batched, bs)
        bat, bat_wall = rate(model, encoder, tok, prompts[:n], cfg, bs)
        results["batched"][bs] = {"examples_per_s": bat, "ratio": bat / seq}
        print(
            f"batched, batch {bs:4d}:                  {bat:8.3f} examples/s  ({n} in {bat_wall:.1f} s)"
            f"  -> {bat / seq:.1f}x"
        )
        if torch.cuda.is_available():
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
