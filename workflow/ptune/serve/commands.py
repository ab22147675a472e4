"""`ptune serve web|api` and `ptune chat`: their arguments, the safety warnings, and how each one starts."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import PtuneError
from ..model import legacy_env
from ..paths import DEPLOY
from . import scheduler_process
from .edge import (
    ALLOWED_HOSTS_OPTION,
    ALLOWED_ORIGINS_OPTION,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT_S,
    AllowedHosts,
    Edge,
    allowed_origins,
)
from .limits import DEFAULT_MAX_CHARS, DEFAULT_MAX_ROUNDS, Limits

log = logging.getLogger(__name__)

DEFAULT_BUNDLE = str(DEPLOY)
API_KEY_ENV = "PTUNE_API_KEY"
WEB_AUTH_ENV = "PTUNE_WEB_AUTH"
# ptune.bundle.MANIFEST, named here because importing that module loads torch (seconds) before a quick check.
BUNDLE_MANIFEST = "bundle.json"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to load")
    group.add_argument(
        "--bundle",
        default=DEFAULT_BUNDLE,
        help="deploy bundle to serve (default: %(default)s, written by `ptune deploy`)",
    )
    group.add_argument(
        "--base-only", action="store_true", help="serve the bundle's base model without its prefix, to compare"
    )
    group.add_argument(
        "--model",
        metavar="DIR",
        help="serve a plain transformers model directory instead of a bundle (e.g. models/base); "
        "its prompt format (preprocess) and generation settings (deploy) come from --params",
    )
    group.add_argument(
        "--base",
        metavar="DIR",
        help="the bundle's base model from this folder, instead of finding it by the bundle's record (the project's "
        "models/base, the hub's cache, or a download); its weights must be the ones the bundle records",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a base whose weights are pickles (*.bin), which can run code when read (for the project's own "
        "models/base, params.yaml's fetch_weights.allow_pickle is enough); a record inside a folder never counts",
    )
    group.add_argument(
        "--max-pending",
        type=int,
        default=32,
        help="requests running or waiting at once; more are refused as busy (default: %(default)s)",
    )
    group.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded together (continuous batching; transformers-native models; 1: one at a time) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a ChatGLM-6B base ships (a bundle's base other than the project's models/base, "
        "whose consent is params.yaml's fetch_weights.trust_remote_code); a record inside a folder never counts",
    )
    group.add_argument(
        "--log-prompts",
        action="store_true",
        help="log each request's prompt token ids (JSON, on stderr): what the model reads",
    )
    caps = parser.add_argument_group("what one request may bring (refused past them, before any work)")
    caps.add_argument(
        "--max-rounds",
        type=int,
        default=DEFAULT_MAX_ROUNDS,
        help="earlier rounds of a conversation; the terminal and the web page send their latest ones "
        "(default: %(default)s)",
    )
    caps.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_MAX_CHARS,
        help="characters of a conversation: message, history and system message (default: %(default)s)",
    )
    gen = parser.add_argument_group("generation defaults (a request may override them; unset: the bundle's)")
    gen.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")
    choice = gen.add_mutually_exclusive_group()
    choice.add_argument(
        "--sample", dest="do_sample", action="store_true", default=None, help="sample with top_p and temperature"
    )
    choice.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int, help="seed each answer with this, for answers that repeat when sampling")


def _add_host_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only); "
        "0.0.0.0 opens it to every network the machine is on",
    )
    parser.add_argument("--port", type=int, default=port, help="port (default: %(default)s; 0: any free port)")
    edge = parser.add_argument_group("who may connect, and for how long")
    edge.add_argument(
        ALLOWED_HOSTS_OPTION,
        metavar="NAME[,NAME]",
        action="append",
        default=[],
        help="also answer requests for these host names (repeatable): a reverse proxy's public name; IP addresses, "
        "localhost, this machine's names and --host's are always answered, any other name gets 400 (DNS "
        "rebinding); '*' answers any name",
    )
    edge.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections at once; a request on one more gets 503 (default: %(default)s)",
    )
    edge.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        metavar="SECONDS",
        help="time a client has to send a whole request, headers and body; slower connections are closed "
        "(default: %(default)s)",
    )
    edge.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=DEFAULT_KEEP_ALIVE_S,
        metavar="SECONDS",
        help="time an idle connection stays open between two requests (default: %(default)s)",
    )


def add_parsers(sub) -> None:
    """Add `serve` (with `web` and `api`) and `chat` to the `ptune` command's subparsers."""
    serve = sub.add_parser(
        "serve",
        help="talk to the model over the web (Gradio) or HTTP (FastAPI)",
        description="Serve the P-tuned model from its deploy bundle (or the base model alone).",
    )
    fronts = serve.add_subparsers(dest="frontend", metavar="FRONTEND", required=True)
    web = fronts.add_parser(
        "web",
        help="Gradio chat page with streaming answers",
        description="A Gradio chat page: streaming answers, history, generation settings.",
    )
    _add_model_args(web)
    _add_host_args(web, 7860)
    web.add_argument(
        ALLOWED_ORIGINS_OPTION,
        metavar="ORIGIN[,ORIGIN]",
        action="append",
        default=[],
        help="other sites whose pages may call this page with its users' login (repeatable), e.g. "
        "https://portal.example.com; no other site may",
    )
    web.add_argument("--share", action="store_true", help="refused: see docs/serving.md for a public address")
    web.add_argument(
        "--auth",
        metavar="USER:PASS",
        help=f"require this login (or set {WEB_AUTH_ENV}=USER:PASS, which keeps it out of `ps`)",
    )
    api = fronts.add_parser(
        "api",
        help="HTTP API: ChatGLM's POST / and OpenAI's /v1/chat/completions",
        description="FastAPI + uvicorn: POST / (ChatGLM api.py), POST /v1/chat/completions "
        "(OpenAI, streaming or not), GET /v1/models, GET /health.",
    )
    _add_model_args(api)
    _add_host_args(api, 8000)
    api.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` (or set {API_KEY_ENV}, which keeps it out of `ps`)",
    )
    chat = sub.add_parser(
        "chat",
        help="chat with the model in the terminal",
        description="Terminal chat with streaming answers: `clear` clears the history, "
        "`stop` quits; Ctrl-C stops an answer, Ctrl-C or Ctrl-D at the prompt quits.",
    )
    _add_model_args(chat)


def run(args: argparse.Namespace) -> int:
    from ..state import determinism

    determinism.configure_threads()  # before torch is imported
    if args.command == "chat":
        from . import chat

        check_source(args)
        return chat.run(load_engine(args, server=False))
    if args.frontend == "api":
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        warn_if_exposed(args.host, "an API key (--api-key)" if api_key is None else None)
        edge = edge_of(args)
        check_source(args)
        sock = bind(args.host, args.port)
        engine = load_engine(args)
        from . import api, server

        url = server.url_of(sock)
        ready = (
            f"{server.READY_PREFIX} {engine.name} ({engine.description}) on {url} (OpenAI base URL {url}/v1); "
            "Ctrl-C stops it"
        )
        return server.run(api.create_app(engine, api_key), sock, edge, ready)
    if args.share:
        raise PtuneError(
            "--share is not offered: Gradio's share link needs Gradio's own server, which lets any site's page call "
            "this one with its users' login; to reach the page from elsewhere, use an SSH tunnel (ssh -L "
            f"{args.port}:127.0.0.1:{args.port} HOST) or a reverse proxy with TLS and {ALLOWED_HOSTS_OPTION} NAME "
            "(docs/serving.md)"
        )
    auth = parse_auth(args.auth or os.environ.get(WEB_AUTH_ENV))
    warn_if_exposed(args.host, "a login (--auth)" if auth is None else None)
    edge = edge_of(args)
    origins = allowed_origins(args.allowed_origins)
    check_source(args)
    sock = bind(args.host, args.port)
    engine = load_engine(args)
    from . import web

    return web.run(engine, sock, edge, auth=auth, origins=origins)


def edge_of(args: argparse.Namespace) -> Edge:
    """The network edge's limits from the options, each checked (edge.py and server.py say what each one guards)."""
    if args.max_connections < 1:
        raise PtuneError(f"--max-connections {args.max_connections}: must be 1 or more")
    timeouts = (("--request-timeout", args.request_timeout), ("--keep-alive-timeout", args.keep_alive_timeout))
    for option, seconds in timeouts:
        if not 0 < seconds <= 3600:  # NaN fails this too
            raise PtuneError(f"{option} {seconds}: must be seconds, more than 0 and at most 3600")
    return Edge(
        AllowedHosts.for_server(args.host, args.allowed_hosts),
        max_connections=args.max_connections,
        request_timeout_s=args.request_timeout,
        keep_alive_s=args.keep_alive_timeout,
    )


def check_source(args: argparse.Namespace) -> None:
    """Fail on a missing bundle or model before binding a port or loading anything."""
    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise PtuneError(
                f"{args.model}: no model here (no config.json); give a transformers model directory, "
                "e.g. models/base after `ptune fetch_weights`"
            )
    elif not (Path(args.bundle) / BUNDLE_MANIFEST).is_file():
        raise PtuneError(
            f"{args.bundle}: no deploy bundle here (no {BUNDLE_MANIFEST}); build it with `ptune deploy` "
            "(or `dvc repro deploy`), or serve a model directory with --model DIR"
        )


def load_engine(args: argparse.Namespace, server: bool = True):
    """The engine of `ptune serve` (`server`: many clients, the scheduler in its own process on a CPU) or of
    `ptune chat` (one reader: a thread)."""
    for option, value in (
        ("--max-pending", args.max_pending),
        ("--max-batch", args.max_batch),
        ("--max-rounds", args.max_rounds),
    ):
        if value < 1:
            raise PtuneError(f"{option} {value}: must be 1 or more")
    if args.max_chars < 1:
        raise PtuneError(f"--max-chars {args.max_chars}: must be 1 or more")
    # The scheduler's process, started before torch is imported here: it imports torch and transformers on another
    # core while this one loads the model (the server is ready about 2 s sooner). Closed if it is not used.
    child = scheduler_process.early_child(args.max_batch) if server and not legacy_env.is_current() else None
    try:
        return _load_engine(args, server, child)
    except BaseException:
        if child is not None:
            child.close()
        raise


def _load_engine(args: argparse.Namespace, server: bool, child):
    from ..model import trust
    from ..model.bundle import read_manifest
    from .engine import Engine, RequestError

    if args.model:
        from .. import config

        params = config.load(args.params)
        log.info("loading model %s", args.model)
        engine = Engine.from_model(
            args.model,
            params.preprocess,
            params.deploy,
            args.max_pending,
            max_batch=args.max_batch,
            own_process=server,
            child=child,
        )
    else:
        log.info("loading bundle %s%s", args.bundle, " (base model only)" if args.base_only else "")
        from ..model import origin

        # Found (downloaded if need be) and checked once, with the user's --base and consent; loading uses it.
        base = origin.resolve(
            args.bundle, read_manifest(args.bundle), args.base, allow_pickle_flag=args.allow_pickle, params=args.params
        )
        consent = trust.user_trusts(base, args.trust_remote_code, args.params)
        engine = Engine.from_bundle(
            args.bundle,
            args.base_only,
            args.max_pending,
            trust_remote_code=consent,
            max_batch=args.max_batch,
            base=base,
            own_process=server,
            child=child,
        )
    engine.limits = Limits(args.max_rounds, args.max_chars)
    engine.log_prompts = args.log_prompts
    try:
        engine.set_defaults(args.max_new_tokens, args.do_sample, args.top_p, args.temperature, args.seed)
    except RequestError as exc:
        raise PtuneError(f"--{exc.param.replace('_', '-')}: {exc.message}") from None
    return engine


def warn(message: str) -> None:
    print(f"ptune: warning: {message}", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(host: str, missing_guard: str | None) -> None:
    if is_loopback(host):
        return
    warn(
        f"--host {host} listens beyond this machine: anyone who can reach it can use the model"
        + (f"; set {missing_guard} to restrict it" if missing_guard else "")
    )


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise PtuneError("--auth / PTUNE_WEB_AUTH: expected USER:PASS, both non-empty")
    return user, password


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a taken port fails at once; port 0: any free."""
    if not 0 <= port <= 65535:
        raise PtuneError(f"--port {port}: must be 0 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise PtuneError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (0 picks a free one)"
        ) from None
    sock.listen(128)
    return sock
