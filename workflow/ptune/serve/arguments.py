"""The options of `ptune serve web|api` and `ptune chat`. Only the standard library and light modules are imported
here: `ptune` builds every command's options on every run (its help included), and the servers' modules load torch."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from ..paths import DEPLOY
from .edge import (
    ALLOWED_HOSTS_OPTION,
    ALLOWED_ORIGINS_OPTION,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT_S,
)
from .limits import DEFAULT_MAX_CHARS, DEFAULT_MAX_ROUNDS

DEFAULT_BUNDLE = str(DEPLOY)
# What `ptune serve api` does with a system message where the prompt format has no place for one (--system-message).
REFUSE, DROP, FOLD = "refuse", "drop", "fold"
SYSTEM_POLICIES = (REFUSE, DROP, FOLD)
DEFAULT_MAX_N = 4
MAX_N_LIMIT = 64  # --max-n past this would let one request fill several batches
API_KEY_ENV = "PTUNE_API_KEY"
# What a bundle given as a bare path is called (`--bundle PATH`), and the name no bundle may take: `--serve-base`'s.
DEFAULT_NAME = "ptune"
BASE_NAME = "base"
# A served model's name: what clients send as `model` (OpenAI's field), so no spaces, slashes or `=`.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEB_AUTH_ENV = "PTUNE_WEB_AUTH"


@dataclass(frozen=True)
class ApiOptions:
    """What `ptune serve api`'s OpenAI endpoint allows beyond the engine's own options: the most choices one request
    may ask for (`n`, --max-n) and what becomes of a system message the prompt format has no place for
    (--system-message: refuse it, 400; drop it, with a `Warning` header; fold it into the first user message)."""

    max_n: int = DEFAULT_MAX_N
    system_message: str = REFUSE

    def __post_init__(self):
        if not 1 <= self.max_n <= MAX_N_LIMIT:
            raise PtuneError(f"--max-n {self.max_n}: must be 1 to {MAX_N_LIMIT}")
        if self.system_message not in SYSTEM_POLICIES:
            raise PtuneError(f"--system-message {self.system_message!r}: must be one of {', '.join(SYSTEM_POLICIES)}")

    @classmethod
    def of(cls, args: argparse.Namespace) -> "ApiOptions":
        """The options of a parsed `ptune serve api` command line (checked)."""
        return cls(max_n=args.max_n, system_message=args.system_message)


def named_bundles(values: list[str] | None) -> list[tuple[str, Path]]:
    """The `--bundle` options as (name, folder), in their order (the first is the default): `NAME=PATH`, or a bare
    PATH named `ptune`; none given: models/deploy. A name is what clients send as `model`; two bundles of one name,
    and the reserved name `base` (the base alone, `--serve-base`), are refused naming the option."""
    found: list[tuple[str, Path]] = []
    for value in values or [DEFAULT_BUNDLE]:
        name, sep, path = value.partition("=")
        if not sep or not _NAME.fullmatch(name):  # a bare path (one whose text before `=` is no name)
            name, path = DEFAULT_NAME, value
        if not path:
            raise PtuneError(f"--bundle {value}: no folder after `=`; give --bundle NAME=PATH")
        if name == BASE_NAME:
            raise PtuneError(
                f"--bundle {value}: the name {BASE_NAME!r} is reserved for the base model alone (--serve-base); "
                "name the bundle otherwise"
            )
        if any(name == other for other, _ in found):
            raise PtuneError(
                f"--bundle {value}: a bundle named {name!r} is given already; name each one: --bundle NAME=PATH "
                "(a bare PATH is named ptune)"
            )
        found.append((name, Path(path)))
    return found


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to load")
    group.add_argument(
        "--bundle",
        action="append",
        metavar="[NAME=]PATH",
        help=f"deploy bundle to serve (default: {DEFAULT_BUNDLE}, written by `ptune deploy`), named NAME for "
        "requests' `model` (a bare PATH is named ptune); repeat it to serve several bundles of one base from one "
        "load of the base, the first the default",
    )
    group.add_argument(
        "--base-only", action="store_true", help="serve the bundle's base model without its prefix, to compare"
    )
    group.add_argument(
        "--serve-base",
        action="store_true",
        help="also serve the bundles' base model alone, no prefix, under the reserved name `base` "
        "(for questions outside the bundles' tasks)",
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
    openai = api.add_argument_group("the OpenAI endpoint (docs/serving.md)")
    openai.add_argument(
        "--max-n",
        type=int,
        default=DEFAULT_MAX_N,
        metavar="N",
        help="the most choices one request may ask for (`n`), each a row of the batch (default: %(default)s)",
    )
    openai.add_argument(
        "--system-message",
        choices=SYSTEM_POLICIES,
        default=REFUSE,
        help="a system message where the prompt format has no place for one: refuse it (400), drop it (the answer "
        "carries a `Warning` header), or fold it into the first user message (default: %(default)s)",
    )
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
