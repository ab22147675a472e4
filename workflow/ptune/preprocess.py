"""Stage preprocess: apply the prompt template, tokenize, truncate, and save data/processed with `datasets`.

train: `input_ids` = prompt (<= max_source_length) + target (<= max_target_length, ending in EOS), `labels` the
same with the prompt masked (-100). dev: the prompt ids, and the label as the decoded, truncated target, which
is what evaluation compares predictions against. The token-level layout is the model backend's (backends.py):
ChatGLM-6B's adds [gMASK] <sop> as its reference P-tuning does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict

from . import adgen, atomic, backends
from .config import Params, PreprocessConfig
from .errors import PtuneError

RAW = Path("data/raw")
BASE = Path("models/base")
OUT = Path("data/processed")


_PLACEHOLDER = re.compile(r"\{(content|round|history|question|answer)\}")


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, not str.format or chained replace: prompts hold braces of their own, and a value that happens
    # to contain "{content}" must stay as it is.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def format_prompt(template: str, content: str, history: Sequence[Sequence[str]] = (),
                  history_template: str = "") -> str:
    """The prompt of one turn: earlier turns rendered by `history_template` ({round}, {question}, {answer}) go
    where `template` says {history} (before everything if it does not), then {content} and its {round}."""
    past = "".join(_fill(history_template, {"round": str(i), "question": q, "answer": a})
                   for i, (q, a) in enumerate(history, start=1))
    if "{history}" not in template:
        template = "{history}" + template
    return _fill(template, {"history": past, "round": str(len(history) + 1), "content": content})


def _prompts(cfg: PreprocessConfig, examples: list[dict]) -> list[str]:
    return [format_prompt(cfg.prompt_template, ex["content"], ex.get("history", ()), cfg.history_template)
            for ex in examples]


def build(tokenizer, cfg: PreprocessConfig, train: list[dict], dev: list[dict], backend=None) -> DatasetDict:
    backend = backend or backends.native()
    if tokenizer.eos_token_id is None:
        raise PtuneError(f"{BASE}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if cfg.max_train_examples is not None:
        train = train[:cfg.max_train_examples]
    input_ids, labels = backend.encode_train(tokenizer, _prompts(cfg, train), [ex["summary"] for ex in train],
                                             cfg.max_source_length, cfg.max_target_length)
    train_ds = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    prompt_ids, label_texts = backend.encode_eval(tokenizer, _prompts(cfg, dev), [ex["summary"] for ex in dev],
                                                  cfg.max_source_length, cfg.max_target_length)
    dev_ds = Dataset.from_dict({
        "input_ids": prompt_ids,
        "content": [ex["content"] for ex in dev],
        "label": label_texts,
    })
    return DatasetDict({"train": train_ds, "dev": dev_ds})


def context_length(model_dir: Path, trust_remote_code: bool = False) -> int | None:
    """The base model's context window, from its config.json (None where the config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    for key in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_lengths(tokenizer, cfg: PreprocessConfig, context: int | None) -> None:
    """Fail before tokenizing 100k examples when the limits cannot work with this model or template."""
    if context is not None and cfg.max_source_length + cfg.max_target_length > context:
        raise PtuneError(f"preprocess.max_source_length ({cfg.max_source_length}) + max_target_length "
                         f"({cfg.max_target_length}) exceed the base model's context of {context} tokens "
                         f"({BASE}/config.json); lower them so that their sum is at most {context}")
    template_only = len(tokenizer(format_prompt(cfg.prompt_template, ""), add_special_tokens=False)["input_ids"])
    if template_only >= cfg.max_source_length:
        raise PtuneError(f"preprocess.prompt_template alone is {template_only} tokens, and "
                         f"preprocess.max_source_length is {cfg.max_source_length}: every example's content "
                         "would be cut away; raise max_source_length or shorten the template")


def run(params: Params) -> None:
    backend = backends.for_base(BASE)
    tokenizer = backend.load_tokenizer(BASE)
    # ChatGLM-6B's config class is its remote code too.
    context = context_length(BASE, trust_remote_code=backend.name == backends.CHATGLM)
    check_lengths(tokenizer, params.preprocess, context)
    data = build(tokenizer, params.preprocess, adgen.read(RAW / "train.json"), adgen.read(RAW / "dev.json"),
                 backend)
    with atomic.atomic_dir(OUT) as tmp:
        # datasets gives in-memory datasets random fingerprints, which end up in state.json; fixed ones keep
        # the saved bytes reproducible across reruns.
        for split, ds in data.items():
            ds._fingerprint = f"ptune-{split}-{len(ds)}"
        data.save_to_disk(str(tmp))
