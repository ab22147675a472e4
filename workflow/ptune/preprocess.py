"""Stage preprocess: apply the prompt template, tokenize, truncate, and save data/processed with `datasets`.

train: `input_ids` = prompt (<= max_source_length) + target (<= max_target_length, ending in EOS), `labels` the
same with the prompt masked (-100). dev: the prompt ids, and the label as the decoded, truncated target, which
is what evaluation compares predictions against. The token-level layout is the model backend's (backends.py):
ChatGLM-6B's adds [gMASK] <sop> as its reference P-tuning does.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

from . import adgen, atomic, backends
from .config import Params, PreprocessConfig
from .errors import PtuneError

RAW = Path("data/raw")
BASE = Path("models/base")
OUT = Path("data/processed")


def format_prompt(template: str, content: str) -> str:
    return template.replace("{content}", content)


def _prompts(cfg: PreprocessConfig, examples: list[dict[str, str]]) -> list[str]:
    return [format_prompt(cfg.prompt_template, ex["content"]) for ex in examples]


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


def run(params: Params) -> None:
    backend = backends.for_base(BASE)
    tokenizer = backend.load_tokenizer(BASE)
    data = build(tokenizer, params.preprocess, adgen.read(RAW / "train.json"), adgen.read(RAW / "dev.json"),
                 backend)
    with atomic.atomic_dir(OUT) as tmp:
        # datasets gives in-memory datasets random fingerprints, which end up in state.json; fixed ones keep
        # the saved bytes reproducible across reruns.
        for split, ds in data.items():
            ds._fingerprint = f"ptune-{split}-{len(ds)}"
        data.save_to_disk(str(tmp))
