"""Token-id rows into padded tensors: right-padded for training, left-padded for generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the label of a token that is not learnt (prompt, padding), as transformers' losses use it


def right_pad(rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels (IGNORE_INDEX where padded) and attention mask of training rows."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
    return ids.to(dev), mask.to(dev)
