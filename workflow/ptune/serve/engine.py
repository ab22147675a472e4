"""One generation engine under the web demo, the HTTP API and the terminal chat.

It holds one loaded model (a deploy bundle, its base alone, or a plain model directory) and answers the requests
that arrive together in one batch: a scheduler (serve/batching.py; for `ptune serve` on a CPU in a child process of
its own, else in a thread) decodes up to `max_batch` requests at once and admits waiting ones between decoding
steps (continuous batching), each row with its own settings, seed, length and cancel event, so that an answer does
not depend on who else is asking. Waiting and running requests are counted; past `max_pending` the engine refuses
at once (`Busy`) rather than let a queue grow without bound.

Each answer's tokens are handed to its `Reply` (serve/reply_stream.py) by the scheduler (token ids only, once per
decoding step, with one wake-up per event loop); its reader decodes them into text pieces, in its own thread or on
the HTTP server's event loop (`Reply.pieces`, `Reply.ended`: no thread per reader or per token). A reader may stop
it at any time (`Reply.cancel`), e.g. when a client goes away: its row leaves the batch before the next decoding
step.

A backend whose rows cannot share the scheduler (`Backend.batched_scheduler` False: ChatGLM-6B's remote code
generates) and `max_batch` 1 are served one request at a time: the backend's own `generate` in a worker thread,
behind a lock, the decoding loop evaluation uses (seeded per request instead of per batch).

A request may ask for several answers at once (`start_choices`, OpenAI's `n`): its prompt is tokenized once and its
rows go to the scheduler together (they join the batch in the same step where there is room), each seeded with the
request's seed + its index. Stop strings end a row as soon as its tokens reach one (and its text is cut before it);
log-probabilities come with each token from the scheduler, or from a logits processor on the one-at-a-time path.

A request is checked against the caps (serve/limits.py) and counted as pending before its prompt is tokenized, so
that neither a huge conversation nor many of them at once can keep the server busy before the pending limit applies.

Several bundles of one base (`--bundle NAME=PATH` repeated) are served by one engine: the base is loaded once, each
bundle's prefix once, and each is a `Variant` of the engine, chosen per request by name (`model`; None: the first),
with its own prompt format, stop tokens, prefix length and generation defaults; the reserved name `base`
(`--serve-base`) is the base alone, no prefix. Their rows share the one scheduler and its batches (each row is
prefilled with its own prefix: serve/batching.py), so a request's answer is the one a server of its bundle alone
gives.

A scheduler's process that ends (the kernel's OOM killer picks the process with the most memory of its own) fails
its rows in flight; from then on a thread decodes (`_fall_back`, logged once), or, with $PTUNE_SERVE_FALLBACK=none,
the engine refuses every request (`Unavailable`, 503) and says so (`available`) for a supervisor to restart the
server. Either way no request waits for a process that is gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..bundle.loader import Bundle
from ..config import GenerationConfig
from ..data import prompts
from ..errors import PtuneError
from ..model import backends
from ..model.checks import context_length
from ..model.generation import Settings, first_stop, generation_kwargs, stop_check, token_bytes
from ..model.loading import device, load_frozen, load_tokenizer
from . import scheduler_process
from .limits import (
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    Limits,
    RequestError,
    check_conversation,
    check_sampling,
    check_seed,
    check_stop,
)
from .reply_stream import Reply, Wakes

if TYPE_CHECKING:
    from . import batching

log = logging.getLogger(__name__)
# `--log-prompts` writes each request's prompt token ids here, as vLLM's request log does: to see what the model reads.
prompt_log = logging.getLogger("ptune.prompts")

History = Sequence[tuple[str, str]]


__all__ = ["BASE", "Busy", "Engine", "Limits", "Reply", "RequestError", "Settings", "Unavailable", "Variant"]

# The reserved name of the base model alone, no prefix, among several bundles (`--serve-base`).
BASE = "base"


@dataclasses.dataclass
class Variant:
    """One model an engine serves by name: a bundle's prefix (or none: the base alone) on the engine's one loaded
    base, with what its answers are built with: its prompt format, stop tokens and generation defaults."""

    name: str
    encoder: object | None
    prompter: prompts.Prompter
    stop_ids: list[int]
    prefix_length: int
    defaults: Settings
    description: str  # for this machine's terminal (may name a local folder)
    summary: str  # for clients, without local paths
    silent: frozenset[int] | None = None  # silent_ids, once computed

    @classmethod
    def of(cls, name: str, bundle: Bundle, description: str, summary: str | None = None) -> "Variant":
        prompter = bundle.prompter()
        return cls(
            name,
            bundle.encoder,
            prompter,
            prompter.stop_ids(bundle.model.generation_config.eos_token_id),
            bundle.backend.prefix_length(bundle.model, bundle.encoder),
            Settings.of(bundle.generation),
            description,
            summary or name,
        )


class Busy(RequestError):
    def __init__(self, pending: int):
        super().__init__(
            f"the server is busy ({pending} requests pending); retry in a moment", status=503, code="server_busy"
        )


class Unavailable(RequestError):
    """The scheduler's process has ended and, as $PTUNE_SERVE_FALLBACK=none asks, nothing took over (the log says
    why; the client is told no more)."""

    def __init__(self):
        super().__init__(
            "the server cannot answer until it is restarted (its log says why)", status=503, code="server_unavailable"
        )


def _ended(engine: "weakref.ref[Engine]") -> None:
    """The scheduler's process has ended (called by its reader thread): the engine, if still there, falls back."""
    alive = engine()
    if alive is not None:
        alive._fall_back()


class Engine:
    """A loaded model that answers chat turns, those that arrive together in one batch."""

    def __init__(
        self,
        bundle: Bundle,
        name: str,
        description: str,
        max_pending: int = 32,
        limits: Limits | None = None,
        max_batch: int = 8,
        own_process: bool = False,
        child: scheduler_process.Child | None = None,
        summary: str | None = None,
        more: Sequence[Variant] = (),
    ):
        """`more`: other bundles served beside `bundle` (the default, named `name`), each by its name, all on
        `bundle`'s model (Bundle.sibling). `own_process`: on a CPU, run the scheduler in a child process (what
        `ptune serve` asks for: its HTTP side's Python would otherwise take turns with the model's at one GIL);
        else, and always on a GPU, in a thread. `child`: that process, started before the model loaded (`ptune
        serve` starts it: serve/commands.py); closed here if not used. `description`: what is served, for this
        machine's terminal (it may name a local folder); `summary`: the same for clients, without local paths (the
        name if not given)."""
        self.bundle = bundle
        self.max_pending = max_pending
        self.limits = limits or Limits()
        self.backend = bundle.backend  # tokenizes and generates as the stages did
        # By name, the first the default: each builds prompts as preprocess built its training data.
        self.variants: dict[str, Variant] = {}
        for v in (Variant.of(name, bundle, description, summary), *more):
            if v.name in self.variants:
                raise PtuneError(f"--bundle {v.name}: two bundles are named {v.name!r}; name each: --bundle NAME=PATH")
            self.variants[v.name] = v
        self.default = next(iter(self.variants.values()))
        self.context_length = context_length(bundle.model.config)
        self.log_prompts = False
        self._token_bytes: dict[int, bytes] = {}  # token id: its bytes (log-probabilities name tokens by them)
        self._bytes_of = None
        self._generate_lock = threading.Lock()
        self._tokenize_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._fallback_lock = threading.Lock()
        self._fallback = scheduler_process.fallback() if own_process else scheduler_process.THREAD
        self._lost = False  # the scheduler's process has ended and that is logged (_fall_back)
        self._pending = 0
        # Continuous batching where the backend's rows can share a scheduler; else one at a time (the lock).
        self.scheduler: batching.Scheduler | scheduler_process.SchedulerProcess | None = None
        if max_batch > 1 and self.backend.batched_scheduler:
            # Imported here: the scheduler uses transformers 5's cache classes, which ChatGLM-6B's environment
            # (transformers 4.33, the chatglm backend, served one request at a time) does not have.
            from .batching import Scheduler

            model = bundle.model
            self._wakes = Wakes()
            where = next(model.parameters()).device
            encoders = [v.encoder for v in self.variants.values()]
            if own_process and scheduler_process.in_a_process(where, model, *encoders):
                # The reader thread calls back through a weak reference: it would otherwise keep the engine alive.
                engine = weakref.ref(self)
                try:
                    self.scheduler = scheduler_process.SchedulerProcess(
                        *self._scheduler_args(max_batch),
                        after_step=self._wakes.flush,
                        child=child,
                        on_end=lambda: _ended(engine),
                        tokenizer=bundle.tokenizer,
                    )
                except Exception:  # e.g. a model that cannot be pickled to the child
                    log.warning("the scheduler's process did not start; decoding in a thread", exc_info=True)
                child = None  # SchedulerProcess has it (or has closed it)
            if self.scheduler is None:
                self.scheduler = Scheduler(
                    *self._scheduler_args(max_batch), after_step=self._wakes.flush, tokenizer=bundle.tokenizer
                )
        if child is not None:
            child.close()
        self.max_batch = self.scheduler.max_batch if self.scheduler is not None else 1

    def _scheduler_args(self, max_batch: int) -> tuple:
        """What a scheduler, in a thread or a process, is built from: the model, its prefix encoders by name, the
        default stop tokens (each row brings its own), the rows and its torch threads."""
        from .batching import scheduler_threads

        model = self.bundle.model
        threads = scheduler_threads(next(model.parameters()).device)
        encoders = {name: v.encoder for name, v in self.variants.items()}
        return (model, encoders, self.stop_ids, max_batch, threads)

    @classmethod
    def from_bundle(
        cls,
        directory: str | Path,
        base_only: bool = False,
        max_pending: int = 32,
        trust_remote_code: bool = False,
        max_batch: int = 8,
        base: Path | None = None,
        own_process: bool = False,
        child: scheduler_process.Child | None = None,
        name: str | None = None,
        others: Sequence[tuple[str, str | Path]] = (),
        serve_base: bool = False,
    ) -> "Engine":
        """A deploy bundle (models/deploy), with its prefix or, `base_only`, its base model alone.
        `trust_remote_code`: the user's consent to run the Python code of a ChatGLM-6B base; `base`: the base
        folder origin.resolve found and checked (Bundle.load). `name`: what requests call it (default `ptune`;
        `ptune-base` with `base_only`); `others`: (name, folder) of more bundles of the same base
        (opening.check_shared_base has compared their records), each loading only its prefix; `serve_base`: the
        base alone besides, named `base`."""
        bundle = Bundle.load(directory, with_prefix=not base_only, trust_remote_code=trust_remote_code, base=base)
        prefix = bundle.backend.prefix_length(bundle.model, bundle.encoder)
        what = "base model alone" if base_only else f"P-tuned, prefix of {prefix} tokens"
        name = name or ("ptune-base" if base_only else "ptune")
        description = f"bundle `{directory}` ({what})"
        more = []
        for other_name, folder in others:
            sibling = bundle.sibling(folder)
            length = sibling.backend.prefix_length(sibling.model, sibling.encoder)
            more.append(
                Variant.of(
                    other_name,
                    sibling,
                    f"bundle `{folder}` (P-tuned, prefix of {length} tokens)",
                    f"deploy bundle (P-tuned, prefix of {length} tokens)",
                )
            )
        if serve_base:
            if getattr(bundle.backend, "load_prefix", None) is None:
                raise PtuneError(
                    f"--serve-base: the {bundle.backend.name} backend's prefix is part of the loaded model, so its "
                    "base alone cannot share that load; serve it with --base-only from a server of its own"
                )
            alone = dataclasses.replace(bundle, encoder=None)  # the first bundle's prompt format, as --base-only
            more.append(Variant.of(BASE, alone, "the base model alone (no prefix)", "base model alone (no prefix)"))
        engine = cls(
            bundle,
            name,
            description,
            max_pending,
            max_batch=max_batch,
            own_process=own_process,
            child=child,
            summary=f"deploy bundle ({what})",
            more=more,
        )
        return engine._ready()

    @classmethod
    def from_model(
        cls,
        directory: str | Path,
        preprocess,
        generation: GenerationConfig,
        max_pending: int = 32,
        max_batch: int = 8,
        own_process: bool = False,
        child: scheduler_process.Child | None = None,
    ) -> "Engine":
        """A plain transformers model directory (e.g. models/base before any deploy), no prefix; its prompts in the
        format of the preprocess section (config.PreprocessConfig) of the params file."""
        if backends.needs_legacy_env(Path(directory)):
            raise PtuneError(
                f"{directory}: a ChatGLM-6B base (backend chatglm) is served from its deploy bundle; "
                "use --bundle models/deploy --base-only for the base alone"
            )
        model = load_frozen(directory, device())
        generation = Settings.of(generation)
        tokenizer = load_tokenizer(directory)
        backend = backends.for_base(Path(directory))
        fmt = prompts.format_for(preprocess, tokenizer, backend.chat_templates)
        bundle = Bundle(tokenizer, model, None, fmt, generation, backend)
        description = f"model `{directory}` (no prefix)"
        engine = cls(
            bundle,
            Path(directory).name,
            description,
            max_pending,
            max_batch=max_batch,
            own_process=own_process,
            child=child,
            summary="model directory (no prefix)",
        )
        return engine._ready()

    def _ready(self) -> "Engine":
        """Once a scheduler in a child process has loaded (a server is then ready for its first request); if that
        process ended instead, a thread decodes."""
        started = self.scheduler
        wait = getattr(started, "wait_ready", None)
        if wait is not None and not wait():
            with self._fallback_lock:
                if self.scheduler is started:  # else the reader has handed over already, as the pipe closed
                    log.warning("the scheduler's process ended at start (its error is above); decoding in a thread")
                    self.scheduler = self._thread_scheduler()
        return self

    def _thread_scheduler(self) -> batching.Scheduler:
        from .batching import Scheduler

        return Scheduler(
            *self._scheduler_args(self.scheduler.max_batch),
            after_step=self._wakes.flush,
            tokenizer=self.bundle.tokenizer,
        )

    @property
    def available(self) -> bool:
        """Whether a request now would be answered: not while the scheduler's process has ended and no thread has
        taken over (a moment, or for good with $PTUNE_SERVE_FALLBACK=none). /health says so."""
        return not getattr(self.scheduler, "ended", False)

    def _fall_back(self) -> None:
        """If the scheduler's process has ended: a thread decodes from now on (logged once), unless
        $PTUNE_SERVE_FALLBACK=none. Called by the process's reader when its pipe closes and by a request that found
        the process ended, whichever comes first; requests meanwhile wait on the lock for the thread (a moment: it
        loads nothing, the model is this process's own), none for the process."""
        with self._fallback_lock:
            dead = self.scheduler
            if getattr(dead, "ended", False) and not self._lost:
                if self._fallback == scheduler_process.THREAD:
                    self.scheduler = self._thread_scheduler()  # should this fail, the next request tries again
                    log.warning(
                        "the scheduler's process has ended (exit code %s; -9 is SIGKILL, e.g. the kernel's OOM "
                        "killer): its answers in flight failed; decoding in a thread from now on (slower under many "
                        "clients; restart the server to get the process back)",
                        dead.exitcode,
                    )
                else:
                    log.warning(
                        "the scheduler's process has ended (exit code %s) and %s=none: every request is refused "
                        "(503) and /health says unavailable; restart the server",
                        dead.exitcode,
                        scheduler_process.FALLBACK_ENV,
                    )
                self._lost = True

    def set_defaults(
        self,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Override each bundle's generation defaults (what a request that names none gets); checked as a request."""
        for v in self.variants.values():
            s = self.settings(max_new_tokens, temperature, top_p, do_sample, seed, model=v.name)
            v.defaults = dataclasses.replace(s, seed=seed)

    def variant(self, model: str | None = None) -> Variant:
        """The served model a request names (None: the first, the default); another name is refused (404)."""
        if model is None:
            return self.default
        found = self.variants.get(model)
        if found is None:
            raise RequestError(
                f"model {model!r} is not served here; this server serves {', '.join(map(repr, self.variants))} "
                "(GET /v1/models)",
                "model",
                status=404,
                code="model_not_found",
            )
        return found

    # The default model's: what one bundle's server always had.
    @property
    def name(self) -> str:
        return self.default.name

    @property
    def description(self) -> str:
        if len(self.variants) == 1:
            return self.default.description
        return "; ".join(f"{v.name}: {v.description}" for v in self.variants.values())

    @property
    def summary(self) -> str:
        return self.default.summary

    @property
    def prompter(self) -> prompts.Prompter:
        return self.default.prompter

    @property
    def stop_ids(self) -> list[int]:
        return self.default.stop_ids

    @property
    def prefix_length(self) -> int:
        return self.default.prefix_length

    @property
    def defaults(self) -> Settings:
        return self.default.defaults

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def supports_system(self) -> bool:
        """Whether the default model's prompt format has a place for a system message (`variant(name).prompter` for
        another's)."""
        return self.prompter.supports_system

    @property
    def logprobs(self) -> bool:
        """Whether answers can come with log-probabilities: the transformers backend's can (ChatGLM-6B's remote code
        is not checked for them; its backend says it cannot)."""
        return self.backend.logprobs

    @property
    def silent_ids(self) -> frozenset[int]:
        return self.silent(None)

    def silent(self, model: str | None) -> frozenset[int]:
        """Tokens that never reach an answer's text (its decoding skips special tokens): the end of turn (of that
        model's prompt format), and tokens a tokenizer adds as special (the tiny test model's byte tokens are).
        Log-probabilities leave them out."""
        v = self.variant(model)
        if v.silent is None:
            tok = self.bundle.tokenizer
            added = getattr(tok, "added_tokens_decoder", {}) or {}
            special = {i for i, t in added.items() if getattr(t, "special", False)}
            v.silent = frozenset(v.stop_ids) | frozenset(tok.all_special_ids) | frozenset(special)
        return v.silent

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (generation.token_bytes), kept once looked up (the vocabulary bounds them). Called
        on the event loop: a lookup takes no lock (it reads the tokenizer's vocabulary only)."""
        found = self._token_bytes.get(token)
        if found is None:
            found = self._token_bytes[token] = self._bytes_lookup()(token)
        return found

    def _bytes_lookup(self):
        if self._bytes_of is None:
            with self._tokenize_lock:  # it encodes a little text, which must not overlap another tokenization
                self._bytes_of = self._bytes_of or token_bytes(self.bundle.tokenizer)
        return self._bytes_of

    def _stop_check(self, stop: tuple[str, ...]):
        """The check of a request's stop strings, built here under the tokenizer's lock (building one encodes text,
        which must not overlap another tokenization of this tokenizer) rather than in a generating thread."""
        if not stop:
            return None
        with self._tokenize_lock:
            return stop_check(self.bundle.tokenizer, stop)

    def settings(
        self,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        do_sample: bool | None = None,
        seed: int | None = None,
        stop: str | list[str] | tuple[str, ...] | None = None,
        logprobs: int | None = None,
        model: str | None = None,
    ) -> Settings:
        """Request settings over the bundle's defaults (`model`'s: None, the first); temperature 0 means greedy, as in
        OpenAI's API. `stop`: a string or up to MAX_STOP strings the answer ends before; `logprobs`: None, or how
        many likeliest tokens to report with each token's log-probability (0 to MAX_TOP_LOGPROBS)."""
        v = self.variant(model)
        d = v.defaults
        if do_sample is None:
            do_sample = d.do_sample if temperature is None and top_p is None else temperature != 0
        if temperature == 0:
            do_sample = False
        if max_new_tokens is not None:
            self._check_max_new_tokens(max_new_tokens, v)
        check_seed(seed)
        check_sampling(temperature, top_p)  # every front end's numbers pass here (limits.py)
        stop = check_stop(stop)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs {logprobs}: must be 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
        if logprobs is not None and not self.logprobs:
            raise RequestError(
                f"logprobs: this model's backend ({self.backend.name}) cannot return log-probabilities; leave "
                "`logprobs` out",
                "logprobs",
            )
        return Settings(
            max_new_tokens=max_new_tokens or d.max_new_tokens,
            do_sample=do_sample,
            top_p=d.top_p if top_p is None else top_p,
            temperature=d.temperature if not temperature else temperature,
            seed=d.seed if seed is None else seed,
            stop=stop,
            logprobs=logprobs,
        )

    def _check_max_new_tokens(self, max_new_tokens: int, v: Variant) -> None:
        room = self.context_length - v.prefix_length - 1
        if not 1 <= max_new_tokens <= room:
            raise RequestError(
                f"max_new_tokens {max_new_tokens}: must be 1 to {room} (the model's context of "
                f"{self.context_length} tokens less the prefix and one prompt token)",
                "max_new_tokens",
            )

    def prompt_ids(
        self, query: str, history: History, max_new_tokens: int, system: str | None = None, model: str | None = None
    ) -> tuple[list[int], int]:
        """Token ids of the prompt and how many of the latest history rounds fit the context with the answer.

        Built by prompts.Prompter, as preprocess built the training data: the oldest rounds are dropped first; the
        message itself must fit.
        """
        v = self.variant(model)
        if not query.strip():
            raise RequestError("the message is empty; send some text to answer", "prompt")
        if system and not v.prompter.supports_system:
            kind = v.prompter.format.kind
            what = f"{kind} without {{system}}" if kind == prompts.TEMPLATE else kind
            raise RequestError(
                f"a system message was given, but this model's prompt format ({what}) has no place "
                "for one; send user and assistant messages only",
                "messages",
            )
        budget = self.context_length - v.prefix_length - max_new_tokens
        turn = prompts.Turn.of(query, list(history), system)
        try:
            with self._tokenize_lock:
                return v.prompter.fit(turn, budget, chat=True)
        except prompts.TooLong as exc:
            raise RequestError(
                f"the message is {exc.tokens} tokens with its prompt format, but the model's context of "
                f"{self.context_length} tokens leaves {budget} for it after the prefix ({v.prefix_length}) "
                f"and the answer (max_new_tokens {max_new_tokens}); shorten it or ask for fewer new tokens",
                "prompt",
                code="context_length_exceeded",
            ) from None
        except prompts.PromptError as exc:
            raise RequestError(str(exc), exc.param) from None

    def start(
        self,
        query: str,
        history: History = (),
        settings: Settings | None = None,
        system: str | None = None,
        max_length: int | None = None,
        model: str | None = None,
    ) -> Reply:
        """Check and tokenize the request now (raising RequestError), then generate in a worker thread.

        The caps are checked first (counting characters only), then the request counts as pending (Busy past
        max_pending), and only then is its prompt tokenized. `max_length`: prompt and answer together, as ChatGLM's
        api.py counts (the answer gets what the prompt leaves), instead of the settings' max_new_tokens. `model`:
        which served model answers (None: the default).
        """
        return self.start_choices(query, history, settings, system, 1, max_length, model)[0]

    def start_choices(
        self,
        query: str,
        history: History = (),
        settings: Settings | None = None,
        system: str | None = None,
        n: int = 1,
        max_length: int | None = None,
        model: str | None = None,
    ) -> list[Reply]:
        """`start` for `n` answers to one prompt (OpenAI's `n`): tokenized once, its n rows sent to the scheduler
        together, each counted as pending. Answer i is seeded with the settings' seed + i (modulo 2**63), so the
        first is the answer the request gives with n 1; without a seed each draws its own."""
        v = self.variant(model)
        settings = settings or self.settings(model=v.name)
        check_conversation(query, history, system, self.limits)
        if not 1 <= n <= max(1, self.max_pending):  # more could never be taken: not busy, refused
            raise RequestError(f"n {n}: must be 1 to {self.max_pending} (the server's --max-pending)", "n")
        with self._count_lock:
            if self._pending + n > self.max_pending:
                raise Busy(self._pending)
            self._pending += n
        try:
            if max_length is not None:
                prompt_len = len(self.prompt_ids(query, history, 1, system, v.name)[0])
                if max_length - prompt_len < 1:
                    raise RequestError(
                        f"max_length {max_length} leaves no room for an answer after the {prompt_len}-token prompt",
                        "max_length",
                    )
                self._check_max_new_tokens(max_length - prompt_len, v)
                settings = dataclasses.replace(settings, max_new_tokens=max_length - prompt_len)
            ids, used = self.prompt_ids(query, history, settings.max_new_tokens, system, v.name)
        except BaseException:
            with self._count_lock:
                self._pending -= n
            raise
        if self.log_prompts:
            prompt_log.info("prompt %s", json.dumps({"model": v.name, "prompt_token_ids": ids, "history_used": used}))
        try:
            check = self._stop_check(settings.stop)
            if settings.logprobs is not None:
                self._bytes_lookup()  # here, in a worker thread, not on the event loop when the answer is written
        except BaseException:
            with self._count_lock:
                self._pending -= n
            raise
        choices = [
            dataclasses.replace(settings, seed=(settings.seed + i) % (MAX_SEED + 1))
            if i and settings.seed is not None
            else settings
            for i in range(n)
        ]
        replies = [Reply(self.bundle.tokenizer, threading.Event(), len(ids), used, settings.stop) for _ in choices]
        if self.scheduler is not None:
            for i, (reply, own) in enumerate(zip(replies, choices, strict=True)):
                try:
                    self._submit(reply, ids, own, check, v)
                except BaseException:  # e.g. the scheduler's process has ended: these are not pending
                    for sent in replies[:i]:
                        sent.cancel()  # their rows end (and stop counting) at the scheduler's next step
                    with self._count_lock:
                        self._pending -= n - i
                    raise
            return replies
        for reply, own in zip(replies, choices, strict=True):
            threading.Thread(
                target=self._generate, args=(reply, ids, own, check, v), daemon=True, name="ptune-generate"
            ).start()
        return replies

    def complete(
        self,
        query: str,
        history: History = (),
        settings: Settings | None = None,
        system: str | None = None,
        model: str | None = None,
    ) -> Reply:
        return self.start(query, history, settings, system, model=model).wait()

    def _submit(self, reply: Reply, ids: list[int], settings: Settings, check=None, v: Variant | None = None) -> None:
        """Queue the request for the scheduler; its tokens go to the reply as its row decodes them. `check`: its stop
        strings' check (`_stop_check`), for a scheduler in this process (one in its own builds its own)."""

        wakes = self._wakes
        v = v or self.default

        def on_done(new: list[int], error: BaseException | None) -> None:  # in the scheduler's thread, as on_token
            try:
                self._finish(reply, new, settings, error, v)
            except Exception as exc:  # e.g. tokens that do not decode: this answer fails (never looks complete)
                reply.fail(exc)
            finally:
                with self._count_lock:
                    self._pending -= 1
                wakes.end(reply)

        def on_token(token: int, info: tuple | None = None) -> None:  # in the scheduler's thread; readers are
            wakes.token(reply, token, info)  # woken after the step

        from .batching import Row  # as Scheduler: only where there is a scheduler

        kwargs = generation_kwargs(settings, self.bundle.tokenizer, v.stop_ids)
        row = Row(
            ids,
            settings.max_new_tokens,
            kwargs,
            settings.seed,
            reply.cancel_event,
            on_token,
            on_done,
            stop=settings.stop,
            logprobs=settings.logprobs,
            prefix=v.name,
            stop_ids=v.stop_ids,
        )
        row.stop_check = check
        scheduler = self.scheduler
        reply.on_cancel(lambda: scheduler.cancel(row))  # reads `scheduler` when called: the one the row went to
        try:
            scheduler.submit(row)
        except scheduler_process.Ended:  # the process has ended: the reader may not have seen it yet
            dead = scheduler
            self._fall_back()
            scheduler = self.scheduler  # the thread _fall_back put there, or still the dead process (none)
            if scheduler is dead:
                raise Unavailable() from None
            scheduler.submit(row)

    def _finish(
        self, reply: Reply, new: list[int], settings: Settings, error: BaseException | None, v: Variant
    ) -> None:
        if error is not None:
            reply.fail(error)
            return
        reply.completion_tokens = len(new)
        text = self.bundle.tokenizer.decode(new, skip_special_tokens=True)
        cut = first_stop(text, settings.stop)
        reply.text = (text if cut is None else text[:cut]).strip()
        if cut is not None:  # a reader that streams it may have stopped it on seeing the stop string: not a cancel
            reply.finish_reason = "stop"
        elif reply.cancelled:
            reply.finish_reason = "cancelled"
            log.info("generation cancelled after %d new tokens", len(new))
        elif new and new[-1] in v.stop_ids:
            reply.finish_reason = "stop"
        elif len(new) >= settings.max_new_tokens:
            reply.finish_reason = "length"

    def _generate(self, reply: Reply, ids: list[int], settings: Settings, check=None, v: Variant | None = None) -> None:
        """One at a time (a backend without `batched_scheduler`, or max_batch 1): the backend's generate, the loop
        evaluate's batches run, seeded per request instead of per batch, behind a lock."""
        bundle = self.bundle
        v = v or self.default
        try:
            with self._generate_lock:
                if reply.cancelled:
                    reply.finish_reason = "cancelled"
                    log.info("generation cancelled after 0 new tokens (before its turn came)")
                    return
                kwargs = generation_kwargs(settings, bundle.tokenizer, v.stop_ids)
                kwargs.update(reply.hooks(check, settings.logprobs))
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)  # under the lock: no other request draws from the RNG
                new = self.backend.generate(bundle.model, v.encoder, bundle.tokenizer, [ids], kwargs)[0].tolist()
            self._finish(reply, new, settings, None, v)
        except BaseException as exc:  # handed to the reader, who re-raises it
            log.exception("generation failed")
            reply.fail(exc)
        finally:
            with self._count_lock:
                self._pending -= 1
            reply.end()
