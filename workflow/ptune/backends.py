"""The model backend seam: which code loads, tunes and runs the base model in models/base.

- `transformers`: transformers-native causal LMs (the embedded GLM, GLM-4, Qwen, LLaMA...), loaded with
  AutoModelForCausalLM, with ptune's own prefix (native.py, prefix_encoder.py, prefixed.py).
- `chatglm`: ChatGLM-6B through its own remote code, with its built-in prefix encoder and `quantize()`, in the
  legacy environment (chatglm.py, legacy_env.py).

`fetch_weights.backend` chooses; fetch_weights checks that the model fits it and records it in
models/base/ptune_source.json, where every later stage reads it (so they need no param of their own, and a change
of backend changes models/base and reruns them). The stages call the same methods on either backend:

    load_tokenizer(base)                                       -> tokenizer
    encode_text(tokenizer, text)                                -> ids of prompt text   (prompts.py builds prompts)
    prompt_specials(tokenizer)                                  -> ids that end every prompt
    prompt_budget(max_source_length, training)                  -> the most tokens a data prompt may have
    encode_train(tokenizer, prompt_ids, answers, max_tgt, end)  -> input_ids, labels    (preprocess)
    encode_labels(tokenizer, targets, max_tgt)                  -> dev label texts
    load_for_training(base, device, dtype, train_cfg)           -> model, prefix (the only trainable module)
    check_quantization(mode, section, device, dtype)            (fails at once where quantization cannot run)
    load_for_inference(base, prefix_dir, device, quantization, allow_pickle) -> model, prefix
    collate(rows, pad_id) / loss(model, prefix, batch)          (train)
    generate(model, prefix or None, tokenizer, prompts, kwargs) -> new token ids    (None: the base alone)
    save_prefix(model, prefix, directory, base)                 (models/ptuning; prefix_config.json in both)
    describe_prefix(directory, base, allow_pickle)              -> {pre_seq_len, base_config_sha256}  (deploy)
    copy_prefix(source, dest, allow_pickle)                     (into the deploy bundle, as safetensors)
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PtuneError

TRANSFORMERS = "transformers"
CHATGLM = "chatglm"
SOURCE_RECORD = "ptune_source.json"


def detect(model_dir: Path) -> str:
    """The backend a model directory needs, from its config.json: model_type chatglm is THUDM's remote code
    (ChatGLM-6B, 2 and 3; GLM-4 in transformers is model_type glm/glm4); everything else is transformers-native."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return CHATGLM if cfg.get("model_type") == "chatglm" else TRANSFORMERS


def check_model_dir(model_dir: Path, backend: str) -> None:
    """Refuse a model directory that the chosen backend cannot run, saying which one can."""
    needed = detect(model_dir)
    if needed != backend:
        why = ("it is model_type chatglm, whose code ships with the weights (trust_remote_code)"
               if needed == CHATGLM else "it is a transformers-native model, not ChatGLM-6B's remote code")
        raise PtuneError(f"fetch_weights.backend: {backend!r} cannot run {model_dir}: {why}; "
                         f"set fetch_weights.backend: {needed}")


def name_of(base: Path) -> str:
    """The backend recorded by fetch_weights for models/base (detected for a directory without the record)."""
    record = base / SOURCE_RECORD
    if record.is_file():
        backend = json.loads(record.read_text(encoding="utf-8")).get("backend")
        if backend:
            return backend
    if not (base / "config.json").is_file():
        raise PtuneError(f"{base}: no config.json here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first")
    return detect(base)


def for_base(base: Path):
    """The backend for models/base. Imported on use: the CLI picks the environment from this module before any
    model code (torch, transformers) is loaded."""
    if name_of(base) == CHATGLM:
        from .chatglm import ChatGLM

        return ChatGLM
    return native()


def native():
    """The transformers backend (its module needs transformers 5: never imported in the legacy environment)."""
    from .native import Transformers

    return Transformers


def needs_legacy_env(base: Path) -> bool:
    """Whether code that loads `base` must run in the legacy environment (False when there is no model yet: the
    stage then fails in this environment with its own message)."""
    try:
        return name_of(base) == CHATGLM
    except PtuneError:
        return False
