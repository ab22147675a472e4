"""The transformers backend (backends.Backend): transformers-native causal LMs, AutoModelForCausalLM, ptune's prefix."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.batching import IGNORE_INDEX, left_pad, right_pad
from . import prefixed
from .loading import check_quantization, load_frozen, load_tokenizer
from .prefix_encoder import CONFIG_NAME, PrefixEncoder, prefix_config_for


def _target_ids(tokenizer, targets: Sequence[str], max_target_length: int) -> list[list[int]]:
    """Targets as training has them: cut so that the end-of-turn token still fits (the model learns where ad copy
    ends), which is also what dev labels are compared as."""
    return [ids[: max_target_length - 1] for ids in tokenizer(list(targets), add_special_tokens=False)["input_ids"]]


class TransformersBackend:
    """transformers-native causal LMs with ptune's prefix (no state: one instance serves every caller)."""

    name = "transformers"  # backends.TRANSFORMERS
    batched_scheduler = True  # its cache is transformers' own: rows' caches merge into one batch
    multi_device_training = True
    runs_model_code = False
    chat_templates = True
    token_offsets = True
    several_prefixes = True  # a prefix is its own module beside the base: any number of them share one load
    logprobs = True  # serving may report its tokens' log-probabilities (the scheduler's logits, or generate's)

    def load_tokenizer(self, base: Path):
        return load_tokenizer(base)

    def encode_text(self, tokenizer, text: str) -> list[int]:
        """Token ids of prompt text as the tokenizer reads it (a chat template's own special tokens included)."""
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_specials(self, tokenizer) -> list[int]:
        return []  # a prompt is its text's tokens: templates write whatever special tokens the model wants

    def prompt_budget(self, max_source_length: int, training: bool) -> int:
        return max_source_length

    def encode_train(
        self, tokenizer, prompts: Sequence[list[int]], answers: Sequence[str], max_target_length: int, end_of_turn: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """prompt ids + answer (<= max_target_length with its end-of-turn token); the prompt masked in labels."""
        t_ids = _target_ids(tokenizer, answers, max_target_length)
        return (
            [list(p) + t + [end_of_turn] for p, t in zip(prompts, t_ids, strict=True)],
            [[IGNORE_INDEX] * len(p) + t + [end_of_turn] for p, t in zip(prompts, t_ids, strict=True)],
        )

    def encode_labels(self, tokenizer, targets: Sequence[str], max_target_length: int) -> list[str]:
        """Dev labels: each target as truncated for training, decoded."""
        return tokenizer.batch_decode(_target_ids(tokenizer, targets, max_target_length), skip_special_tokens=True)

    def load_for_training(self, base: Path, dev: torch.device, dtype: torch.dtype, cfg):
        model = load_frozen(base, dev, dtype=dtype, quantization=cfg.quantization)
        encoder = PrefixEncoder(
            prefix_config_for(
                model,
                cfg.pre_seq_len,
                cfg.prefix_projection,
                cfg.prefix_hidden_size,
                base_model=str(base),
                prefix_dropout=cfg.prefix_dropout,
            )
        ).to(dev)  # fp32 master weights
        return model, encoder

    def load_for_inference(
        self, base: Path, prefix_dir: Path, dev: torch.device, quantization: str = "none", allow_pickle: bool = False
    ):
        # allow_pickle: ptune's own prefix is always safetensors (PrefixEncoder.load reads nothing else).
        model = load_frozen(base, dev, quantization=quantization, key="evaluate.quantization")
        encoder = PrefixEncoder.load(prefix_dir, model).to(model.device)
        encoder.eval()
        return model, encoder

    def load_prefix(self, model, prefix_dir: Path):
        """Another bundle's prefix onto a base already loaded (serving several bundles of one base: the base is loaded
        once, each prefix once); refused, naming both, if it was tuned on another base."""
        encoder = PrefixEncoder.load(prefix_dir, model).to(model.device)
        encoder.eval()
        return encoder

    def check_quantization(self, mode: str, section: str, dev: torch.device, dtype: torch.dtype | None = None) -> None:
        check_quantization(mode, f"{section}.quantization")

    def copy_prefix(self, source: Path, dest: Path, allow_pickle: bool = False) -> None:
        shutil.copytree(source, dest)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-pad a batch for training (generation pads on the left)."""
        ids, labels, mask = right_pad(rows, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, prefix, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return prefixed.forward(model, prefix, **batch).loss

    def generate(self, model, prefix, tokenizer, prompts: Sequence[Sequence[int]], kwargs: dict) -> torch.Tensor:
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
        return prefixed.generate(model, prefix, ids, mask, kwargs)

    def save_prefix(self, model, prefix, directory: Path, base: Path) -> None:
        prefix.save(directory)

    def prefix_length(self, model, prefix) -> int:
        """ptune's prefix says in its own config."""
        return 0 if prefix is None else prefix.config.pre_seq_len

    def describe_prefix(self, directory: Path, base: Path, allow_pickle: bool = False) -> dict:
        """pre_seq_len and base_config_sha256 of a saved prefix."""
        return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
