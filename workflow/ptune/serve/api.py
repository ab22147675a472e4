"""The HTTP API: the seed tutorials' `POST /` and an OpenAI-compatible chat API, over one engine.

- `POST /` with `{"prompt", "history": [[q, a], ...], "max_length", "max_new_tokens", "top_p", "temperature"}`
  answers `{"response", "history", "status": 200, "time"}` as ChatGLM's api.py does;
- `POST /v1/chat/completions` (`stream` true: server-sent events), `GET /v1/models`;
- `GET /health` (never needs the API key).

Every error is JSON, `{"error": {"message", "type", "param", "code"}, "status"}` (OpenAI's shape), with a 4xx
status for a bad request: validation 400, missing or wrong API key 401, unknown model or path 404, a body over
MAX_BODY_BYTES or a conversation over --max-chars 413, a body that is not `Content-Type: application/json` 415, busy
503 (what is refused before any work, and why: limits.py). A server error is 500 with a request id and no details;
the details go to the server's log under that id. With an API key, the interactive docs (/docs, /openapi.json) are
off: they would describe the API to anyone who can reach it.

A client that goes away stops its generation at the next decoding step, streaming or not.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PtuneError
from . import failures
from .engine import Engine, RequestError
from .limits import MAX_BODY_BYTES, BodyLimit, check_conversation, require_json
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


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; parameters this server does not implement are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: Any = None


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
    while not await reply.ended(DISCONNECT_POLL_S):
        if await request.is_disconnected():
            reply.cancel()
            await reply.ended()
            break
    return reply.result()


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
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
            }
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict:
        _check_model(engine, model_id)
        return _model_card(engine)

    # The generating endpoints are async too: they wait for their answer on the event loop, watching the client
    # (a worker thread tokenizes; the engine's own thread generates).
    @app.post("/", dependencies=auth)
    async def seed(request: Request, raw: Any = Depends(json_body)) -> dict:
        body = parse(SeedRequest, raw)
        history = [(q, a) for q, a in body.history]
        if body.max_length is not None and body.max_new_tokens is not None:
            raise RequestError("give max_length (prompt + answer) or max_new_tokens, not both", "max_length")
        settings = engine.settings(
            max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        # ChatGLM's max_length counts the prompt too: the engine measures it once the request counts as pending.
        reply = await run_in_threadpool(engine.start, body.prompt, history, settings, None, body.max_length)
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
        _check_model(engine, body.model)
        if body.n != 1:
            raise RequestError(f"n {body.n}: this server returns one choice per request", "n")
        if body.stop is not None:
            raise RequestError("stop sequences are not supported; leave `stop` out", "stop")
        query, history, system = messages_to_turn(body.messages)
        check_conversation(query, history, system, engine.limits, "messages", "messages")
        settings = engine.settings(
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        # A bad request raises here, before any byte is sent.
        reply = await run_in_threadpool(engine.start, query, history, settings, system)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(engine, reply, ident, created, usage, every),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        await answered(request, reply)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": engine.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": _finish(reply),
                    "logprobs": None,
                }
            ],
            "usage": _usage(reply),
        }

    return app


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "ptune"}


def _check_model(engine: Engine, model_id: str) -> None:
    if model_id != engine.name:
        raise RequestError(
            f"model {model_id!r} is not served here; this server serves {engine.name!r} (GET /v1/models)",
            "model",
            status=404,
            code="model_not_found",
        )


def _finish(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def _usage(reply: Reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


async def _sse(engine: Engine, reply: Reply, ident: str, created: int, include_usage: bool, every: float):
    """Chat completion chunks as server-sent events; a client that goes away stops the generation."""

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": engine.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    # A content chunk is the same JSON every time but for its text: made once, the text dumped into it per piece.
    head, tail = event({"content": "\0"}).split(json.dumps("\0"))
    try:
        yield event({"role": "assistant", "content": ""})
        try:
            async for piece in reply.pieces(every):  # on the event loop: no thread hop per piece
                yield head + json.dumps(piece, ensure_ascii=False) + tail
        except Exception as exc:  # headers are sent: report the failure in the stream, as OpenAI does
            yield f"data: {json.dumps(server_error(exc, 'generation failed'))}\n\n"
            return
        yield event({}, _finish(reply))
        if include_usage:
            last = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.name,
                "choices": [],
                "usage": _usage(reply),
            }
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        reply.cancel()
