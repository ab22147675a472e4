"""The transformers backend (see backends.py): transformers-native causal LMs, AutoModelForCausalLM, ptune's prefix."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from . import prefixed
from .backends import TRANSFORMERS
from .batching import IGNORE_INDEX, left_pad, right_pad
from .model import check_quantization, load_frozen, load_tokenizer
from .prefix_encoder import CONFIG_NAME, PrefixEncoder, prefix_config_for


class Transformers:
    """transformers-native causal LMs with ptune's prefix (a namespace: the backends keep no state)."""

    name = TRANSFORMERS

    @staticmethod
    def load_tokenizer(base: Path):
        return load_tokenizer(base)

    @staticmethod
    def encode_text(tokenizer, text: str) -> list[int]:
        """Token ids of prompt text as the tokenizer reads it (a chat template's own special tokens included)."""
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def prompt_specials(tokenizer) -> list[int]:
        return []  # a prompt is its text's tokens: templates write whatever special tokens the model wants

    @staticmethod
    def prompt_budget(max_source_length: int, training: bool) -> int:
        return max_source_length

    @staticmethod
    def encode_train(tokenizer, prompts: Sequence[list[int]], answers: Sequence[str], max_target_length: int,
                     end_of_turn: int) -> tuple[list[list[int]], list[list[int]]]:
        """prompt ids + answer (<= max_target_length with its end-of-turn token); the prompt masked in labels."""
        # Keep room for the end of turn, so the model learns where ad copy ends.
        t_ids = [ids[:max_target_length - 1]
                 for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
        return ([list(p) + t + [end_of_turn] for p, t in zip(prompts, t_ids, strict=True)],
                [[IGNORE_INDEX] * len(p) + t + [end_of_turn] for p, t in zip(prompts, t_ids, strict=True)])

    @staticmethod
    def encode_labels(tokenizer, targets: Sequence[str], max_target_length: int) -> list[str]:
        """Dev labels: each target as truncated for training, decoded."""
        t_ids = [ids[:max_target_length - 1]
                 for ids in tokenizer(list(targets), add_special_tokens=False)["input_ids"]]
        return tokenizer.batch_decode(t_ids, skip_special_tokens=True)

    @staticmethod
    def load_for_training(base: Path, dev: torch.device, dtype: torch.dtype, cfg):
        model = load_frozen(base, dev, dtype=dtype, quantization=cfg.quantization)
        encoder = PrefixEncoder(prefix_config_for(model, cfg.pre_seq_len, cfg.prefix_projection,
                                                  cfg.prefix_hidden_size, base_model=str(base),
                                                  prefix_dropout=cfg.prefix_dropout)).to(dev)  # fp32 master weights
        return model, encoder

    @staticmethod
    def load_for_inference(base: Path, prefix_dir: Path, dev: torch.device, quantization: str = "none",
                           allow_pickle: bool = False):
        # allow_pickle: ptune's own prefix is always safetensors (PrefixEncoder.load reads nothing else).
        model = load_frozen(base, dev, quantization=quantization, key="evaluate.quantization")
        encoder = PrefixEncoder.load(prefix_dir, model).to(model.device)
        encoder.eval()
        return model, encoder

    @staticmethod
    def check_quantization(mode: str, section: str, dev: torch.device, dtype: torch.dtype | None = None) -> None:
        check_quantization(mode, f"{section}.quantization")

    @staticmethod
    def copy_prefix(source: Path, dest: Path, allow_pickle: bool = False) -> None:
        shutil.copytree(source, dest)

    @staticmethod
    def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-pad a batch for training (generation pads on the left)."""
        ids, labels, mask = right_pad(rows, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def loss(model, prefix, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return prefixed.forward(model, prefix, **batch).loss

    @staticmethod
    def generate(model, prefix, tokenizer, prompts: Sequence[Sequence[int]], kwargs: dict) -> torch.Tensor:
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
        return prefixed.generate(model, prefix, ids, mask, kwargs)

    @staticmethod
    def save_prefix(model, prefix, directory: Path, base: Path) -> None:
        prefix.save(directory)

    @staticmethod
    def describe_prefix(directory: Path, base: Path, allow_pickle: bool = False) -> dict:
        """pre_seq_len and base_config_sha256 of a saved prefix."""
        return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))

