"""Load params.yaml, validate it against its JSON Schema, and build typed, frozen config objects once.

The schema (workflow/schemas/params.schema.yaml) is the one description of the keys and their ranges; the
dataclasses below only give them types for the code. A test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import PtuneError
from .guards import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, revision_problem, url_problem
from .paths import REPO
from .pipeline.declared import ALL, BY_NAME

SCHEMA_RELPATH = "workflow/schemas/params.schema.yaml"


# preprocess.prompt_format: the prompt formats data/prompts.py builds (named here, where params are checked).
TEMPLATE, CHAT_TEMPLATE, CHATGLM6B = "template", "chat_template", "chatglm6b"


@dataclass(frozen=True)
class EmbeddedModelConfig:
    seed: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    corpus_size: int
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_learning_rate: float
    pretrain_seq_len: int


@dataclass(frozen=True)
class FetchWeightsConfig:
    source: str
    backend: str
    trust_remote_code: bool
    allow_pickle: bool
    path: str
    repo: str
    revision: str
    embedded: EmbeddedModelConfig


@dataclass(frozen=True)
class EmbeddedDataConfig:
    seed: int
    train_size: int
    dev_size: int
    # the general, out-of-task set (data/general.jsonl), held out from the embedded base's pre-training corpus
    general_size: int = 100


@dataclass(frozen=True)
class FetchDataConfig:
    source: str
    path: str
    url: str
    sha256: str
    train_file: str
    dev_file: str
    encoding: str
    prompt_column: str
    response_column: str
    history_column: str
    embedded: EmbeddedDataConfig
    system_column: str = ""
    # source url only; optional keys, so that a params file written before they existed keeps its meaning
    allow_http: bool = False
    max_unpacked_bytes: int = DEFAULT_MAX_BYTES
    max_archive_members: int = DEFAULT_MAX_MEMBERS
    # source hf_hub / modelscope (optional keys as well)
    repo: str = ""
    revision: str = ""
    train_split: str = "train"
    dev_split: str = "validation"
    expect: str = "auto"  # auto | adgen | none: check against the original ADGEN (data.adgen.ORIGINAL)
    # a JSON-lines file of {"prompt", "response"} (data/general.py) copied to data/general.jsonl; "" = none
    # (the embedded source then generates its own)
    general_file: str = ""


@dataclass(frozen=True)
class PreprocessConfig:
    max_source_length: int
    max_target_length: int
    max_train_examples: int | None
    # data/prompts.py: TEMPLATE | CHAT_TEMPLATE | CHATGLM6B; a params file written before the key existed means template
    prompt_format: str = "template"
    prompt_template: str = ""
    history_template: str = ""
    system: str = ""


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    pre_seq_len: int
    prefix_projection: bool
    prefix_hidden_size: int
    prefix_dropout: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    logging_steps: int
    save_steps: int
    save_total_limit: int
    precision: str
    quantization: str
    devices: int


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    do_sample: bool
    top_p: float
    temperature: float

    @classmethod
    def of(cls, cfg: "GenerationConfig") -> "GenerationConfig":
        """The generation settings alone of a section that has more (evaluate, deploy, a request's Settings)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class EvaluateConfig(GenerationConfig):
    seed: int
    max_examples: int | None
    batch_size: int
    devices: int
    quantization: str
    # reports/intervals.json (reporting/intervals.py); optional keys, so older params files keep working
    bootstrap_resamples: int = 1000  # 0: no intervals
    confidence: float = 0.95
    # the general set (data/general.jsonl): how many examples are scored (null: all), how many generated from
    general_examples: int | None = 100
    general_generations: int = 4
    general_max_new_tokens: int = 48


@dataclass(frozen=True)
class DeployConfig(GenerationConfig):
    smoke_prompt: str


@dataclass(frozen=True)
class ReferenceConfig:
    """Published figures to compare with; in params.yaml the metric keys are spelled as in metrics.json
    (`bleu-4`, `rouge-l`), here with underscores."""

    name: str
    bleu_4: float
    rouge_1: float
    rouge_2: float
    rouge_l: float
    tolerance: float

    def score(self, metric: str) -> float:
        """The figure for a metric named as in metrics.json (`rouge-l`)."""
        return getattr(self, metric.replace("-", "_"))


@dataclass(frozen=True)
class ReportConfig:
    n_samples: int
    n_random: int
    reference: ReferenceConfig | None
    cu_per_hour: float | None
    cu_quota: float | None


@dataclass(frozen=True)
class HardwareConfig:
    gpu_memory_gib: float
    model_gib: float


@dataclass(frozen=True)
class Params:
    fetch_weights: FetchWeightsConfig
    fetch_data: FetchDataConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    deploy: DeployConfig
    report: ReportConfig
    hardware: HardwareConfig
    raw: dict[str, Any] = dataclasses.field(compare=False, repr=False)
    path: Path | None = dataclasses.field(default=None, compare=False, repr=False)  # the file it was read from

    def scoped(self, stage: str) -> "Params":
        """These params as `stage` sees them: the sections and keys it declares (pipeline/declared.py); reading
        any other is an UndeclaredParam error. So dvc.yaml's params, written from the declaration, are exactly
        what the stage reads, and an edit of any of them reruns it."""
        keys = BY_NAME[stage].params
        if ALL in keys:
            return self
        whole = {k for k in keys if "." not in k}
        some: dict[str, set[str]] = {}
        for key in keys:
            if "." in key:
                section, _, name = key.partition(".")
                some.setdefault(section, set()).add(name)
        sections = {}
        raw: dict[str, Any] = {}
        for name in _section_types():
            if name in whole:
                sections[name], raw[name] = getattr(self, name), self.raw[name]
            else:
                sections[name] = Undeclared(stage, name, getattr(self, name), frozenset(some.get(name, ())))
                if name in some:
                    raw[name] = {k: v for k, v in self.raw[name].items() if k in some[name]}
        return dataclasses.replace(self, **sections, raw=raw)


# Set by the stage runner in every stage's process; the processes a stage starts (its workers, deploy's server)
# inherit it, and what they read of params is the stage's scope too.
STAGE_ENV = "PTUNE_STAGE"


class UndeclaredParam(PtuneError):
    """A stage read a param it does not declare: dvc.yaml would not rerun it when that param changes."""

    def __init__(self, stage: str, key: str):
        super().__init__(
            f"stage {stage} read params {key}, which it does not declare: dvc.yaml would not rerun it when {key} "
            f"changes. Add {key!r} to the {stage} stage's params in workflow/ptune/pipeline/declared.py, then run "
            "`ptune pipeline write` (it rewrites dvc.yaml)"
        )


class Undeclared:
    """A params section in a stage that declares none or only some of its keys: those read through, others raise."""

    __slots__ = ("_stage", "_section", "_value", "_keys")

    def __init__(self, stage: str, section: str, value: Any, keys: frozenset[str]):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_keys", keys)

    def __getattr__(self, name: str) -> Any:
        if name in self._keys:
            return getattr(self._value, name)
        raise UndeclaredParam(self._stage, f"{self._section}.{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def current_stage() -> str | None:
    """The stage this process runs for (PTUNE_STAGE), if any."""
    stage = os.environ.get(STAGE_ENV) or None
    return stage if stage in BY_NAME else None


def check_declared(key: str) -> None:
    """Raise UndeclaredParam when this process runs for a stage that does not declare `key` (section.name): for
    code that reads a params file on its own (a consent check), not through load()."""
    stage = current_stage()
    if stage is None:
        return
    keys = BY_NAME[stage].params
    if ALL not in keys and key not in keys and key.partition(".")[0] not in keys:
        raise UndeclaredParam(stage, key)


def schema_path() -> Path:
    """The schema in the checkout this package is installed from (`pip install -e .`)."""
    return REPO / SCHEMA_RELPATH


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text(encoding="utf-8"))


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def validate(raw: Any, source: str = "params.yaml") -> None:
    """Raise PtuneError naming the first offending key (in file order) and what is allowed there."""
    if not isinstance(raw, dict):
        raise PtuneError(f"{source}: expected a mapping of stage sections, got {type(raw).__name__}")
    import jsonschema  # here, not at module level: generation code imports this module's dataclasses

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    lines = []
    for err in errors[:5]:
        where = _key_path(err)
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            lines.append(f"{where}: {err.message}; allowed keys here: {', '.join(allowed)}")
        elif err.validator == "required":
            lines.append(f"{where}: {err.message}; add it (see the default params.yaml for its value)")
        else:
            lines.append(f"{where}: {err.message}")
    more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
    raise PtuneError(f"{source} is invalid (described in {SCHEMA_RELPATH}):\n  " + "\n  ".join(lines) + more)


def _redact(value: str) -> str:
    """`value` with whatever stands before the @ of a URL's host replaced, for messages and logs."""
    scheme, _, rest = value.partition("://")
    netloc, sep, tail = rest.partition("/")
    return f"{scheme}://***@{netloc.rpartition('@')[2]}{sep}{tail}"


def _has_credentials(value: str) -> bool:
    """A password, or any user name in an http(s) URL (a token is often given as the user name). `ssh://git@host`
    and `git@host:repo` name an account, not a secret, and pass."""
    if "://" not in value:
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        return parts.password is not None or (parts.username is not None and parts.scheme.lower() in ("http", "https"))
    except ValueError:
        return "@" in value.split("://", 1)[1].split("/", 1)[0]


URL_KEYS = (("fetch_weights", "repo"), ("fetch_data", "url"), ("fetch_data", "repo"))


def refuse_credentials(raw: dict[str, Any], source: str = "params.yaml") -> None:
    """Refuse credentials in `fetch_weights.repo` or `fetch_data.url` (`https://user:token@host/...`): params.yaml
    is committed, and these values are copied into models/base/ptune_source.json, the report's provenance and the
    logs. Run on the raw params before the schema, whose messages would repeat the value; the messages here show
    it with the credentials masked."""
    for section, name in URL_KEYS:
        value = raw.get(section, {}).get(name) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and _has_credentials(value):
            raise PtuneError(
                f"{section}.{name}: {_redact(value)} carries credentials (a user name or token before the @), which "
                f"would be copied into models/base/ptune_source.json, the report and the logs; remove them from "
                f"{source}. Give a token through the environment instead: HF_TOKEN (or `hf auth login`) for the "
                "Hugging Face hub, a git credential helper (`git config --global credential.helper store`, or your "
                "system's) for a git server"
            )


# A hub repository id: owner/name, in the characters both hubs allow.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_sources(fetch_weights: FetchWeightsConfig, fetch_data: FetchDataConfig) -> None:
    """The trust checks on where models and data come from that a JSON Schema cannot express (credentials aside:
    refuse_credentials); every stage runs them when it loads params.

    Refused: a revision that is neither a commit hash nor a valid branch or tag name (it reaches git's command
    line, see guards.revision_problem), and a fetch_data.url that guards.url_problem refuses (plain http
    elsewhere than this machine, unless fetch_data.allow_http), and a hub data set's fetch_data.repo that is not an
    owner/name id (a URL, a path).
    """
    if fetch_weights.source in ("git_lfs", "hf_hub", "modelscope"):
        why = revision_problem(fetch_weights.revision)
        if why:
            raise PtuneError(
                f"fetch_weights.revision: {fetch_weights.revision!r} is not a commit hash or a valid branch or tag "
                f"name ({why}); give the 40-hex-digit commit to fetch"
            )
    if fetch_data.source in ("hf_hub", "modelscope"):
        if not HUB_ID.fullmatch(fetch_data.repo):
            raise PtuneError(
                f"fetch_data.repo: {fetch_data.repo!r} is not a hub id; give the data set's owner/name as its page "
                "shows it (e.g. HasturOfficial/adgen for https://huggingface.co/datasets/HasturOfficial/adgen)"
            )
        why = revision_problem(fetch_data.revision)
        if why:
            raise PtuneError(
                f"fetch_data.revision: {fetch_data.revision!r} is not a commit hash or a valid branch or tag name "
                f"({why}); give the commit to fetch"
            )
    if fetch_data.source == "url":
        why = url_problem(fetch_data.url, fetch_data.allow_http)
        if why:
            raise PtuneError(f"fetch_data.url: {fetch_data.url} is refused: {why}")


def check_prompt_format(cfg: PreprocessConfig) -> None:
    """Keys of the preprocess section that contradict its prompt_format (data/prompts.py builds them)."""
    if cfg.prompt_format == TEMPLATE:
        if "{content}" not in cfg.prompt_template:
            raise PtuneError(
                "preprocess.prompt_template: must contain {content} (prompt_format: template); e.g. "
                '"[Round {round}]\\n\\n问：{content}\\n\\n答："'
            )
        return
    for key in ("prompt_template", "history_template"):
        if getattr(cfg, key):
            what = (
                "the tokenizer's chat template builds the prompt"
                if cfg.prompt_format == CHAT_TEMPLATE
                else "ChatGLM-6B's own format builds the prompt"
            )
            raise PtuneError(
                f"preprocess.{key}: not used with prompt_format: {cfg.prompt_format} ({what}); "
                "remove it, or set prompt_format: template to use your own templates"
            )
    if cfg.prompt_format == CHATGLM6B and cfg.system:
        raise PtuneError("preprocess.system: ChatGLM-6B's format has no system message; remove it")


def _section_types() -> dict[str, type]:
    return {
        "fetch_weights": FetchWeightsConfig,
        "fetch_data": FetchDataConfig,
        "preprocess": PreprocessConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "deploy": DeployConfig,
        "report": ReportConfig,
        "hardware": HardwareConfig,
    }


def from_dict(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    if isinstance(raw, dict):
        refuse_credentials(raw, source)
    validate(raw, source)
    sections = {}
    for name, cls in _section_types().items():
        data = dict(raw[name])
        if cls is FetchWeightsConfig:
            data["embedded"] = EmbeddedModelConfig(**data["embedded"])
        elif cls is FetchDataConfig:
            data["embedded"] = EmbeddedDataConfig(**data["embedded"])
        elif cls is ReportConfig and data["reference"] is not None:
            data["reference"] = ReferenceConfig(**{k.replace("-", "_"): v for k, v in data["reference"].items()})
        sections[name] = cls(**data)
    check_sources(sections["fetch_weights"], sections["fetch_data"])
    check_prompt_format(sections["preprocess"])
    return Params(**sections, raw=raw)


def load(path: str | Path = "params.yaml", stage: str | None = None) -> Params:
    """Read and validate a params file; every problem is a PtuneError naming the file and key. For a stage (given,
    or this process's PTUNE_STAGE), the params it declares only (Params.scoped)."""
    stage = stage or current_stage()
    path = Path(path)
    if not path.is_file():
        raise PtuneError(f"{path}: no such params file; run ptune from the project root (where params.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PtuneError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    params = dataclasses.replace(from_dict(raw, str(path)), path=path)
    return params.scoped(stage) if stage else params
