"""The Gradio chat page: streaming answers, history, generation settings, a clear button.

The conversation lives in a `gr.State` of (question, answer) pairs, the engine's history format; the Chatbot
only displays it. Gradio's queue lets up to the engine's batch size (`--max-batch`) of answers run at once (its
default concurrency limit of 1 would hand the engine one request at a time), so that users who ask together are
answered in one batch; more wait in the queue, which shows them their place.
"""

from __future__ import annotations

import logging
import os

# No usage reporting or version checks over the network: set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from .engine import Engine, RequestError  # noqa: E402
from .limits import BodyLimit, latest_rounds  # noqa: E402

Pairs = list[list[str]]


def display(pairs: Pairs) -> list[dict]:
    messages = []
    for question, answer in pairs:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def answer(engine: Engine, pairs: Pairs, max_new_tokens, do_sample, top_p, temperature, seed):
    """The page's call into the engine: answer the last question of `pairs` (the page's state), the earlier pairs
    as the conversation's history; yields the pairs and the Chatbot's messages as the answer streams in."""
    if not pairs or pairs[-1][1] is not None:
        yield pairs, display(pairs)
        return
    question = pairs[-1][0]
    # The page keeps the whole conversation; the engine gets its latest rounds within the caps (limits.py).
    history = latest_rounds(question, [(q, a) for q, a in pairs[:-1]], None, engine.limits)
    try:
        if seed.strip() and not seed.strip().lstrip("-").isdigit():
            raise RequestError(f"seed {seed.strip()!r}: a whole number, or empty", "seed")
        settings = engine.settings(
            int(max_new_tokens), float(temperature), float(top_p), bool(do_sample), int(seed) if seed.strip() else None
        )
        reply = engine.start(question, history, settings)
    except RequestError as exc:
        pairs = pairs[:-1]
        yield pairs, display(pairs)
        raise gr.Error(exc.message) from None
    pairs = [list(p) for p in pairs]
    pairs[-1][1] = ""
    try:
        for piece in reply:
            pairs[-1][1] += piece
            yield pairs, display(pairs)
    finally:
        reply.cancel()  # the page went away: stop generating
    pairs[-1][1] = reply.text
    yield pairs, display(pairs)


def ask(engine: Engine, message: str, pairs: Pairs):
    """The page's Send: the message joins the conversation (the box empties), or is refused past --max-chars (the
    box's own max_length is the browser's to enforce, so the server checks too)."""
    if not message.strip():
        return message, pairs, display(pairs)
    if len(message) > engine.limits.max_chars:
        raise gr.Error(
            f"the message is {len(message)} characters; this server takes at most {engine.limits.max_chars} "
            "(its --max-chars option)"
        )
    pairs = pairs + [[message, None]]
    return "", pairs, display(pairs)


def build(engine: Engine) -> gr.Blocks:
    d = engine.defaults
    room = engine.context_length - engine.prefix_length - 1

    def ask_(message: str, pairs: Pairs):
        return ask(engine, message, pairs)

    def respond(pairs: Pairs, max_new_tokens, do_sample, top_p, temperature, seed):
        yield from answer(engine, pairs, max_new_tokens, do_sample, top_p, temperature, seed)

    with gr.Blocks(title="ptune chat", analytics_enabled=False) as demo:
        gr.Markdown(f"# ptune chat\n**Model:** {engine.description}, context {engine.context_length} tokens.")
        pairs = gr.State([])
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
            temperature = gr.Slider(0.01, 2.0, value=d.temperature, step=0.01, label="Temperature")
            seed = gr.Textbox(
                value="",
                elem_id="seed",
                label="Seed (a whole number makes sampling repeatable; empty: the server's --seed, if any)",
            )
        settings = [max_new_tokens, do_sample, top_p, temperature, seed]
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


def run(engine: Engine, host: str, port: int, share: bool, auth: tuple[str, str] | None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes, one line each
    demo = queued(build(engine), engine)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        show_error=True,
        footer_links=[],
        enable_monitoring=False,
        mcp_server=False,
        # Gradio reads request bodies whole; the API's limit applies to its page too (413 past it).
        app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=engine.limits.body_bytes)]},
    )
    return 0
