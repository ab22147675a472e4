"""P-tuning v2: a trainable prefix of `pre_seq_len` virtual key/value tokens at every layer, base frozen.

Why not PEFT's PrefixTuningConfig: on transformers v5 its prefix is silently ignored by `generate()` (v5 passes
the cache as `cache=`, PEFT injects `past_key_values=`) and left-padded batches get wrong positions. Here the
prefix fills a fresh `DynamicCache` that is handed to the model as `cache=`, which both `forward` and `generate`
honour; see `prefixed.py` for the masks and positions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PtuneError
from .checks import config_sha256, require_same_base

PREFIX_WEIGHTS = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"


@dataclass(frozen=True)
class PrefixConfig:
    pre_seq_len: int
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    prefix_projection: bool
    prefix_hidden_size: int
    base_model: str
    base_config_sha256: str
    prefix_dropout: float = 0.0

    @property
    def kv_width(self) -> int:
        """Width of one layer's key (or value) for one virtual token."""
        return self.num_key_value_heads * self.head_dim


# The config keys that fix a transformers-native architecture (checks.config_sha256).
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


def base_config_sha256(model_config) -> str:
    return config_sha256(model_config, ARCHITECTURE_KEYS)


def prefix_config_for(
    model,
    pre_seq_len: int,
    prefix_projection: bool,
    prefix_hidden_size: int,
    base_model: str,
    prefix_dropout: float = 0.0,
) -> PrefixConfig:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return PrefixConfig(
        pre_seq_len=pre_seq_len,
        num_layers=cfg.num_hidden_layers,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        prefix_projection=prefix_projection,
        prefix_hidden_size=prefix_hidden_size,
        base_model=base_model,
        base_config_sha256=base_config_sha256(cfg),
        prefix_dropout=prefix_dropout,
    )


class PrefixEncoder(nn.Module):
    """Maps virtual-token ids 0..pre_seq_len-1 to a key and a value per layer (optionally through an MLP)."""

    def __init__(self, config: PrefixConfig):
        super().__init__()
        self.config = config
        out = config.num_layers * 2 * config.kv_width
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.num_key_value_heads * config.head_dim)
            self.trans = nn.Sequential(
                nn.Linear(config.kv_width, config.prefix_hidden_size),
                nn.Tanh(),
                nn.Linear(config.prefix_hidden_size, out),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out)
            # Small init: a prefix of large random keys would swamp attention before any training.
            nn.init.normal_(self.embedding.weight, std=0.02)
            self.trans = None
        self.dropout = nn.Dropout(config.prefix_dropout)  # active in train() mode only

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (key, value) shaped (batch, kv_heads, pre_seq_len, head_dim), as a cache holds them."""
        c = self.config
        ids = torch.arange(c.pre_seq_len, device=self.embedding.weight.device)
        kv = self.embedding(ids)
        if self.trans is not None:
            kv = self.trans(kv)
        kv = self.dropout(kv)
        kv = kv.view(c.pre_seq_len, c.num_layers, 2, c.num_key_value_heads, c.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4).to(dtype)  # layers, k/v, heads, seq, head_dim
        kv = kv.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)
        return [(kv[i, 0], kv[i, 1]) for i in range(c.num_layers)]

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same as `key_values`; a module's forward, so that a DDP wrapper can synchronise its gradients."""
        return self.key_values(batch_size, dtype)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / PREFIX_WEIGHTS), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(
            json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | Path, model=None, pre_seq_len: int | None = None) -> "PrefixEncoder":
        """Load a saved prefix. With `model`, refuse one trained for a different base; with `pre_seq_len`,
        refuse one of another length: each error names both values, never a raw tensor-size traceback."""
        directory = Path(directory)
        cfg_file = directory / CONFIG_NAME
        if not cfg_file.is_file():
            raise PtuneError(f"{cfg_file}: missing; is {directory} a prefix saved by `ptune train`?")
        config = PrefixConfig(**json.loads(cfg_file.read_text(encoding="utf-8")))
        if model is not None:
            require_same_base(
                Path(directory), config.base_model, config.base_config_sha256, base_config_sha256(model.config)
            )
        if pre_seq_len is not None and pre_seq_len != config.pre_seq_len:
            raise PtuneError(
                f"{directory}: this prefix has pre_seq_len {config.pre_seq_len}, but pre_seq_len "
                f"{pre_seq_len} was asked for; use {config.pre_seq_len} or retrain the prefix"
            )
        state = load_file(str(directory / PREFIX_WEIGHTS))
        rows = state.get("embedding.weight")
        if rows is None or rows.shape[0] != config.pre_seq_len:
            found = "no embedding.weight" if rows is None else f"{rows.shape[0]} virtual tokens"
            raise PtuneError(
                f"{directory / PREFIX_WEIGHTS} holds {found}, but {cfg_file} says pre_seq_len "
                f"{config.pre_seq_len}; the two files come from different runs: retrain or restore both"
            )
        encoder = cls(config)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise PtuneError(
                f"{directory / PREFIX_WEIGHTS}: does not match {cfg_file} "
                f"(pre_seq_len {config.pre_seq_len}): {str(exc).splitlines()[0]}"
            ) from None
        return encoder
