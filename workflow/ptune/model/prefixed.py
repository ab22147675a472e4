"""Run a frozen causal LM with a P-tuning v2 prefix: the forward pass for training and batched generation.

The prefix enters as an already-filled cache of `pre_seq_len` positions. The attention mask covers it (ones)
plus the batch's own mask, and the real tokens take positions `cumsum(mask) - 1`, so the same prompt gets the
same positions whether it is left-padded in a batch or alone.
"""

from __future__ import annotations

import inspect

import torch
import transformers.modeling_utils
from transformers import DynamicCache

from ..data.batching import IGNORE_INDEX
from .prefix_encoder import PrefixEncoder


def cache_kwarg(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache` during v5; accept either release."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _takes_a_logits_mask(model) -> bool:
    """Whether `forward(logits_to_keep=<bool mask (batch, seq)>)` computes logits at just those positions: models
    whose forward slices with transformers' `slice_logits_to_keep` (Llama, Qwen2, GLM, GLM-4, ... on 5.2x)."""
    return (
        hasattr(transformers.modeling_utils, "slice_logits_to_keep")
        and "logits_to_keep" in inspect.signature(model.forward).parameters
    )


def _causal_lm(model, labels: torch.Tensor | None, **inputs):
    """The model's output; with `labels`, its `loss` is the mean next-token cross-entropy over labelled tokens.

    The logits, and so the loss, are computed only where a label follows (the target; the prompt is -100): the
    vocabulary projection and softmax skip the prompt and padding, 3/4 of the positions on the embedded default.
    Same loss as the model's own (which projects every position); its `logits` are then only those positions.
    """
    if labels is None or not _takes_a_logits_mask(model):
        return model(labels=labels, **inputs)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    out = model(logits_to_keep=keep, **inputs)
    out.loss = torch.nn.functional.cross_entropy(out.logits.float(), labels[:, 1:][keep[:, :-1]])
    return out


def prefix_key_values(encoder: PrefixEncoder, model, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix's keys and values per layer, in the model's dtype, (batch, kv_heads, pre_seq_len, head_dim) each.

    The encoder is called (not its `key_values` method) so that a DistributedDataParallel wrapper around it sees
    the forward pass and synchronises the prefix's gradients across processes.
    """
    return encoder(batch_size, next(model.parameters()).dtype)


def filled_cache(model, key_values) -> DynamicCache:
    """A cache of the model holding these keys and values per layer (none: an empty cache)."""
    cache = DynamicCache(config=model.config)
    for layer, (key, value) in enumerate(key_values):
        cache.update(key, value, layer)
    return cache


def prefix_cache(encoder: PrefixEncoder, model, batch_size: int) -> tuple[DynamicCache, int]:
    """A cache filled with the prefix, and the prefix's length."""
    key_values = prefix_key_values(encoder, model, batch_size)
    return filled_cache(model, key_values), key_values[0][0].shape[-2]


def stand_in_id(model) -> int:
    """The token id that stands in the input for positions the mask hides or a cache holds already (the prefix's):
    the model's pad token, else 0."""
    pad = model.generation_config.pad_token_id
    return 0 if pad is None else int(pad)


def forward(
    model,
    encoder: PrefixEncoder | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """A training/scoring forward pass, with the prefix when `encoder` is given (or a DDP wrapper around one)."""
    if encoder is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return _causal_lm(
            model,
            labels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    batch = input_ids.shape[0]
    cache, pre = prefix_cache(encoder, model, batch)
    ones = attention_mask.new_ones(batch, pre)
    full_mask = torch.cat([ones, attention_mask], dim=1)
    position_ids = (full_mask.long().cumsum(-1) - 1)[:, pre:].clamp(min=0)
    return _causal_lm(
        model,
        labels,
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kwarg(model): cache},
    )


@torch.no_grad()
def generate(
    model, encoder: PrefixEncoder | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_kwargs: dict
) -> torch.Tensor:
    """Generate for a left-padded batch; returns only the new tokens (batch, <= max_new_tokens)."""
    if encoder is None:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
        return out[:, input_ids.shape[1] :]
    batch = input_ids.shape[0]
    cache, pre = prefix_cache(encoder, model, batch)
    # generate() skips the positions a cache already holds: stand-in ids for the prefix, mask ones over them.
    stand_in = input_ids.new_full((batch, pre), stand_in_id(model))
    ids = torch.cat([stand_in, input_ids], dim=1)
    mask = torch.cat([attention_mask.new_ones(batch, pre), attention_mask], dim=1)
    out = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, **generation_kwargs)
    return out[:, ids.shape[1] :]
