"""Load a base model and tokenizer the way a downloaded model is loaded: AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import PtuneError
from .checks import require_config

log = logging.getLogger(__name__)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(dev: torch.device) -> torch.dtype:
    """The dtype a frozen base is loaded in to generate (evaluate, deploy, serving): bf16 on a CUDA GPU that computes
    in it natively (compute capability 8.0 and up: A100, L4, H100...), as the reference runs ChatGLM-6B in half
    precision; fp32 elsewhere. fp32 on such a GPU doubles the memory (a 9 B base: 35 GiB instead of 17.5) and runs the
    matrix products at a fraction of the bf16 rate. On the CPU nothing changes: the outputs stay byte-identical."""
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise PtuneError(f"{path}: no tokenizer here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first")
    return AutoTokenizer.from_pretrained(str(path))


def check_quantization(mode: str, key: str) -> None:
    """Fail at once where 4/8-bit loading cannot work: bitsandbytes needs a CUDA GPU and is an optional extra."""
    if mode == "none":
        return
    if not torch.cuda.is_available():
        raise PtuneError(
            f"{key}: {mode} needs a CUDA GPU (bitsandbytes quantizes on the GPU) and this machine has "
            f"none; set {key}: none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PtuneError(
            f"{key}: {mode} needs bitsandbytes, an optional extra: pip install -e '.[quantization]' "
            f"(or set {key}: none)"
        )


def _quantization_config(mode: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if mode == "4bit":  # QLoRA's choice: NF4 weights, double-quantized constants, matmuls in the compute dtype
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_frozen(
    path: str | Path,
    dev: torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantization: str = "none",
    key: str = "train.quantization",
):
    """The base model in eval mode with every parameter frozen (P-tuning trains only the prefix).

    `dtype` None: `inference_dtype(dev)`, what generation loads in (training passes its own). quantization "4bit" /
    "8bit": the weights are quantized by bitsandbytes as they load, onto `dev` (a CUDA GPU), computing in `dtype`; only
    transformers-native architectures (no `trust_remote_code`) load this way.
    """
    path = Path(path)
    require_config(path)
    dev = dev or device()
    dtype = dtype or inference_dtype(dev)
    if quantization != "none":
        check_quantization(quantization, key)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, device_map={"": dev}, quantization_config=_quantization_config(quantization, dtype)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev)
    model.requires_grad_(False)
    model.eval()
    return model


def assert_frozen(model, prefix=None) -> int:
    """Raise if any base parameter would train; returns the base's parameter count. `prefix`: a module inside the
    model that is meant to train (ChatGLM-6B's built-in prefix encoder)."""
    own = {id(p) for p in prefix.parameters()} if prefix is not None else set()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if trainable:
        raise RuntimeError(f"base model parameters are trainable but must be frozen: {trainable[:3]}")
    return sum(p.numel() for p in model.parameters() if id(p) not in own)
