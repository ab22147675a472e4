"""The reply stream: one answer's tokens, from the thread that generates them to the readers that decode them.

The generating side (the scheduler's thread, or a worker thread running the backend's `generate`) only appends
token ids to a `Reply` (`push`, or `Wakes.token` for a whole decoding step) and says when it has ended (`end`,
`Wakes.end`); its readers decode them into text pieces, in their own threads or on the HTTP server's event loop
(`Reply.pieces`, `Reply.ended`): no thread per reader or per token, and the generating thread never decodes text.
`Wakes` wakes the readers of one decoding step together (one wake-up per event loop per step).

For the backend's own `generate` (one request at a time), `Reply.hooks()` gives the streamer that pushes its new
tokens into the reply and the stopping criterion that ends it once the reply is cancelled (or its text has reached a
stop string), and, where log-probabilities are asked for, the logits processor that records them.

A reply with stop strings never streams one, nor the start of one: text that could begin a stop string is held back
until the next tokens show that it does not (`_StopFilter`); once one is there, the text before it is the last
piece, and the generation is stopped (the engine cuts the whole text at the same place: the pieces always add up to
`text`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer

from ..model.generation import first_stop

__all__ = ["Reply", "Wakes"]


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Stopped(StoppingCriteria):
    """Ends the backend's own generate (one row) once its new tokens reach a stop string (`generation.stop_check`)."""

    def __init__(self, check: Callable[[Sequence[int]], bool]):
        self.check = check
        self.start: int | None = None  # where the new tokens begin in input_ids

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        # Asked first with one new token: what comes before it is the prompt (and the prefix's stand-ins).
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        done = self.check(input_ids[0, self.start :].tolist())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Recorder(LogitsProcessor):
    """Records the log-probabilities of each step's scores for the backend's own generate: generate applies the
    processors it is given before temperature and top-p, so these are the model's own, as the scheduler's are. The
    streamer pairs them with the token picked (`_Into`)."""

    def __init__(self, top: int):
        self.top = top
        self.step: torch.Tensor | None = None
        self.alternatives: list[tuple[int, float]] = []

    def __call__(self, input_ids, scores):
        lp = torch.log_softmax(scores[0].float(), dim=-1)
        self.step = lp
        if self.top:
            values, indices = torch.topk(lp, self.top)
            self.alternatives = list(zip(indices.tolist(), values.tolist(), strict=True))
        return scores

    def info(self, token: int) -> tuple[float, list[tuple[int, float]]] | None:
        if self.step is None:
            return None
        return float(self.step[token]), self.alternatives


class _Pieces(TextStreamer):
    """transformers' own streaming decode (whole words, CJK characters at once), collecting the text it finalizes."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.out: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.out.append(text)

    def feed(self, ids: list[int]) -> str:
        """Text finalized by these tokens, fed one by one as generate feeds a streamer."""
        for token in ids:
            self.put(_One(token))
        return self.take()

    def take(self) -> str:
        text, self.out = "".join(self.out), []
        return text


class _One:
    """One token as `TextStreamer.put` reads a tensor of one (its shape and `tolist`), without making a tensor: a
    torch call on the HTTP server's event loop would hand the GIL to the scheduler and wait to get it back."""

    shape = (1,)

    def __init__(self, token: int):
        self.token = token

    def tolist(self) -> list[int]:
        return [self.token]


class _Into:
    """The streamer handed to the backend's generate (one at a time): new tokens into the reply (the prompt skipped)."""

    def __init__(self, reply: "Reply", recorder: _Recorder | None = None):
        self.reply = reply
        self.prompt = True
        self.recorder = recorder

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.reply.push(token, None if self.recorder is None else self.recorder.info(token))

    def end(self) -> None:
        pass


class Reply:
    """One answer being generated: iterate for text pieces as they come (or `async for` over `pieces()`); then read
    `text` and the counts.

    The generating thread only appends token ids (`push`) and wakes whoever waits; the reader decodes them into
    text in its own thread (or event loop), taking every token that has come since it last looked at once: the
    scheduler's thread never decodes text, and nobody decodes a reply that is read whole. The generating side sets
    `text`, the counts and `finish_reason` (or `fail`s it), then calls `end`.
    """

    def __init__(
        self, tokenizer, cancel: threading.Event, prompt_tokens: int, history_used: int, stop: Sequence[str] = ()
    ):
        self._tokenizer = tokenizer
        self._cancel = cancel
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._ids: list[int] = []  # new tokens so far
        self._infos: list = []  # with each, its log-probabilities (batching.TokenInfo) or None
        self.stop = tuple(stop)  # strings the answer ends before (the engine cuts `text` there)
        self._lock = threading.Lock()
        self._waiters: list[tuple[int | None, Callable[[], None]]] = []  # (wake past this many ids or at the end, how)
        self._ended_future: asyncio.Future | None = None
        self._on_cancel: Callable[[], None] | None = None  # tells a scheduler in another process
        self.prompt_tokens = prompt_tokens
        self.history_used = history_used  # how many of the latest history rounds fitted into the context
        self.completion_tokens = 0
        self.finish_reason = "stop"  # "stop" (end of sequence), "length" (max_new_tokens), "cancelled"
        self.text = ""

    # -- the generating side ----------------------------------------------------------------------------------------

    def push(self, token: int, info: tuple | None = None) -> None:
        """A new token (and its log-probabilities, if asked for), its readers woken at once (`Wakes.token` wakes those
        of a whole step together)."""
        for wake in self._add(token, info):
            wake()

    def fail(self, error: BaseException) -> None:
        """The generation failed: readers get `error` raised once it has ended."""
        self._error = error

    def end(self) -> None:
        """The generation has ended (`text`, the counts and any error set): every reader is woken."""
        for wake in self._ending():
            wake()

    @property
    def cancelled(self) -> bool:
        """Whether a reader has cancelled it (the generating side stops before its next token)."""
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when a reader cancels: what a scheduler's row checks between decoding steps."""
        return self._cancel

    def on_cancel(self, call: Callable[[], None]) -> None:
        """Have `call` called when a reader cancels (it tells a scheduler in another process)."""
        self._on_cancel = call

    def hooks(self, stop_check: Callable[[Sequence[int]], bool] | None = None, logprobs: int | None = None) -> dict:
        """generate() arguments for the backend's own generate (one request at a time): a streamer that pushes its
        new tokens here (the prompt skipped), and stopping criteria that end it once the reply is cancelled or its
        tokens reach a stop string (`stop_check`); `logprobs` (alternatives per token; None: none): a logits
        processor that records each token's log-probabilities."""
        criteria = [_Cancelled(self._cancel)]
        if stop_check is not None:
            criteria.append(_Stopped(stop_check))
        recorder = None if logprobs is None else _Recorder(logprobs)
        hooks = {"streamer": _Into(self, recorder), "stopping_criteria": StoppingCriteriaList(criteria)}
        if recorder is not None:
            hooks["logits_processor"] = LogitsProcessorList([recorder])
        return hooks

    def _add(self, token: int, info: tuple | None = None) -> list[Callable[[], None]]:
        """Append a token; the wake-ups now due, for the caller to call (the scheduler calls those of a whole step
        together: `Wakes`)."""
        with self._lock:
            self._infos.append(info)
            self._ids.append(token)
            if not self._waiters:
                return []
            n = len(self._ids)
            due = [how for seen, how in self._waiters if seen is not None and n > seen]
            if due:
                self._waiters = [w for w in self._waiters if w[0] is None or n <= w[0]]
            return due

    def _ending(self) -> list[Callable[[], None]]:
        """The generation has ended (`text`, the counts and any error are set); every wake-up, for the caller to
        call."""
        with self._lock:
            self._done.set()
            waiters, self._waiters = self._waiters, []
        return [how for _, how in waiters]

    def _when(self, seen: int | None, how: Callable[[], None]) -> bool:
        """Have `how` called once there are more than `seen` tokens (None: only at the end) or the reply has ended;
        False, and nothing registered, if that is already so."""
        with self._lock:
            if self._done.is_set() or (seen is not None and len(self._ids) > seen):
                return False
            self._waiters.append((seen, how))
            return True

    # -- readers ------------------------------------------------------------------------------------------------------

    def _texts(self, decoder: _Pieces, seen: int) -> tuple[str, int, bool]:
        """The text of the tokens past `seen` (all of it once the reply has ended), the tokens seen, and whether it
        has ended."""
        ended = self._done.is_set()  # before reading the ids: every token of an ended reply is then there
        ids = self._ids[seen:]
        text = decoder.feed(ids)
        if ended:
            decoder.end()
            text += decoder.take()
        return text, seen + len(ids), ended

    def _raw(self) -> Iterator[tuple[str, int]]:
        decoder, seen = _Pieces(self._tokenizer), 0
        while True:
            event = threading.Event()
            if self._when(seen, event.set):
                event.wait()
            text, seen, ended = self._texts(decoder, seen)
            if text:
                yield text, seen
            if ended:
                return

    async def _araw(self, every: float = 0.0) -> AsyncIterator[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        decoder, seen, sent = _Pieces(self._tokenizer), 0, None
        while True:
            woken = loop.create_future()
            if self._when(seen, _waker(loop, woken)):
                await woken
            if sent is not None and every > 0:
                # Tokens that come within `every` of the last piece go out with it in one piece (the reply's end
                # is not held back).
                left = sent + every - loop.time()
                if left > 0:
                    await self.ended(left)
            text, seen, ended = self._texts(decoder, seen)
            if text:
                yield text, seen
                sent = loop.time()
            if ended:
                return

    def _body(self, trim: "_Trim", stops: "_StopFilter | None", piece: str) -> str:
        """A raw piece as the reader sends it: before any stop string (the generation is stopped once one has come,
        the rest dropped), without the answer's leading and trailing whitespace."""
        if stops is not None:
            found = stops.found
            piece = stops(piece)
            if stops.found and not found:
                self.cancel()  # the scheduler's own check has usually ended it already
        return trim(piece)

    def __iter__(self) -> Iterator[str]:
        """Text pieces whose concatenation is `text`: the answer without leading or trailing whitespace (and, with
        stop strings, without the first one and what follows)."""
        trim, stops = _Trim(), _StopFilter(self.stop) if self.stop else None
        for piece, _ in self._raw():
            if body := self._body(trim, stops, piece):
                yield body
        if stops is not None and (body := self._body(trim, None, stops.flush())):
            yield body
        if self._error is not None:
            raise self._error

    async def pieces(self, every: float = 0.0) -> AsyncIterator[str]:
        """The same text as iterating, for a reader on an event loop (no thread per reader or per token); `every`:
        after a piece, the next one waits that many seconds at most, with the tokens that came meanwhile (the
        first piece and the end are never held back)."""
        async for piece, _ in self.chunks(every):
            yield piece

    async def chunks(self, every: float = 0.0) -> AsyncIterator[tuple[str, int]]:
        """`pieces`, each with how many of the new tokens had been decoded when it was (for their log-probabilities:
        `infos`)."""
        trim, stops = _Trim(), _StopFilter(self.stop) if self.stop else None
        seen = 0
        async for piece, seen in self._araw(every):
            if body := self._body(trim, stops, piece):
                yield body, seen
        if stops is not None and (body := self._body(trim, None, stops.flush())):
            yield body, seen
        if self._error is not None:
            raise self._error

    async def ended(self, timeout: float | None = None) -> bool:
        """Wait on an event loop until the generation has ended, at most `timeout` seconds; whether it has."""
        if self._ended_future is None:
            loop = asyncio.get_running_loop()
            self._ended_future = loop.create_future()
            if not self._when(None, _waker(loop, self._ended_future)):
                return True
        await asyncio.wait({self._ended_future}, timeout=timeout)  # on a timeout the future stays, for the next call
        return self.done

    @property
    def token_ids(self) -> list[int]:
        """The new tokens so far (all of them once `done`), the stop token included."""
        return list(self._ids)

    def infos(self, start: int = 0, end: int | None = None) -> list[tuple[int, tuple | None]]:
        """The new tokens from `start` to `end`, each with its log-probabilities (None where not asked for):
        (log-probability, [(id, log-probability) of the likeliest tokens])."""
        with self._lock:
            return list(zip(self._ids[start:end], self._infos[start:end], strict=True))

    def cancel(self) -> None:
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def done(self) -> bool:
        """Whether the generation has ended: `text` and the counts are final (see `result`)."""
        return self._done.is_set()

    def result(self) -> "Reply":
        """Once `done`: self, or the generation's error raised (for readers that wait without reading the stream)."""
        if self._error is not None:
            raise self._error
        return self

    def wait(self) -> "Reply":
        """Wait for the end of the generation (without decoding its pieces); returns self with `text` and the counts
        set, or raises its error."""
        self._done.wait()
        return self.result()


class _LoopWake:
    """A wake-up the generating thread may call: resolves a future on its event loop (unless cancelled or closed)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop = loop
        self.future = future

    def __call__(self) -> None:
        _call_soon(self.loop, _resolve, self.future)


def _waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> _LoopWake:
    return _LoopWake(loop, future)


def _call_soon(loop: asyncio.AbstractEventLoop, *args) -> None:
    try:
        loop.call_soon_threadsafe(*args)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


class Wakes:
    """The scheduler's tokens and ends of one step handed over together: each row's token is appended at once, and
    the readers are woken after the step (`flush`), those on one event loop with one call (one wake-up of the HTTP
    server's loop per step, not one per row)."""

    def __init__(self):
        self._due: list[Callable[[], None]] = []

    def token(self, reply: "Reply", token: int, info: tuple | None = None) -> None:
        self._due.extend(reply._add(token, info))

    def end(self, reply: "Reply") -> None:
        self._due.extend(reply._ending())

    def flush(self) -> None:
        due, self._due = self._due, []
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for wake in due:
            if isinstance(wake, _LoopWake):
                loops.setdefault(wake.loop, []).append(wake.future)
            else:
                wake()
        for loop, futures in loops.items():
            _call_soon(loop, _resolve_all, futures)


def _resolve_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        _resolve(future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _StopFilter:
    """Pieces up to the first stop string: text that could be the start of one is held back until the next piece
    shows whether it is; once one has come (`found`), the text before it is the last that passes. `flush`: what is
    held back at the end (no stop string came)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.found = False

    def __call__(self, piece: str) -> str:
        if self.found:
            return ""
        text = self.held + piece
        at = first_stop(text, self.stop)
        if at is not None:
            self.found, self.held = True, ""
            return text[:at]
        keep = 0  # the longest end of the text that some stop string begins with
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.found else held


class _Trim:
    """Pieces without the answer's leading whitespace, holding back whitespace that may turn out to be trailing."""

    def __init__(self):
        self.held = ""
        self.started = False

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        piece = self.held + piece
        body = piece.rstrip()
        self.held = piece[len(body) :]
        return body
