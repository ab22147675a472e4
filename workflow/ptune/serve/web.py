"""The Gradio chat page: streaming answers, history, generation settings, a clear button.

The conversation lives in a `gr.State` of (question, answer) pairs, the engine's history format; the Chatbot
only displays it. Gradio's queue lets up to the engine's batch size (`--max-batch`) of answers run at once (its
default concurrency limit of 1 would hand the engine one request at a time), so that users who ask together are
answered in one batch; more wait in the queue, which shows them their place.

What a page's session holds is bounded: the conversation keeps its latest rounds within the server's caps
(--max-rounds, --max-chars; the oldest are forgotten, and the page says so), and it is forgotten SESSION_TTL_S
seconds after its last question or answer (a closed page's an hour after it closed: Gradio's own rule). A question
the queue never took (it was full) is dropped when the next one is asked. The page shows a refusal's own message
(RequestError: written for the user) and, for any other failure, only a request id, the details going to the
server's log (failures.py), as the API does.

A server of several bundles (`--bundle NAME=PATH` repeated, `--serve-base`) shows a chooser of them, the first
chosen; each question goes to the model chosen when it is sent, and the conversation so far goes with it.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

# No usage reporting or version checks over the network: set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from . import failures  # noqa: E402
from .edge import Edge  # noqa: E402
from .engine import Engine, RequestError, Settings  # noqa: E402
from .limits import MIN_TEMPERATURE, BodyLimit, Limits, check_text, latest_rounds  # noqa: E402

Pairs = list[list[str]]
# A page's conversation is forgotten this long after its last question or answer: a chat left open over lunch
# survives, and the sessions a script opens and leaves give their memory back within the hour.
SESSION_TTL_S = 3600


def display(pairs: Pairs) -> list[dict]:
    messages = []
    for question, answer in pairs:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@contextmanager
def shown_errors():
    """Errors as the page shows them: a refusal's own message (RequestError's, written for the user: it names the
    setting or cap and what to do) and, for anything else, only a request id with the details in the server's log
    (failures.py): an exception's text may name local paths, library internals or what another page sent."""
    try:
        yield
    except gr.Error:
        raise
    except RequestError as exc:
        raise gr.Error(exc.message) from None
    except Exception as exc:
        raise gr.Error(failures.reported(exc)) from None


def forgotten(rounds: int, limits: Limits) -> str:
    return (
        f"The {rounds} oldest round(s) of this conversation are forgotten: the page keeps its latest rounds within "
        f"this server's caps, {limits.max_rounds} rounds and {limits.max_chars} characters (its --max-rounds and "
        "--max-chars options)"
    )


def answer(engine: Engine, pairs: Pairs, max_new_tokens, do_sample, top_p, temperature, seed, model=None):
    """The page's call into the engine: answer the last question of `pairs` (the page's state), the earlier pairs
    as the conversation's history; yields the pairs and the Chatbot's messages as the answer streams in. What the
    page keeps is what the engine reads: the latest rounds within the caps (limits.py), so however long the chat, a
    session holds at most --max-chars characters besides its latest answer and next question. `model`: the
    chooser's name (None: the first bundle)."""
    with shown_errors():
        if not pairs or pairs[-1][1] is not None:
            yield pairs, display(pairs)
            return
        question = pairs[-1][0]
        earlier = [(q, a) for q, a in pairs[:-1]]  # answered rounds only (ask)
        history = latest_rounds(question, earlier, None, engine.limits)
        if len(history) < len(earlier):
            gr.Warning(forgotten(len(earlier) - len(history), engine.limits))
        pairs = [[q, a] for q, a in history] + [[question, None]]
        try:
            if model is not None and not isinstance(model, str):  # a script can send anything
                raise RequestError(f"model {repr(model)[:40]}: must be the name of a served model", "model")
            settings = page_settings(engine, max_new_tokens, do_sample, top_p, temperature, seed, model)
            reply = engine.start(question, history, settings, model=model)
        except RequestError:
            pairs = pairs[:-1]  # not asked: the question leaves the conversation
            yield pairs, display(pairs)
            raise
        pairs[-1][1] = ""
        try:
            for piece in reply:
                pairs[-1][1] += piece
                yield pairs, display(pairs)
        finally:
            reply.cancel()  # the page went away: stop generating
        pairs[-1][1] = reply.text
        yield pairs, display(pairs)


def page_settings(engine: Engine, max_new_tokens, do_sample, top_p, temperature, seed, model=None) -> Settings:
    """The settings fields as the engine's settings (which checks their values: engine.settings). The page sends
    numbers and text, but a script can send anything: a value that is not a number is refused by name."""

    def field(value, name: str, kind: type, what: str):
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):  # None, text, NaN or infinity as a whole number
            raise RequestError(f"{name} {repr(value)[:40]}: must be {what}", name) from None

    seed = str(seed or "").strip()
    return engine.settings(
        field(max_new_tokens, "max_new_tokens", int, "a whole number"),
        field(temperature, "temperature", float, "a number"),
        field(top_p, "top_p", float, "a number"),
        bool(do_sample),
        field(seed, "seed", int, "a whole number, or empty") if seed else None,
        model=model,
    )


def ask(engine: Engine, message: str, pairs: Pairs):
    """The page's Send: the message joins the conversation (the box empties), or is refused past --max-chars (the
    box's own max_length is the browser's to enforce, so the server checks too) or as not text (limits.check_text).
    A question still without an answer (the queue was full, or the page went away before its turn) is dropped:
    the history holds answered rounds only."""
    with shown_errors():
        if not (message or "").strip():
            return message, pairs, display(pairs)
        if len(message) > engine.limits.max_chars:
            raise gr.Error(
                f"the message is {len(message)} characters; this server takes at most {engine.limits.max_chars} "
                "(its --max-chars option)"
            )
        check_text(message, "message", "the message")
        pairs = [p for p in pairs if p[1] is not None] + [[message, None]]
        return "", pairs, display(pairs)


def build(engine: Engine, session_ttl: float = SESSION_TTL_S) -> gr.Blocks:
    d = engine.defaults
    room = engine.context_length - engine.prefix_length - 1

    def ask_(message: str, pairs: Pairs):
        return ask(engine, message, pairs)

    def respond(pairs: Pairs, max_new_tokens, do_sample, top_p, temperature, seed, model):
        yield from answer(engine, pairs, max_new_tokens, do_sample, top_p, temperature, seed, model)

    names = list(engine.variants)

    with gr.Blocks(title="ptune chat", analytics_enabled=False) as demo:
        what = engine.summary if len(names) == 1 else f"{len(names)} models of one base, chosen below"
        gr.Markdown(f"# ptune chat\n**Model:** {what}, context {engine.context_length} tokens.")
        # Several bundles (or the base beside them): which answers. Hidden with one, which answers everything.
        chooser = gr.Dropdown(
            names,
            value=names[0],
            label="Model",
            info=" · ".join(f"{n}: {v.summary}" for n, v in engine.variants.items()),
            elem_id="model",
            visible=len(names) > 1,
            interactive=True,
        )
        # Each page's conversation; Gradio deletes it (checking every second) `session_ttl` seconds after it last
        # changed. Its size is bounded by the caps (answer).
        pairs = gr.State([], time_to_live=session_ttl)
        # Plain text: ADGEN prompts are full of `*`, which Markdown would turn into italics.
        chatbot = gr.Chatbot(
            label="Conversation",
            elem_id="conversation",
            height=420,
            feedback_options=None,
            buttons=["copy", "copy_all"],
            render_markdown=False,
        )
        with gr.Row():
            box = gr.Textbox(
                show_label=False,
                placeholder="Type a message and press Enter",
                scale=6,
                elem_id="message",
                autofocus=True,
                max_length=engine.limits.max_chars,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        clear = gr.Button("Clear history", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(1, room, value=d.max_new_tokens, step=1, label="Max new tokens")
            do_sample = gr.Checkbox(value=d.do_sample, label="Sample (off: greedy decoding)", elem_id="sample")
            top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="top_p")
            temperature = gr.Slider(MIN_TEMPERATURE, 2.0, value=d.temperature, step=0.01, label="Temperature")
            seed = gr.Textbox(
                value="",
                elem_id="seed",
                label="Seed (a whole number makes sampling repeatable; empty: the server's --seed, if any)",
            )
        settings = [max_new_tokens, do_sample, top_p, temperature, seed, chooser]
        for trigger in (box.submit, send.click):
            trigger(ask_, [box, pairs], [box, pairs, chatbot], queue=False).then(
                respond, [pairs, *settings], [pairs, chatbot]
            )
        clear.click(lambda: ([], [], ""), None, [pairs, chatbot, box], queue=False)
        chatbot.clear(lambda: [], None, pairs, queue=False)  # the Chatbot's own trash button
    return demo


def queued(demo: gr.Blocks, engine: Engine) -> gr.Blocks:
    """Gradio's queue in front of the engine: as many answers at once as the engine batches, at most
    --max-pending waiting."""
    return demo.queue(max_size=engine.max_pending, default_concurrency_limit=engine.max_batch)


def run(engine: Engine, sock: socket.socket, edge: Edge, auth: tuple[str, str] | None, origins: list[str]) -> int:
    """Serve the page on `sock` until Ctrl-C or SIGTERM. The page is mounted in an app of its own, not launched by
    Gradio: `launch()` installs Gradio's CORS middleware, which grants any site credentialed CORS when the page is
    reached by a name other than localhost (a LAN address, a proxy); mounted under an app that has Starlette's
    CORSMiddleware, Gradio leaves CORS to it, and that grants only `origins` (edge.py). The server is the API's
    (server.py): the same Host check and connection limits."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Mount

    from . import server

    app = FastAPI(
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        middleware=[
            Middleware(
                CORSMiddleware, allow_origins=origins, allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
            ),
            # Gradio reads request bodies whole; the API's limit applies to its page too (413 past it).
            Middleware(BodyLimit, max_bytes=engine.limits.body_bytes),
        ],
    )
    host, port = sock.getsockname()[:2]
    gr.mount_gradio_app(
        app,
        queued(build(engine), engine),
        path="/",
        server_name=host,
        server_port=port,
        auth=auth,
        # Our refusals are gr.Error, shown whatever this says; anything else shows a request id (shown_errors).
        show_error=False,
        footer_links=[],
        enable_monitoring=False,
        mcp_server=False,
    )
    (page,) = [route.app for route in app.routes if isinstance(route, Mount)]
    url = server.url_of(sock)
    ready = f"{server.WEB_READY_PREFIX} {engine.name} ({engine.description}) on {url}/ (the page); Ctrl-C stops it"
    # Each open page holds a stream (Gradio's session heartbeat) that ends on the page app's stop event: set as the
    # server begins to stop, or stopping would wait out uvicorn's grace period for them and then cancel them.
    return server.run(app, sock, edge, ready, stopping=page.stop_event.set)
