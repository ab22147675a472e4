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
data, the template around it kept (the reference cuts its prompts this way), and refused by a server. Finding how
many rounds to drop takes a few tokenizations of the prompt, not one per round: the rounds' lengths say where to
look, the prompt's own tokens decide (see `Prompter.fit`).

Texts that people wrote (the message, the history, a system message) are plain text: a control token of the
tokenizer typed in them (`<|user|>`, `<|im_start|>`) is encoded as the characters it is made of, never as the token
a template writes, so no message can forge a turn of another role. Only the format's own text yields control tokens.

The answer's end is the format's end-of-turn token (the chat template's token after an assistant message, e.g. Qwen's
<|im_end|>; the tokenizer's EOS otherwise): training appends it to every target and generation stops on it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from ..config import CHAT_TEMPLATE, CHATGLM6B, TEMPLATE
from ..errors import PtuneError

FORMATS = (TEMPLATE, CHAT_TEMPLATE, CHATGLM6B)

History = Sequence[Sequence[str]]

_PLACEHOLDER = re.compile(r"\{(content|round|history|question|answer|system)\}")
# Stands for the content while the text around it is found (truncation) and for the answer while the chat
# template's frame around an assistant message is found. Characters no prompt or answer holds.
_SLOT = "\x00ptune-slot\x00"
# Stand for the texts people wrote while a prompt is rendered, to find where each one lies in the prompt's text.
_TEXT = "\x00ptune-text-{}\x00"
_TEXTS = re.compile("\x00ptune-text-(\\d+)\x00")


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


def format_for(cfg, tokenizer, chat_templates: bool) -> PromptFormat:
    """The prompt format of the preprocess section for this tokenizer; `chat_templates`: whether the model's backend
    can have one (Backend.chat_templates). A combination that cannot work fails naming the key."""
    if cfg.prompt_format == CHAT_TEMPLATE:
        if not chat_templates:
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


def _control_tokens(tokenizer, backend) -> dict[int, str]:
    """The tokenizer's control tokens (special added tokens), by id, where texts can be kept from forming them: a
    fast (Rust) tokenizer of a backend whose tokenizers say where each token came from (Backend.token_offsets).
    ChatGLM-6B's own tokenizer (chatglm backend) cannot: its texts are encoded as before."""
    if not backend.token_offsets or not getattr(tokenizer, "is_fast", False):
        return {}
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


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
    """Token ids of prompts in one format, for one tokenizer and model backend (model/backends.py; handed in, used
    duck-typed: data does not import model; model/prompting.py builds one for a base).

    The backend says how text becomes ids, which special tokens follow a prompt (ChatGLM-6B: [gMASK] <sop>) and
    whether its tokenizers map tokens back to the text (`token_offsets`).
    """

    def __init__(self, fmt: PromptFormat, tokenizer, backend):
        self.format = fmt
        self.tokenizer = tokenizer
        self.backend = backend
        self._specials = backend.prompt_specials(tokenizer)
        self._controls = _control_tokens(tokenizer, backend)
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
        text = self.text(turn)
        return self._encode(text, self._written(turn, text)) + self._specials

    def _written(self, turn: Turn, text: str) -> list[tuple[int, int, int]] | None:
        """Where the texts people wrote lie in `text` (the prompt of `turn`): (which, start, end) character spans,
        `which` 0 for the message. [] when the tokenizer has no control tokens (nothing to keep them from); None
        when the format does not show the texts as given (a chat template that edits them)."""
        if not self._controls:
            return []
        written: list[str] = []

        def slot(value: str) -> str:
            if not value:  # an empty text stays empty: templates may treat it differently
                return value
            written.append(value)
            return _TEXT.format(len(written) - 1)

        framed = Turn(
            slot(turn.content),
            None if turn.history is None else tuple((slot(q), slot(a)) for q, a in turn.history),
            None if turn.system is None else slot(turn.system),
        )
        template = self.text(framed)
        spans, parts, pos, length = [], [], 0, 0
        for m in _TEXTS.finditer(template):
            which = int(m.group(1))
            parts += [template[pos : m.start()], written[which]]
            start = length + m.start() - pos
            length = start + len(written[which])
            spans.append((which, start, length))
            pos = m.end()
        parts.append(template[pos:])
        return spans if "".join(parts) == text else None

    def _encode(self, text: str, written: list[tuple[int, int, int]] | None) -> list[int]:
        """Token ids of prompt text whose written texts lie at `written` (Prompter._written): a control token that
        overlaps one of them becomes the ids of its characters as plain text; all other ids are the tokenizer's."""
        if not written:
            if written is None and self._forged(text):
                raise PromptError(
                    f"the message contains {self._forged(text)}, a control token of this model, and this chat "
                    "template edits the texts it is given, so it cannot be kept plain text; remove it",
                    "messages",
                )
            return self.backend.encode_text(self.tokenizer, text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = sorted((s, e) for _, s, e in written)
        starts = [s for s, _ in spans]
        out: list[int] = []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            # A control token matched in the text itself (not, say, a byte-fallback token for a character) that
            # overlaps a written text: the span starting last before its end is the only one that can.
            i = bisect.bisect_left(starts, b) - 1
            if token in self._controls and text[a:b] == self._controls[token] and i >= 0 and spans[i][1] > a:
                out += self.tokenizer(text[a:b], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                out.append(token)
        return out

    def _forged(self, text: str) -> str | None:
        """A control token in `text` (for the rare template whose written texts cannot be located)."""
        for token in self._controls.values():
            if token in text:
                return token
        return None

    def fit(self, turn: Turn, budget: int, cut: bool = False, chat: bool = False) -> tuple[list[int], int]:
        """Token ids of `turn` in at most `budget` tokens, and how many of its latest history rounds they keep.

        Whole rounds are dropped, oldest first: the prompt kept is that of the fewest dropped rounds that fits. If
        the message alone does not fit, `cut` cuts the end of its content (data); otherwise TooLong is raised
        (serving). `chat`: an empty history is no history, as model.chat has it.

        A prompt only shrinks as rounds are dropped, so the fewest that fit are found by search, not by trying
        each count in turn (which tokenized the whole conversation once per round: quadratic in its length). The
        rounds' own token counts estimate where the answer lies, the prompts' exact lengths decide it: the whole
        conversation, each round alone and the message alone are tokenized once, then typically two prompts near
        the estimate (at worst a binary search's few).
        """
        history = turn.history
        n = len(history or ())
        prompts: dict[int, list[int]] = {}

        def dropping(k: int) -> list[int]:
            if k not in prompts:
                kept = None if history is None else history[k:]
                if chat and not kept:
                    kept = None
                prompts[k] = self.ids(replace(turn, history=kept))
            return prompts[k]

        if len(dropping(0)) <= budget:
            return prompts[0], n
        if n and len(dropping(n)) <= budget:
            k = self._fewest_dropped(history, budget, len(prompts[0]), len(prompts[n]), dropping)
            return prompts[k], n - k
        alone = replace(turn, history=None if history is None or chat else ())
        if not cut:
            raise TooLong(len(prompts[n]), budget)
        return self._cut(alone, budget), 0

    def _fewest_dropped(self, history, budget: int, whole: int, alone: int, dropping) -> int:
        """The fewest oldest rounds (1 to n) to drop for the prompt to fit, given that none dropped does not fit
        (`whole` tokens) and all dropped does (`alone`)."""
        n = len(history)
        sizes = [len(self.backend.encode_text(self.tokenizer, q + a)) for q, a in history]
        frame = (whole - alone - sum(sizes)) / n  # each round's share of the template around the texts
        k, est = 0, float(whole)
        while k < n and est > budget:
            est -= sizes[k] + frame
            k += 1
        k = min(max(k, 1), n)
        fits, fails = n, 0  # the search's bounds: dropping `fits` rounds fits, dropping `fails` does not
        step = 1
        if len(dropping(k)) <= budget:  # gallop towards fewer dropped rounds
            fits = k
            while fits - step > fails:
                if len(dropping(fits - step)) <= budget:
                    fits -= step
                    step *= 2
                else:
                    fails = fits - step
                    break
        else:  # towards more
            fails = k
            while fails + step < fits:
                if len(dropping(fails + step)) <= budget:
                    fits = fails + step
                    break
                fails += step
                step *= 2
        while fits - fails > 1:
            mid = (fits + fails) // 2
            if len(dropping(mid)) <= budget:
                fits = mid
            else:
                fails = mid
        return fits

    def _cut(self, turn: Turn, budget: int) -> list[int]:
        """The prompt with its content cut at the end so that it fits; the text around the content is kept."""
        framed = self.text(replace(turn, content=_SLOT))
        head, sep, tail = framed.partition(_SLOT)
        text = self.text(turn)
        written = self._written(turn, text)
        if not sep or _SLOT in tail:  # the format does not show the content as given: cut the prompt's end
            return self._encode(text, written)[: budget - len(self._specials)] + self._specials
        # The content ends where the tail begins; written texts after it (none in the formats we know) stay whole.
        end = len(text) - len(tail)
        before = None if written is None else [(w, s, min(e, end)) for w, s, e in written if s < end]
        after = None if written is None else [(w, s - end, e - end) for w, s, e in written if e > end]
        tail_ids = self._encode(tail, after) if tail else []
        room = budget - len(self._specials) - len(tail_ids)
        if room < 1:
            raise PtuneError(
                f"the prompt format alone takes {len(tail_ids) + len(self._specials)} of the "
                f"{budget} tokens a prompt may have; raise preprocess.max_source_length"
            )
        return self._encode(text[:end], before)[:room] + tail_ids + self._specials

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
