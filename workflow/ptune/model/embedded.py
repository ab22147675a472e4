"""The embedded base model: a BPE tokenizer and a small GlmForCausalLM built and pre-trained offline from a seed.

It plays the role of a pre-trained base: a plain language model of Chinese product text (attribute lists followed
by their descriptions, generated with its own seed), which has never seen the chat prompt that P-tuning teaches.
Everything downstream loads it through AutoTokenizer / AutoModelForCausalLM, as it would a downloaded model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from ..config import EmbeddedModelConfig
from ..data import synthetic_adgen
from ..errors import PtuneError
from ..state import faults
from ..state.determinism import seed_everything

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
# The pre-training corpus is generated from the model seed shifted by this much (kept in data/synthetic_adgen.py,
# which also holds a general set out of it: fetch_data's data/general.jsonl).
CORPUS_SEED_OFFSET = synthetic_adgen.CORPUS_SEED_OFFSET


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over raw characters with byte fallback: any text round-trips exactly.

    No normaliser (NFKC would turn `，` into `,`). The pre-tokeniser only isolates separators and punctuation,
    keeping every character, so that merges never span an attribute boundary: a value like 鱼尾裙 is then
    spelled the same in the attribute list and in the copy, which is what makes copying learnable.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[#*\s，。、：；！？,.:;!?]"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


def build_model(cfg: EmbeddedModelConfig, tokenizer: PreTrainedTokenizerFast) -> GlmForCausalLM:
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return GlmForCausalLM(config)


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model: GlmForCausalLM, stream: torch.Tensor, cfg: EmbeddedModelConfig) -> list[float]:
    """Plain next-token training on random windows of the corpus, for a fixed number of steps."""
    if cfg.pretrain_steps == 0:
        return []
    gen = torch.Generator().manual_seed(cfg.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_lambda(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    seq = min(cfg.pretrain_seq_len, cfg.max_position_embeddings)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pre-train base", unit="step", mininterval=2)
    for _ in bar:
        starts = torch.randint(0, len(stream) - seq - 1, (cfg.pretrain_batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        faults.point("pretrain_step")
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # refresh at mininterval only
    model.eval()
    return losses


def build(cfg: EmbeddedModelConfig, out_dir: Path) -> dict:
    """Build, pre-train and save the embedded base into `out_dir`; returns facts for the timings record."""
    seed_everything(cfg.seed)
    corpus = [synthetic_adgen.plain_text(ex) for ex in synthetic_adgen.pretraining_corpus(cfg.seed, cfg.corpus_size)]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    stream = _token_stream(tokenizer, corpus)
    if len(stream) <= cfg.pretrain_seq_len + 1:
        raise PtuneError(
            f"fetch_weights.embedded.corpus_size: {cfg.corpus_size} examples give only "
            f"{len(stream)} tokens, fewer than pretrain_seq_len {cfg.pretrain_seq_len}; raise it"
        )
    losses = pretrain(model, stream, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "embedded base: %d parameters, %d tokens of corpus, final pre-train loss %s",
        n_params,
        len(stream),
        f"{losses[-1]:.3f}" if losses else "n/a",
    )
    return {
        "parameters": n_params,
        "corpus_tokens": len(stream),
        "pretrain_steps": cfg.pretrain_steps,
        "final_pretrain_loss": round(losses[-1], 4) if losses else None,
    }
