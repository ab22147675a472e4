"""What the servers refuse before doing any work for a request, in one place.

Every front end (`ptune serve api`, `ptune serve web`, `ptune chat`) reaches the model through the engine, and the
engine tokenizes a conversation before it generates; a request that is cheap to send must not be expensive to
refuse. So, before anything parses, tokenizes or queues it:

- `BodyLimit`: a request body over its byte limit gets 413 before anything reads it into memory (both servers).
- `require_json`: a POST body must say `Content-Type: application/json` (415 otherwise). Browsers send the "simple"
  types (text/plain, form encodings) from any web page without asking the server first (no CORS preflight), so
  without this check any page a user of the machine opens could make the API generate; with it, a browser must ask
  first, and the API grants no other origin.
- `check_conversation`: at most `max_rounds` history rounds (400) and `max_chars` characters in all (413): bounds the
  tokenization work of one request, whatever the body limit lets through. Defaults far above real chats (a context
  of a few thousand tokens holds a few dozen rounds at most); `--max-rounds` and `--max-chars` change them.
- `check_seed`: a seed torch takes (0 to 2**63 - 1), not a server error later.
- `check_sampling`: a finite top_p and temperature, the temperature 0 (greedy) or at least MIN_TEMPERATURE: the
  model's scores are divided by it, and by 1e-45 or 1e-300 they overflow to inf and NaN, which fails the generation
  itself (a server error); NaN fails every comparison, so finiteness is checked by name.
- `check_stop`: at most MAX_STOP stop strings, each of 1 to MAX_STOP_CHARS characters: every request's strings are
  matched against the whole vocabulary once (transformers' StopStringCriteria), a cost that grows with their length.
- `check_text`: text without lone UTF-16 surrogates ("\\ud800" is valid JSON, but not Unicode): the tokenizer, the
  answer's JSON and the page's JSON cannot encode them, and would fail as a server error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Far above any prompt a context of a few thousand tokens can take; bounds what one request makes a server read.
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_ROUNDS = 64
DEFAULT_MAX_CHARS = 32_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
# OpenAI's own limit on stop strings; a stop string longer than this is no stop string any client sends.
MAX_STOP = 4
MAX_STOP_CHARS = 256
# The most alternatives a token's log-probability comes with (OpenAI allows 20; vLLM's default cap is 20 too).
MAX_TOP_LOGPROBS = 5
# The lowest temperature but 0 (greedy): below it sampling differs from greedy decoding only between near-ties,
# while the scores divided by it head for overflow (by 1e-45 they are inf).
MIN_TEMPERATURE = 0.01


class RequestError(ValueError):
    """A request the engine cannot answer as asked; `status` is the HTTP status a server should return."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Limits:
    """How much conversation one request may bring (the servers' --max-rounds and --max-chars)."""

    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_chars: int = DEFAULT_MAX_CHARS

    @property
    def body_bytes(self) -> int:
        """The largest request body a server reads: room for max_chars characters as JSON-escaped text."""
        return max(MAX_BODY_BYTES, 12 * self.max_chars + (64 << 10))


def conversation_chars(query: str, history, system: str | None = None) -> int:
    return len(query) + sum(len(q) + len(a) for q, a in history) + len(system or "")


def check_conversation(
    query: str, history, system: str | None, limits: Limits, history_param: str = "history", query_param: str = "prompt"
) -> None:
    """Refuse a conversation over the caps, naming the cap and the server option that raises it. Counting only:
    no tokenization, so it is safe to run before a request waits for anything."""
    rounds = len(history)
    if rounds > limits.max_rounds:
        raise RequestError(
            f"the history has {rounds} rounds; this server takes at most {limits.max_rounds} (its --max-rounds "
            "option); send only the latest rounds (older ones would not fit the model's context anyway)",
            history_param,
            code="too_many_rounds",
        )
    chars = conversation_chars(query, history, system)
    if chars > limits.max_chars:
        raise RequestError(
            f"the conversation is {chars} characters (message, history and system message); this server takes "
            f"at most {limits.max_chars} (its --max-chars option); shorten it or send fewer rounds",
            query_param if len(query) > limits.max_chars else history_param,
            status=413,
            code="conversation_too_long",
        )
    check_text(query, query_param, "the message")
    check_text(system or "", history_param, "the system message")
    for i, (q, a) in enumerate(history):
        check_text(q, history_param, f"history round {i}'s question")
        check_text(a, history_param, f"history round {i}'s answer")


def latest_rounds(query: str, history, system: str | None, limits: Limits) -> list[tuple[str, str]]:
    """The latest rounds of a conversation that a front end keeps itself (the terminal chat, the web page) within
    the caps: the oldest go first, as they would from the prompt. The message itself is checked by
    check_conversation."""
    kept: list[tuple[str, str]] = []
    room = limits.max_chars - len(query) - len(system or "")
    for q, a in reversed(list(history)[-limits.max_rounds :]):
        room -= len(q) + len(a)
        if room < 0:
            break
        kept.append((q, a))
    return kept[::-1]


def check_seed(seed: int | None, param: str = "seed") -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed {seed}: must be 0 to {MAX_SEED} (2**63 - 1)", param)


def check_sampling(temperature: float | None, top_p: float | None) -> None:
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError(f"top_p {top_p}: must be > 0 and <= 1", "top_p")
    if temperature is None:
        return
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError(f"temperature {temperature}: must be a number >= 0 (0: greedy decoding)", "temperature")
    if 0 < temperature < MIN_TEMPERATURE:
        raise RequestError(
            f"temperature {temperature}: must be 0 (greedy decoding) or at least {MIN_TEMPERATURE}; a smaller one "
            "makes the model's scores overflow when divided by it (for the likeliest answer, use 0)",
            "temperature",
        )


def check_stop(stop, param: str = "stop") -> tuple[str, ...]:
    """The stop strings of a request (a string, a list of strings, or None) as a tuple, refused naming the value
    where they are not 1 to MAX_STOP strings of 1 to MAX_STOP_CHARS characters."""
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list | tuple) or not all(isinstance(s, str) for s in strings):
        raise RequestError(f"{param} {stop!r}: must be a string or a list of strings", param)
    if len(strings) > MAX_STOP:
        raise RequestError(f"{param}: {len(strings)} stop strings; at most {MAX_STOP} are taken", param)
    for i, s in enumerate(strings):
        where = param if isinstance(stop, str) else f"{param}.{i}"
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise RequestError(
                f"{where} {s[:40]!r}{'...' if len(s) > 40 else ''}: a stop string must be 1 to {MAX_STOP_CHARS} "
                "characters",
                where,
            )
        check_text(s, where, "the stop string")
    return tuple(dict.fromkeys(strings))  # the same string twice is the same stop


def check_text(text: str, param: str, what: str) -> None:
    """Refuse a lone surrogate, naming where it is (one pass in C: encoding to UTF-8 stops at the first one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{what} holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is "
            "not text; send valid Unicode (a surrogate pair, e.g. \\ud83d\\ude00, is fine)",
            param,
            code="invalid_text",
        ) from None


def require_json(content_type: str | None) -> None:
    """A POST body must be declared JSON: refuses what a web page can send cross-origin without a preflight."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise RequestError(
            f"the request body must be sent with the header `Content-Type: application/json`, not "
            f"{content_type!r}" + (" (none given)" if not content_type else "") + "; e.g. curl -H "
            "'Content-Type: application/json' -d '{...}'",
            "Content-Type",
            status=415,
            code="unsupported_media_type",
        )


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses it."""

    # The rest of a refused body is read and dropped up to this many bytes before the 413 goes out: a server that
    # closes with unread bytes resets the connection, and the client then loses the answer (or gets a broken pipe
    # while still sending). Past it the connection is cut, as for any abuse.
    DRAIN_BYTES = 64 << 20

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send, more=True)
        seen = 0

        class TooLarge(Exception):
            pass

        last = {}

        async def counted():
            nonlocal seen, last
            message = await receive()
            last = message
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except TooLarge:
            await self._too_large(scope, receive, send, more=last.get("more_body", False))

    async def _too_large(self, scope, receive, send, more: bool):
        from fastapi.responses import JSONResponse

        dropped = 0
        while more and dropped <= self.DRAIN_BYTES:
            message = await receive()
            dropped += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        message = f"the request body is over {self.max_bytes} bytes"
        body = {
            "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "body_too_large"},
            "status": 413,
        }
        await JSONResponse(body, status_code=413)(scope, receive, send)
