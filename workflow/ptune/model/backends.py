"""The model backend seam: which code loads, tunes and runs the base model in models/base.

- `transformers`: transformers-native causal LMs (the embedded GLM, GLM-4, Qwen, LLaMA...), loaded with
  AutoModelForCausalLM, with ptune's own prefix (native.py, prefix_encoder.py, prefixed.py).
- `chatglm`: ChatGLM-6B through its own remote code, with its built-in prefix encoder and `quantize()`, in the
  legacy environment (chatglm.py, legacy_env.py).

`fetch_weights.backend` chooses; fetch_weights checks that the model fits it and records it in
models/base/ptune_source.json, where every later stage reads it (so they need no param of their own, and a change
of backend changes models/base and reruns them). `for_base` is the one way to obtain the backend of a base; both
implement `Backend`, the interface the stages and serving call. They do not import this module (a Protocol needs no
inheritance), so the interface sits below the implementations and nothing imports in a circle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import PtuneError
from ..paths import SOURCE_RECORD
from .checks import require_config

TRANSFORMERS = "transformers"
CHATGLM = "chatglm"


class Backend(Protocol):
    """What the stages and serving call to load, tune and run a base model (its code: native.py, chatglm.py)."""

    name: str  # TRANSFORMERS or CHATGLM, as fetch_weights records it (for records and messages; callers that must
    # know what a backend can do ask its capabilities below, never its name)

    # Capabilities: what differs between backends, asked by the stages, prompts and serving.
    batched_scheduler: bool  # serving may merge its rows into one continuously batched scheduler (serve/batching.py)
    multi_device_training: bool  # train.devices > 1 (one process per device) works
    runs_model_code: bool  # it runs the Python code that ships with the weights: only with the user's consent
    chat_templates: bool  # its tokenizer may carry a chat template (preprocess.prompt_format: chat_template)
    token_offsets: bool  # its fast tokenizers map tokens back to the text: prompts keep written texts plain
    logprobs: bool  # serving may return each answer token's log-probability (the OpenAI API's logprobs)
    several_prefixes: bool  # one loaded base may hold several bundles' prefixes (load_prefix; serving by name)

    def load_tokenizer(self, base: Path) -> Any: ...

    # Prompts (prompts.py builds their text): ids of text, the ids that end every prompt, a data prompt's budget.
    def encode_text(self, tokenizer, text: str) -> list[int]: ...

    def prompt_specials(self, tokenizer) -> list[int]: ...

    def prompt_budget(self, max_source_length: int, training: bool) -> int: ...

    # preprocess: training sequences and dev labels
    def encode_train(
        self, tokenizer, prompts: Sequence[list[int]], answers: Sequence[str], max_target_length: int, end_of_turn: int
    ) -> tuple[list[list[int]], list[list[int]]]: ...

    def encode_labels(self, tokenizer, targets: Sequence[str], max_target_length: int) -> list[str]: ...

    # train
    def load_for_training(self, base: Path, dev, dtype, cfg) -> tuple[Any, Any]:
        """The frozen model and its prefix, the only trainable module."""

    def check_quantization(self, mode: str, section: str, dev, dtype=None) -> None:
        """Fail at once where `mode` cannot run (before minutes of loading)."""

    def collate(self, rows: list[dict], pad_id: int) -> dict: ...

    def loss(self, model, prefix, batch: dict) -> Any: ...

    def save_prefix(self, model, prefix, directory: Path, base: Path) -> None:
        """models/ptuning, with prefix_config.json."""

    # evaluate, deploy and serving
    def load_for_inference(
        self, base: Path, prefix_dir: Path, dev, quantization: str = "none", allow_pickle: bool = False
    ) -> tuple[Any, Any]: ...

    def generate(self, model, prefix, tokenizer, prompts: Sequence[Sequence[int]], kwargs: dict) -> Any:
        """New token ids for a batch of prompts; `prefix` None: the base alone."""

    def prefix_length(self, model, prefix) -> int:
        """Positions a loaded prefix takes before the prompt (0 for None: the base alone)."""

    def describe_prefix(self, directory: Path, base: Path, allow_pickle: bool = False) -> dict:
        """pre_seq_len and base_config_sha256 of a saved prefix."""

    def copy_prefix(self, source: Path, dest: Path, allow_pickle: bool = False) -> None:
        """Into the deploy bundle, as safetensors."""

    def load_prefix(self, model, prefix_dir: Path) -> Any:
        """Another bundle's prefix onto a base already loaded (only where several_prefixes)."""


def detect(model_dir: Path) -> str:
    """The backend a model directory needs, from its config.json: model_type chatglm is THUDM's remote code
    (ChatGLM-6B, 2 and 3; GLM-4 in transformers is model_type glm/glm4); everything else is transformers-native."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return CHATGLM if cfg.get("model_type") == "chatglm" else TRANSFORMERS


def check_model_dir(model_dir: Path, backend: str) -> None:
    """Refuse a model directory that the chosen backend cannot run, saying which one can."""
    needed = detect(model_dir)
    if needed != backend:
        why = (
            "it is model_type chatglm, whose code ships with the weights (trust_remote_code)"
            if needed == CHATGLM
            else "it is a transformers-native model, not ChatGLM-6B's remote code"
        )
        raise PtuneError(
            f"fetch_weights.backend: {backend!r} cannot run {model_dir}: {why}; set fetch_weights.backend: {needed}"
        )


def name_of(base: Path) -> str:
    """The backend recorded by fetch_weights for models/base (detected for a directory without the record)."""
    record = base / SOURCE_RECORD
    if record.is_file():
        backend = json.loads(record.read_text(encoding="utf-8")).get("backend")
        if backend:
            return backend
    require_config(base)
    return detect(base)


def for_base(base: Path) -> Backend:
    """The backend of the base model in `base` (as fetch_weights recorded it). Imported on use: the CLI picks the
    environment from this module before any model code (torch, transformers) is loaded."""
    if name_of(base) == CHATGLM:
        from .chatglm import ChatGLMBackend

        return ChatGLMBackend()
    return native()


def native() -> Backend:
    """The transformers backend, for a model that is not in a directory (benchmarks). Its module needs
    transformers 5: never imported in the legacy environment."""
    from .native import TransformersBackend

    return TransformersBackend()


def needs_legacy_env(base: Path) -> bool:
    """Whether code that loads `base` must run in the legacy environment (False when there is no model yet: the
    stage then fails in this environment with its own message)."""
    try:
        return name_of(base) == CHATGLM
    except PtuneError:
        return False
