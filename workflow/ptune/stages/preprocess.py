"""Stage preprocess: build each example's prompt, tokenize, truncate, and save data/processed with `datasets`.

train: `input_ids` = prompt + answer (<= max_target_length, ending in the format's end-of-turn token), `labels` the
same with the prompt masked (-100). dev: the prompt ids, and the label as the decoded, truncated target, which
is what evaluation compares predictions against. Prompts come from prompts.py, the one builder serving uses too
(`preprocess.prompt_format`, rounds dropped oldest first to fit max_source_length); the token-level layout is the
model backend's (backends.py): ChatGLM-6B's adds [gMASK] <sop> as its reference P-tuning does.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

from ..config import Params, PreprocessConfig
from ..data import adgen, prompts
from ..errors import PtuneError
from ..model import checks, prompting
from ..paths import BASE, RAW
from ..paths import PROCESSED as OUT
from ..state import atomic


def _turn(ex: dict) -> prompts.Turn:
    return prompts.Turn.of(ex["content"], ex.get("history"), ex.get("system"))


def _check_system(prompter: prompts.Prompter, examples: list[dict], split: str) -> None:
    if not prompter.supports_system and any(ex.get("system") for ex in examples):
        raise PtuneError(
            f"{RAW / (split + '.json')}: examples carry a system message (fetch_data.system_column), "
            f"but preprocess.prompt_format {prompter.format.kind} has no place for one; add {{system}} "
            "to preprocess.prompt_template, or use prompt_format: chat_template"
        )


def build(prompter: prompts.Prompter, cfg: PreprocessConfig, train: list[dict], dev: list[dict]) -> DatasetDict:
    tokenizer, backend = prompter.tokenizer, prompter.backend
    if tokenizer.eos_token_id is None:
        raise PtuneError(f"{BASE}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if cfg.max_train_examples is not None:
        train = train[: cfg.max_train_examples]
    _check_system(prompter, train, "train")
    _check_system(prompter, dev, "dev")

    def prompt_ids(examples: list[dict], training: bool) -> list[list[int]]:
        budget = backend.prompt_budget(cfg.max_source_length, training)
        return [prompter.fit(_turn(ex), budget, cut=True)[0] for ex in examples]

    input_ids, labels = backend.encode_train(
        tokenizer,
        prompt_ids(train, True),
        [prompter.answer_text(ex["summary"]) for ex in train],
        cfg.max_target_length,
        prompter.end_of_turn,
    )
    train_ds = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    dev_ds = Dataset.from_dict(
        {
            "input_ids": prompt_ids(dev, False),
            "content": [ex["content"] for ex in dev],
            "label": backend.encode_labels(tokenizer, [ex["summary"] for ex in dev], cfg.max_target_length),
        }
    )
    return DatasetDict({"train": train_ds, "dev": dev_ds})


def context_length(model_dir: Path, trust_remote_code: bool = False) -> int | None:
    """The base model's context window, from its config.json (None where the config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return checks.context_length(config, default=None)


def check_lengths(prompter: prompts.Prompter, cfg: PreprocessConfig, context: int | None) -> None:
    """Fail before tokenizing 100k examples when the limits cannot work with this model or prompt format."""
    if context is not None and cfg.max_source_length + cfg.max_target_length > context:
        raise PtuneError(
            f"preprocess.max_source_length ({cfg.max_source_length}) + max_target_length "
            f"({cfg.max_target_length}) exceed the base model's context of {context} tokens "
            f"({BASE}/config.json); lower them so that their sum is at most {context}"
        )
    format_only = len(prompter.ids(prompts.Turn("")))
    if format_only >= prompter.backend.prompt_budget(cfg.max_source_length, training=False):
        what = (
            "preprocess.prompt_template"
            if prompter.format.kind == prompts.TEMPLATE
            else f"the prompt format ({prompter.format.kind})"
        )
        raise PtuneError(
            f"{what} alone is {format_only} tokens, and preprocess.max_source_length is "
            f"{cfg.max_source_length}: every example's content would be cut away; raise "
            "max_source_length or shorten the template"
        )


def run(params: Params) -> None:
    prompter = prompting.for_base(params.preprocess, BASE)
    # ChatGLM-6B's config class is its remote code too.
    context = context_length(BASE, trust_remote_code=prompter.backend.runs_model_code)
    check_lengths(prompter, params.preprocess, context)
    data = build(prompter, params.preprocess, adgen.read(RAW / "train.json"), adgen.read(RAW / "dev.json"))
    with atomic.atomic_dir(OUT) as tmp:
        # datasets gives in-memory datasets random fingerprints, which end up in state.json; fixed ones keep
        # the saved bytes reproducible across reruns.
        for split, ds in data.items():
            ds._fingerprint = f"ptune-{split}-{len(ds)}"
        data.save_to_disk(str(tmp))
