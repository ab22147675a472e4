"""The deploy bundle's model card (README.md): the hub's YAML front matter and a body that says what was tuned.

Written with huggingface_hub's own card classes (ModelCardData, EvalResult, ModelCard), so the front matter is the
hub's: `base_model` (the hub repository, for a base fetched from the Hugging Face hub), `datasets` (the hub data
set, for data fetched from it), `library_name`, `tags`, and the P-tuned scores as `model-index`. The body: what
was tuned on what, the scores against the base and the published reference (params' report.reference), how to serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .origin import describe

LIBRARY = "ptune"
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
NAMES = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L"}
TYPES = {"bleu-4": "bleu", "rouge-1": "rouge", "rouge-2": "rouge", "rouge-l": "rouge"}


@dataclass(frozen=True)
class CardFacts:
    base: dict  # the bundle's base record (origin.record)
    backend: str
    pre_seq_len: int
    prompt_format: str
    metrics: dict  # reports/metrics.json
    dataset: str  # a hub data set id, or "" for data from elsewhere
    dataset_name: str  # in words
    reference: dict | None  # {"name", "bleu-4", ...} from params' report.reference
    smoke_prompt: str


def _hub_base(base: dict) -> str | None:
    return base["repo"] if base.get("source") == "hf_hub" else None


def card_data(facts: CardFacts, model_name: str) -> ModelCardData:
    scores = facts.metrics["ptuned"]
    dataset_type = facts.dataset or "adgen"
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Text generation",
            dataset_type=dataset_type,
            dataset_name=facts.dataset_name,
            dataset_split="dev",
            metric_type=TYPES[m],
            metric_name=NAMES[m],
            metric_value=round(float(scores[m]), 4),
        )
        for m in METRICS
        if m in scores
    ]
    return ModelCardData(
        base_model=_hub_base(facts.base),
        datasets=[facts.dataset] if facts.dataset else None,
        library_name=LIBRARY,
        tags=["p-tuning-v2", "prefix-tuning", "glm", facts.backend, f"prompt-format-{facts.prompt_format}"],
        pipeline_tag="text-generation",
        model_name=model_name,
        eval_results=results,
    )


def _row(label: str, scores: dict) -> str:
    return f"| {label} | " + " | ".join(f"{float(scores[m]):.2f}" for m in METRICS) + " |"


def body(facts: CardFacts, model_name: str, bundle: str) -> str:
    base = facts.base
    hub_base = _hub_base(base)
    base_words = (
        f"[`{hub_base}`](https://huggingface.co/{hub_base}) at commit `{base['revision']}`"
        if hub_base
        else (f"`{describe(base)}`")
    )
    m = facts.metrics
    rows = [_row("base model alone", m["base"]), _row("P-tuned (this prefix)", m["ptuned"])]
    if facts.reference:
        rows.append(_row(f"reference: {facts.reference['name']}", facts.reference))
    rows.append(_row("P-tuned − base", {k: m["ptuned"][k] - m["base"][k] for k in METRICS}))
    if facts.reference:
        rows.append(_row("P-tuned − reference", {k: m["ptuned"][k] - facts.reference[k] for k in METRICS}))
    weights = "\n".join(f"- `{name}`: sha256 `{digest}`" for name, digest in sorted(base["weights"].items()))
    fetch = {
        "hf_hub": "downloaded from the Hugging Face hub (or found in its cache) at the recorded commit",
        "modelscope": "downloaded from ModelScope (or found in its cache) at the recorded commit",
    }.get(base["source"], f"found at `{base.get('path')}` (from the project root); it is on no hub")
    return f"""
# {model_name}

A P-tuning v2 prefix for {base_words} (backend `{facts.backend}`), pre_seq_len {facts.pre_seq_len}: trainable
virtual tokens (keys and values at every layer), the base model frozen. Only the prefix is here (`prefix/`),
never the base's weights. Prompt format: `{facts.prompt_format}` (`bundle.json`, `prompt`: every server builds the
prompts the prefix was trained on from it).

Trained and evaluated on {facts.dataset_name}.
Scores on {m["n_examples"]} dev examples (BLEU-4 and ROUGE as the ChatGLM-6B P-tuning reference computes them):

| model | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |
|---|---|---|---|---|
{chr(10).join(rows)}

## Serve it

With ptune installed, in this folder's parent (`{bundle}` from the project root):

    ptune chat --bundle {bundle}          # in the terminal
    ptune serve web --bundle {bundle}     # a Gradio page on http://127.0.0.1:7860
    ptune serve api --bundle {bundle}     # HTTP on http://127.0.0.1:8000: POST / and /v1/chat/completions
    python -m ptune.bundle {bundle} '{facts.smoke_prompt}'   # one answer, printed as JSON

The base model is {fetch}; `--base DIR` serves it from a folder of yours instead.
Either way its weights must be these (`bundle.json`, `base`), or serving refuses them:

{weights}

A base whose Python code would run (ChatGLM-6B) needs your `--trust-remote-code`, pickled weights your
`--allow-pickle`: nothing in this folder consents for you. Rebuild the bundle with `dvc repro deploy`; share it with
`ptune publish --repo ID` (the prefix, this card and `bundle.json`, never the base's weights).
"""


def render(facts: CardFacts, model_name: str, bundle: str) -> str:
    """The card's text (README.md): front matter, then the body."""
    data = card_data(facts, model_name)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body(facts, model_name, bundle)}"))
