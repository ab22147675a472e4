"""The HTTP API: the seed tutorials' `POST /` and an OpenAI-compatible chat API, over one engine.

- `POST /` with `{"prompt", "history": [[q, a], ...], "max_length", "max_new_tokens", "top_p", "temperature"}`
  answers `{"response", "history", "status": 200, "time"}` as ChatGLM's api.py does;
- `POST /v1/chat/completions` (`stream` true: server-sent events), `GET /v1/models`;
- `GET /health` (never needs the API key).

A server of several bundles (`--bundle NAME=PATH` repeated, `--serve-base`) lists them in `GET /v1/models`; a
request chooses one by OpenAI's `model` field, or `model` on `POST /` (absent there: the first bundle), and an
unknown name is a 404 naming those served. Each answer's `model` is the one that answered.

The chat endpoint takes what clients written for OpenAI or vLLM send: `stop` strings, `n` choices (up to --max-n,
seeded with seed + i), `logprobs` / `top_logprobs` (up to MAX_TOP_LOGPROBS) in OpenAI's shape, streamed or not, and a
system message where the prompt format has none as --system-message says (ApiOptions). Every other field is either
taken and ignored because it changes nothing about an answer here (IGNORED), taken only at the value that asks for
nothing (NEUTRAL), or refused with a 400 naming it: never silently not done.

Every error is JSON, `{"error": {"message", "type", "param", "code"}, "status"}` (OpenAI's shape), with a 4xx
status for a bad request: validation 400, missing or wrong API key 401, unknown model or path 404, a body over
MAX_BODY_BYTES or a conversation over --max-chars 413, a body that is not `Content-Type: application/json` 415, busy
503 (what is refused before any work, and why: limits.py). A server error is 500 with a request id and no details;
the details go to the server's log under that id. With an API key, the interactive docs (/docs, /openapi.json) are
off: they would describe the API to anyone who can reach it.

A client that goes away stops its generation at the next decoding step, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PtuneError
from . import failures
from .arguments import DROP, FOLD, ApiOptions
from .engine import Engine, RequestError
from .limits import MAX_BODY_BYTES, MAX_TOP_LOGPROBS, BodyLimit, check_conversation, require_json
from .reply_stream import Reply

__all__ = ["MAX_BODY_BYTES", "BodyLimit", "create_app"]

# How often a non-streaming request looks whether its client is still there while its answer is generated.
DISCONNECT_POLL_S = 0.05
# A stream's events are written at most this often ($PTUNE_STREAM_EVERY_S; 0: one per token): the tokens decoded
# meanwhile go out together in one event (the first and the last are never held back). On a small model each event
# costs the server about as much as the token did (bench/README.md); readers see no difference at 50 a second.
STREAM_EVERY_S = 0.02
STREAM_EVERY_ENV = "PTUNE_STREAM_EVERY_S"


def stream_every() -> float:
    value = os.environ.get(STREAM_EVERY_ENV)
    if not value:
        return STREAM_EVERY_S
    try:
        every = float(value)
    except ValueError:
        every = -1.0
    if not 0 <= every <= 10:
        raise PtuneError(f"{STREAM_EVERY_ENV}={value!r}: must be seconds from 0 (one event per token) to 10")
    return every


class SeedRequest(BaseModel):
    """ChatGLM's api.py request; unknown keys are ignored, as it ignores them."""

    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    history: list[Annotated[list[StrictStr], Field(min_length=2, max_length=2)]] = []
    max_length: StrictInt | None = Field(None, ge=1)
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    top_p: StrictFloat | None = None
    temperature: StrictFloat | None = None
    seed: StrictInt | None = None
    model: StrictStr | None = None  # not in ChatGLM's api.py: which served bundle answers (None: the first)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


# Fields of OpenAI's (and vLLM's) chat request that this server does not implement. IGNORED: taken and ignored, as
# they change nothing about an answer here (whom it is for, bookkeeping, billing, caching hints, tool calls in
# parallel where no tool is called). NEUTRAL: taken only at the values that ask for nothing (what OpenAI or vLLM does
# without them); any other value is refused with a 400 naming the field, as is any field in neither table. Null is
# taken for any field (OpenAI reads it as not given).
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "parallel_tool_calls",
    }
)
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # without tools, "auto" calls none either
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    # vLLM's own parameters, at vLLM's defaults (which are this server's behaviour)
    "best_of": (1,),
    "use_beam_search": (False,),
    "ignore_eos": (False,),
    "min_tokens": (0,),
    "stop_token_ids": ([],),
    "skip_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "priority": (0,),
}
# A message's fields besides role and content: `name` (a participant's name) is ignored, as the prompt formats have no
# place for it; the others (an assistant message echoed back from a completion carries `refusal`, `audio`,
# `function_call`, `tool_calls`, `annotations`) only when null or empty.
MESSAGE_IGNORED = frozenset({"name"})
MESSAGE_NEUTRAL: dict[str, tuple] = {
    "annotations": ([],),
    "tool_calls": ([],),
}
STREAM_IGNORED = frozenset({"include_obfuscation"})  # no padding to obfuscate the chunks' lengths is sent
STREAM_NEUTRAL: dict[str, tuple] = {"continuous_usage_stats": (False,)}  # vLLM's


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality without Python's True == 1 (`min_tokens: false` is no 0)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def check_fields(extra: dict[str, Any] | None, ignored: frozenset, neutral: dict[str, tuple], where: str = "") -> None:
    """Refuse (400, naming it) a field this server does not implement, unless it is taken and ignored or has the
    value that asks for nothing (null, for any field: OpenAI reads it as not given)."""
    for field, value in (extra or {}).items():
        name = f"{where}{field}"
        if field in ignored or value is None:
            continue
        if neutral.get(field):
            if any(_same(value, n) for n in neutral[field]):
                continue
            takes = " or ".join(json.dumps(n) for n in neutral[field])
            raise RequestError(
                f"{name} {json.dumps(value, ensure_ascii=False)[:80]}: not supported by this server, which takes "
                f"only {takes} here; leave `{field}` out (docs/serving.md lists what it does)",
                name,
                code="unsupported_parameter",
            )
        raise RequestError(
            f"`{name}` is not supported by this server; leave it out (docs/serving.md lists the fields it takes)",
            name,
            code="unsupported_parameter",
        )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields it does not list are checked by `check_fields`."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    n: StrictInt | None = None
    seed: StrictInt | None = None
    stop: Any = None  # a string or a list of them: checked by the engine (limits.check_stop)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def unsupported(self) -> None:
        """Refuse what this server does not implement (check_fields), in the body, its messages and stream_options."""
        check_fields(self.model_extra, IGNORED, NEUTRAL)
        for i, message in enumerate(self.messages):
            check_fields(message.model_extra, MESSAGE_IGNORED, MESSAGE_NEUTRAL, f"messages.{i}.")
        if self.stream_options is not None:
            check_fields(self.stream_options.model_extra, STREAM_IGNORED, STREAM_NEUTRAL, "stream_options.")

    def choices(self, max_n: int) -> int:
        n = 1 if self.n is None else self.n
        if not 1 <= n <= max_n:
            raise RequestError(f"n {n}: must be 1 to {max_n} (this server's --max-n)", "n")
        return n

    def top(self) -> int | None:
        """How many likeliest tokens to report with each token's log-probability; None: no log-probabilities."""
        top = self.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs {top}: must be 0 to {MAX_TOP_LOGPROBS} on this server", "top_logprobs")
        if not self.logprobs:
            if top:
                raise RequestError(
                    f"top_logprobs {top} needs `logprobs: true` (log-probabilities are off without it)", "top_logprobs"
                )
            return None
        return top or 0


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, "status": status}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        msg = err.get("msg", "invalid")
        parts.append(f"{where}: {msg}" if loc else f"the request body must be a JSON object: {msg}")
    return "; ".join(parts), first


def fold_system(system: str, query: str, history: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """--system-message fold: the system message before the first user message, a blank line between them (where
    chat templates without a system role put it)."""
    if history:
        first, answer = history[0]
        return query, [(f"{system}\n\n{first}", answer), *history[1:]]
    return f"{system}\n\n{query}", history


def messages_to_turn(messages: list[Message]) -> tuple[str, list[tuple[str, str]], str | None]:
    """OpenAI messages as (query, history, system): a system (or developer) message first, if any, then
    user/assistant pairs, then the user's new message."""
    history: list[tuple[str, str]] = []
    system: str | None = None
    pending: str | None = None
    for i, msg in enumerate(messages):
        if msg.role in ("system", "developer"):
            if i != 0:
                raise RequestError(
                    f"messages.{i}: a {msg.role} message must come first, before the conversation", f"messages.{i}.role"
                )
            system = msg.text()
        elif msg.role == "user":
            if pending is not None:
                raise RequestError(
                    f"messages.{i}: two user messages in a row; alternate user and assistant", f"messages.{i}.role"
                )
            pending = msg.text()
        else:
            if pending is None:
                raise RequestError(
                    f"messages.{i}: an assistant message must follow a user message", f"messages.{i}.role"
                )
            history.append((pending, msg.text()))
            pending = None
    if pending is None:
        raise RequestError("the last message must be the user's, the one to answer", "messages")
    return pending, history, system


async def json_body(request: Request) -> Any:
    """The body as JSON; it must say so (`Content-Type: application/json`, limits.require_json)."""
    require_json(request.headers.get("content-type"))
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", "body") from None
    except RecursionError:  # json.loads recurses once per level: 100,000 `[` exhaust the interpreter's stack
        raise RequestError(
            "the request body nests arrays or objects too deeply to read; no request needs more than a few levels",
            "body",
        ) from None


def parse(model: type[BaseModel], raw: Any):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def server_error(exc: BaseException, message: str = "the server failed to answer") -> dict:
    """A 500's body: a request id to quote, the details (exception and traceback) in the server's log only."""
    return error_body(500, failures.reported(exc, message), code="server_error")


async def answered(request: Request, reply: Reply) -> Reply:
    """Wait for a non-streaming answer without holding a worker thread (woken as soon as it ends); a client that
    goes away meanwhile stops its generation (at the next decoding step, or before it starts if it still waits for
    its turn)."""
    return (await all_answered(request, [reply]))[0]


async def all_answered(request: Request, replies: list[Reply]) -> list[Reply]:
    """`answered` for the choices of one request: a client that goes away stops them all."""
    for reply in replies:
        while not await reply.ended(DISCONNECT_POLL_S):
            if await request.is_disconnected():
                for r in replies:
                    r.cancel()
                for r in replies:
                    await r.ended()
                break
    return [reply.result() for reply in replies]


def create_app(engine: Engine, api_key: str | None = None, options: ApiOptions | None = None) -> FastAPI:
    """The API over `engine`; `api_key`: required of every client (None: open); `options`: the OpenAI endpoint's
    (--max-n, --system-message), else their defaults."""
    options = options or ApiOptions()
    every = stream_every()
    docs = api_key is None
    app = FastAPI(
        title="ptune API",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(BodyLimit, max_bytes=engine.limits.body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        return JSONResponse(server_error(exc), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise StarletteHTTPException(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(authorized)]

    # Cheap endpoints are async: they must answer even while every worker thread waits for the engine.
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Open, for probes that hold no key: whether the server can answer (200 ok, else 503 unavailable) and
        nothing more. With the key (or where none is set; a wrong one is refused, 401) also what it serves and how
        busy it is, never a local path (the engine's summary, not the description this machine's terminal shows)."""
        ok = engine.available
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        if api_key is None or "authorization" in request.headers:
            await authorized(request)
            body |= {
                "model": engine.name,
                "description": engine.summary,
                "pending": engine.pending,
                "context_length": engine.context_length,
                "prefix_length": engine.prefix_length,
                "models": [
                    {"id": v.name, "description": v.summary, "prefix_length": v.prefix_length}
                    for v in engine.variants.values()
                ],
            }
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        """Every served model, the default (the first --bundle) first."""
        return {"object": "list", "data": [_model_card(name) for name in engine.variants]}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict:
        return _model_card(engine.variant(model_id).name)

    # The generating endpoints are async too: they wait for their answer on the event loop, watching the client
    # (a worker thread tokenizes; the engine's own thread generates).
    @app.post("/", dependencies=auth)
    async def seed(request: Request, raw: Any = Depends(json_body)) -> dict:
        body = parse(SeedRequest, raw)
        history = [(q, a) for q, a in body.history]
        name = engine.variant(body.model).name  # 404 for a model not served here
        if body.max_length is not None and body.max_new_tokens is not None:
            raise RequestError("give max_length (prompt + answer) or max_new_tokens, not both", "max_length")
        settings = engine.settings(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            model=name,
        )
        # ChatGLM's max_length counts the prompt too: the engine measures it once the request counts as pending.
        reply = await run_in_threadpool(engine.start, body.prompt, history, settings, None, body.max_length, name)
        await answered(request, reply)
        return {
            "response": reply.text,
            "history": [list(p) for p in history] + [[body.prompt, reply.text]],
            "status": 200,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request, raw: Any = Depends(json_body)):
        body = parse(ChatRequest, raw)
        served = engine.variant(body.model)  # 404 for a model not served here
        name = served.name
        body.unsupported()
        n = body.choices(options.max_n)
        top = body.top()
        query, history, system = messages_to_turn(body.messages)
        headers: dict[str, str] = {}
        folded = False
        if system and not served.prompter.supports_system:
            if options.system_message == DROP:
                system = None
                headers["Warning"] = _warning(
                    "the system message was dropped: this model's prompt format has no place for one"
                )
            elif options.system_message == FOLD:
                query, history = fold_system(system, query, history)
                system, folded = None, True
            else:
                raise RequestError(
                    "a system message was given, but this model's prompt format has no place for one; send user and "
                    "assistant messages only (a server started with --system-message drop or fold takes it)",
                    "messages",
                )
        check_conversation(query, history, system, engine.limits, "messages", "messages")
        settings = engine.settings(
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            logprobs=top,
            model=name,
        )
        # A bad request raises here, before any byte is sent.
        replies = await run_in_threadpool(engine.start_choices, query, history, settings, system, n, None, name)
        if folded and history and replies[0].history_used < len(history):
            headers["Warning"] = _warning(
                "the system message was left out with the oldest rounds, which do not fit the model's context"
            )
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(engine, replies, ident, created, usage, every, top is not None, name),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **headers},
            )
        await all_answered(request, replies)
        answer = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": _finish(reply),
                    "logprobs": {"content": _entries(engine, reply.infos(), name)} if top is not None else None,
                }
                for i, reply in enumerate(replies)
            ],
            "usage": _usage(replies),
        }
        return JSONResponse(answer, headers=headers or None)

    return app


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ptune"}


def _finish(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def _usage(replies: list[Reply]) -> dict:
    """As OpenAI counts a request of n choices: its prompt once, the tokens of every choice."""
    prompt = replies[0].prompt_tokens
    completion = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _warning(text: str) -> str:
    """An HTTP `Warning` header's value (299: a persistent warning) from ptune."""
    return f'299 ptune "{text}"'


# OpenAI's stand-in for a log-probability too small to say (JSON has no -Infinity).
LEAST_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > LEAST_LOGPROB else LEAST_LOGPROB


def _token(engine: Engine, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI names it: its text, or where its bytes are only part of a character, `bytes:\\xe4...`;
    and its bytes."""
    raw = engine.token_bytes(token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, list(raw)


def _entries(engine: Engine, infos: list[tuple[int, tuple | None]], model: str | None = None) -> list[dict]:
    """OpenAI's `logprobs.content` for these tokens: each with its log-probability and its likeliest alternatives;
    tokens that are never part of the text (the end of turn, special tokens) are left out, so that the tokens' bytes
    add up to the answer as generated (before its surrounding whitespace is trimmed and a stop string cuts it)."""
    out = []
    silent = engine.silent(model)  # that model's end of turn: bundles' prompt formats may end turns differently
    for token, info in infos:
        if info is None or token in silent:
            continue
        logprob, top = info
        text, raw = _token(engine, token)
        alternatives = []
        for other, other_logprob in top:
            other_text, other_raw = _token(engine, other)
            alternatives.append({"token": other_text, "logprob": _logprob(other_logprob), "bytes": other_raw})
        out.append({"token": text, "logprob": _logprob(logprob), "bytes": raw, "top_logprobs": alternatives})
    return out


async def _sse(
    engine: Engine,
    replies: list[Reply],
    ident: str,
    created: int,
    include_usage: bool,
    every: float,
    logprobs: bool = False,
    model: str | None = None,
):
    """Chat completion chunks as server-sent events, those of several choices interleaved as their pieces come (each
    with its `index`); a client that goes away stops the generation."""

    def event(choices: list[dict], **extra) -> str:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model or engine.name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict, finish: str | None = None, content: list[dict] | None = None) -> dict:
        lp = None if content is None else {"content": content}
        return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}

    async def events(i: int, reply: Reply) -> AsyncIterator[str]:
        """One choice's content chunks (with the log-probabilities of the tokens decoded since the last one), then
        its finish chunk (with those of the tokens left)."""
        # Without log-probabilities a content chunk is the same JSON every time but for its text: made once, the
        # text dumped into it per piece.
        head, tail = event([choice(i, {"content": "\0"})]).split(json.dumps("\0"))
        sent = 0
        async for piece, seen in reply.chunks(every):  # on the event loop: no thread hop per piece
            if logprobs:
                yield event([choice(i, {"content": piece}, content=_entries(engine, reply.infos(sent, seen), model))])
                sent = seen
            else:
                yield head + json.dumps(piece, ensure_ascii=False) + tail
        yield event([choice(i, {}, _finish(reply), _entries(engine, reply.infos(sent), model) if logprobs else None)])

    try:
        for i in range(len(replies)):
            yield event([choice(i, {"role": "assistant", "content": ""})])
        try:
            async for chunk in _merged([events(i, reply) for i, reply in enumerate(replies)]):
                yield chunk
        except Exception as exc:  # headers are sent: report the failure in the stream, as OpenAI does
            yield f"data: {json.dumps(server_error(exc, 'generation failed'))}\n\n"
            return
        if include_usage:
            yield event([], usage=_usage(replies))
        yield "data: [DONE]\n\n"
    finally:
        for reply in replies:
            reply.cancel()


async def _merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The items of several async iterators as each comes (one: as it is, no task); the first error is raised at
    once (the others are stopped)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
