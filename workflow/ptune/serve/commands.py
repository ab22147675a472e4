"""`ptune serve web|api` and `ptune chat`: the safety warnings, and how each starts (their options: arguments.py)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..bundle.manifest import MANIFEST
from ..errors import PtuneError
from ..model import legacy_env
from . import scheduler_process
from .arguments import API_KEY_ENV, DEFAULT_NAME, WEB_AUTH_ENV, ApiOptions, add_parsers, named_bundles
from .edge import (
    ALLOWED_HOSTS_OPTION,
    AllowedHosts,
    Edge,
    allowed_origins,
)
from .limits import Limits

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """`ptune [--params P] serve web|api ...` or `ptune chat ...`, given its arguments after `ptune` (the CLI hands
    them over as they came; `python -m ptune.serve` takes the same)."""
    parser = argparse.ArgumentParser(prog="ptune", description="ptune's serving commands")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' advisory warnings are noise here
    from ..state.stopping import Stopped

    try:
        switch_environment(args, "ptune.serve", argv)
        return run(args)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:  # on request (SIGTERM, SIGINT, SIGHUP): not an error, not a success either
        print(f"ptune: {stop}", file=sys.stderr)
        return stop.exit_code


def switch_environment(args: argparse.Namespace, module: str, argv: list[str]) -> None:
    """A base whose Python code would run (ChatGLM-6B's) needs the user's consent, then its environment
    (bundle/opening.py): `python -m module argv` again there. The base is --model, or the one the bundle names where
    it is on this machine already."""
    from ..bundle import opening

    if getattr(args, "model", None):
        from ..model import backends

        base, chatglm = Path(args.model), backends.needs_legacy_env(Path(args.model))
        named = base
    else:
        bundles = named_bundles(args.bundle)
        first = bundles[0][1]
        base, chatglm = opening.served_base(first, getattr(args, "base", None))
        if chatglm and (len(bundles) > 1 or getattr(args, "serve_base", False)):
            # Refused before the legacy environment is built or entered: its remote code holds one prefix, built
            # into the loaded model, so neither another bundle's prefix nor the base alone can share that load.
            raise PtuneError(
                f"--bundle {first}: a ChatGLM-6B bundle (backend chatglm) is served alone: its prefix is part of the "
                "loaded model, so one server serves one such bundle (no other --bundle, no --serve-base); start one "
                "server per bundle"
            )
        named = base if base is not None else first
    trust_flag = getattr(args, "trust_remote_code", False)
    opening.switch_environment(named, chatglm, trust_flag, args.params, f"`ptune {args.command}`", module, argv)


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
        options = ApiOptions.of(args)  # a bad --max-n or --system-message fails before the model loads
        check_source(args)
        sock = bind(args.host, args.port)
        engine = load_engine(args)
        from . import api, server

        url = server.url_of(sock)
        ready = (
            f"{server.READY_PREFIX} {engine.name} ({engine.description}) on {url} (OpenAI base URL {url}/v1); "
            "Ctrl-C stops it"
        )
        return server.run(api.create_app(engine, api_key, options), sock, edge, ready)
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
    """Fail on a missing bundle or model, or bundles that cannot share one base, before binding a port or loading
    anything."""
    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise PtuneError(
                f"{args.model}: no model here (no config.json); give a transformers model directory, "
                "e.g. models/base after `ptune fetch_weights`"
            )
        if args.bundle or args.serve_base:
            raise PtuneError(
                "--model DIR serves that model directory alone; leave out --bundle and --serve-base (or serve bundles "
                "without --model)"
            )
        return
    bundles = named_bundles(args.bundle)
    for name, folder in bundles:
        if not (folder / MANIFEST).is_file():
            raise PtuneError(
                f"--bundle {folder}: no deploy bundle here (no {MANIFEST}); build it with `ptune deploy` "
                "(or `dvc repro deploy`), or serve a model directory with --model DIR"
            )
    if args.base_only and (len(bundles) > 1 or args.serve_base):
        raise PtuneError(
            "--base-only serves one bundle's base alone; to serve the base beside several bundles, use --serve-base "
            "(the base is then the model named `base`)"
        )
    from ..bundle.opening import check_shared_base

    check_shared_base(bundles)


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
        (name, folder), *others = named_bundles(args.bundle)
        log.info(
            "loading bundle %s%s%s",
            folder,
            " (base model only)" if args.base_only else "",
            "".join(f", {n} {f}" for n, f in others) + (", the base alone" if args.serve_base else ""),
        )
        from ..bundle.opening import open_bundle

        # Found (downloaded if need be) and checked once, with the user's --base and consent; loading uses it. The
        # other bundles record the same weights (check_source compared them): they load their prefixes only.
        opened = open_bundle(
            folder,
            args.base,
            trust_flag=args.trust_remote_code,
            allow_pickle_flag=args.allow_pickle,
            params=args.params,
        )
        engine = Engine.from_bundle(
            folder,
            args.base_only,
            args.max_pending,
            trust_remote_code=opened.trust_remote_code,
            max_batch=args.max_batch,
            base=opened.base,
            own_process=server,
            child=child,
            name=None if name == DEFAULT_NAME and args.base_only else name,
            others=others,
            serve_base=args.serve_base,
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
