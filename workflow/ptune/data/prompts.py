"""Every prompt ptune builds, in one place: training and dev data (preprocess), evaluation's stop tokens, the deploy
bundle, and every way of talking to the model (`ptune serve web|api`, `ptune chat`, `python -m ptune.bundle`).

A P-tuned prefix answers well only in the exact format it was tuned on, so training and serving must not build
prompts with two pieces of code. `preprocess.prompt_format` chooses the format:

- `template`: ptune's own templates. `preprocess.prompt_template` holds {content} and may hold {round} (the turn's
  number, from 1), {history} (where earlier rounds go; before everything when absent) and {system}; each earlier
  round is `preprocess.history_template` with {round}, {question} and {answer}.
- `chat_template`: the tokenizer's own chat template (`tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)`), the conversation as system / user / assistant messages. What chat models ship.
- `chatglm6b`: ChatGLM-6B's own format. Its `model.chat` sends the query alone when there is no history, and
  `[Round i]\\n问：q\\n答：a\\n` per earlier round, counted from 0, then `[Round n]\\n问：query\\n答：`. Its P-tuning
  script (ptuning/main.py) builds training and dev data the same way, except that a data set with a history column
  gets the rounds format even for an example whose history is empty (`[Round 0]\\n问：q\\n答：`). Data follow the
  script and serving follows `model.chat`; data/raw keeps a "history" key on every row of a data set that has a
  history column (an empty list included), which is how the difference is known.

One truncation rule everywhere: the message is kept, and whole earlier rounds are dropped, oldest first, until the
prompt fits its budget (training and dev data: `preprocess.max_source_length`; serving: the model's context less the
prefix and the answer). A message that does not fit even alone is cut at the end of its content in training and dev
data, the template around it kept (the reference cuts its prompts this way), and refused by a server.

The answer's end is the format's end-of-turn token (the chat template's token after an assistant message, e.g. Qwen's
<|im_end|>; the tokenizer's EOS otherwise): training appends it to every target and generation stops on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from ..errors import PtuneError
from ..model import backends

TEMPLATE, CHAT_TEMPLATE, CHATGLM6B = "template", "chat_template", "chatglm6b"
FORMATS = (TEMPLATE, CHAT_TEMPLATE, CHATGLM6B)

History = Sequence[Sequence[str]]

_PLACEHOLDER = re.compile(r"\{(content|round|history|question|answer|system)\}")
# Stands for the content while the text around it is found (truncation) and for the answer while the chat
# template's frame around an assistant message is found. Characters no prompt or answer holds.
_SLOT = "\x00ptune-slot\x00"


class PromptError(PtuneError):
    """A turn this format cannot express (a system message where the format has no place for one)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class TooLong(PtuneError):
    """The message alone does not fit the budget (serving refuses it; data cut it)."""

    def __init__(self, tokens: int, budget: int):
        super().__init__(f"the message is {tokens} tokens with its prompt format, and {budget} fit")
        self.tokens, self.budget = tokens, budget


@dataclass(frozen=True)
class PromptFormat:
    """What it takes to rebuild a prompt: written into the deploy bundle, so serving builds what training built."""

    kind: str
    template: str = ""
    history_template: str = ""
    system: str = ""  # the system message of turns that bring none ("" = none)
    chat_template: str | None = None  # kind chat_template: the Jinja text the tokenizer carried at preprocess

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptFormat":
        return cls(**data)


@dataclass(frozen=True)
class Turn:
    """One turn to answer: the message, the earlier [question, answer] rounds and a system message.

    history None means "no history column" (chatglm6b: the query alone); system None means the format's default.
    """

    content: str
    history: tuple[tuple[str, str], ...] | None = None
    system: str | None = None

    @classmethod
    def of(cls, content: str, history: History | None = None, system: str | None = None) -> "Turn":
        return cls(content, None if history is None else tuple((q, a) for q, a in history), system)


def check_params(cfg) -> None:
    """Keys of the preprocess section that contradict its prompt_format (PreprocessConfig; called by config)."""
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


def format_for(cfg, tokenizer, backend_name: str) -> PromptFormat:
    """The prompt format of the preprocess section for this tokenizer and backend; a combination that cannot work
    fails naming the key."""
    if cfg.prompt_format == CHAT_TEMPLATE:
        if backend_name == backends.CHATGLM:
            raise PtuneError(
                "preprocess.prompt_format: chat_template: ChatGLM-6B's tokenizer has no chat template; "
                "use prompt_format: chatglm6b (its own format)"
            )
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one is the chat template
            template = template.get("default")
        if not template:
            raise PtuneError(
                "preprocess.prompt_format: chat_template, but the tokenizer in models/base carries no "
                "chat template (tokenizer_config.json or chat_template.jinja); use prompt_format: "
                "template with a prompt_template of your own"
            )
        return PromptFormat(CHAT_TEMPLATE, system=cfg.system, chat_template=template)
    if cfg.prompt_format == CHATGLM6B:
        return PromptFormat(CHATGLM6B)
    return PromptFormat(TEMPLATE, cfg.prompt_template, cfg.history_template, cfg.system)


def for_base(cfg, base) -> "Prompter":
    """The prompt builder of the preprocess section (PreprocessConfig) for the base model in `base`: what preprocess
    builds data with, evaluate stops on and deploy writes into the bundle."""
    backend = backends.for_base(base)
    tokenizer = backend.load_tokenizer(base)
    return Prompter(format_for(cfg, tokenizer, backend.name), tokenizer, backend)


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, not str.format or chained replace: prompts hold braces of their own, and a value that happens
    # to contain "{content}" must stay as it is.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def render_template(fmt: PromptFormat, turn: Turn) -> str:
    """The text of a turn in the `template` format."""
    system = fmt.system if turn.system is None else turn.system
    if system and "{system}" not in fmt.template:
        raise PromptError(
            "a system message was given, but preprocess.prompt_template has no {system} place; "
            "add {system} to the template, or send no system message",
            "system",
        )
    history = turn.history or ()
    past = "".join(
        _fill(fmt.history_template, {"round": str(i), "question": q, "answer": a, "system": system})
        for i, (q, a) in enumerate(history, start=1)
    )
    template = fmt.template if "{history}" in fmt.template else "{history}" + fmt.template
    return _fill(template, {"history": past, "round": str(len(history) + 1), "content": turn.content, "system": system})


def render_chatglm6b(turn: Turn) -> str:
    """ChatGLM-6B's text of a turn (model.chat, ptuning/main.py): see the module's docstring."""
    if turn.system:
        raise PromptError("ChatGLM-6B's format has no system message; send user and assistant messages only", "system")
    if turn.history is None:
        return turn.content
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(turn.history))
    return f"{rounds}[Round {len(turn.history)}]\n问：{turn.content}\n答："


class Prompter:
    """Token ids of prompts in one format, for one tokenizer and model backend (backends.py).

    The backend says how text becomes ids and which special tokens follow a prompt (ChatGLM-6B: [gMASK] <sop>).
    """

    def __init__(self, fmt: PromptFormat, tokenizer, backend):
        self.format = fmt
        self.tokenizer = tokenizer
        self.backend = backend
        self._specials = backend.prompt_specials(tokenizer)
        self._lead, self._end = self._assistant_frame()

    # -- text ------------------------------------------------------------------------------------------------
    @property
    def supports_system(self) -> bool:
        kind = self.format.kind
        return kind == CHAT_TEMPLATE or (kind == TEMPLATE and "{system}" in self.format.template)

    def messages(self, turn: Turn) -> list[dict[str, str]]:
        """The turn as chat messages: the system message, the earlier rounds, then the user's message."""
        system = self.format.system if turn.system is None else turn.system
        out = [{"role": "system", "content": system}] if system else []
        for question, answer in turn.history or ():
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": turn.content}]

    def text(self, turn: Turn) -> str:
        """The prompt's text: everything the model reads before it answers, but the backend's special tokens."""
        kind = self.format.kind
        if kind == CHAT_TEMPLATE:
            return self.tokenizer.apply_chat_template(
                self.messages(turn), chat_template=self.format.chat_template, add_generation_prompt=True, tokenize=False
            )
        if kind == CHATGLM6B:
            return render_chatglm6b(turn)
        return render_template(self.format, turn)

    # -- ids -------------------------------------------------------------------------------------------------
    def ids(self, turn: Turn) -> list[int]:
        """The prompt's token ids, exactly as the format defines them (no truncation)."""
        return self.backend.encode_text(self.tokenizer, self.text(turn)) + self._specials

    def fit(self, turn: Turn, budget: int, cut: bool = False, chat: bool = False) -> tuple[list[int], int]:
        """Token ids of `turn` in at most `budget` tokens, and how many of its latest history rounds they keep.

        Whole rounds are dropped, oldest first. If the message alone does not fit, `cut` cuts the end of its content
        (data); otherwise TooLong is raised (serving). `chat`: an empty history is no history, as model.chat has it.
        """
        history = turn.history
        n = len(history or ())
        ids: list[int] = []
        for k in range(n + 1):
            kept = None if history is None else history[k:]
            if chat and not kept:
                kept = None
            ids = self.ids(replace(turn, history=kept))
            if len(ids) <= budget:
                return ids, n - k
        alone = replace(turn, history=None if history is None or chat else ())
        if not cut:
            raise TooLong(len(ids), budget)
        return self._cut(alone, budget), 0

    def _cut(self, turn: Turn, budget: int) -> list[int]:
        """The prompt with its content cut at the end so that it fits; the text around the content is kept."""
        framed = self.text(replace(turn, content=_SLOT))
        head, sep, tail = framed.partition(_SLOT)
        if not sep or _SLOT in tail:  # the format does not show the content as given: cut the prompt's end
            return (
                self.backend.encode_text(self.tokenizer, self.text(turn))[: budget - len(self._specials)]
                + self._specials
            )
        tail_ids = self.backend.encode_text(self.tokenizer, tail) if tail else []
        room = budget - len(self._specials) - len(tail_ids)
        if room < 1:
            raise PtuneError(
                f"the prompt format alone takes {len(tail_ids) + len(self._specials)} of the "
                f"{budget} tokens a prompt may have; raise preprocess.max_source_length"
            )
        return self.backend.encode_text(self.tokenizer, head + turn.content)[:room] + tail_ids + self._specials

    # -- the answer ------------------------------------------------------------------------------------------
    def _assistant_frame(self) -> tuple[str, int]:
        """What the chat template writes between the generation prompt and an answer (GLM-4: a newline), and the
        token that ends an answer (the first token after it when that is a special token, e.g. <|im_end|>; else
        the tokenizer's EOS)."""
        eos = self.tokenizer.eos_token_id
        if self.format.kind != CHAT_TEMPLATE:
            return "", eos
        user = [{"role": "user", "content": "?"}]
        prompt = self.tokenizer.apply_chat_template(
            user, chat_template=self.format.chat_template, add_generation_prompt=True, tokenize=False
        )
        whole = self.tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": _SLOT}], chat_template=self.format.chat_template, tokenize=False
        )
        before, sep, after = whole.partition(_SLOT)
        lead = before[len(prompt) :] if sep and before.startswith(prompt) else ""
        after_ids = self.backend.encode_text(self.tokenizer, after) if after else []
        special = {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        return lead, after_ids[0] if after_ids and after_ids[0] in special else eos

    @property
    def end_of_turn(self) -> int:
        return self._end

    def answer_text(self, answer: str) -> str:
        """An answer as it follows the prompt in a training sequence (the end-of-turn token is added by ids)."""
        return self._lead + answer

    def stop_ids(self, model_eos: int | Sequence[int] | None = None) -> list[int]:
        """The tokens generation stops on: the end of turn, the tokenizer's EOS and those of the model's own
        generation_config.json (GLM-4's base answers end with <|user|>, which only that file names)."""
        extra = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
        out: list[int] = []
        for i in [self._end, self.tokenizer.eos_token_id, *extra]:
            if i is not None and i not in out:
                out.append(i)
        return out
