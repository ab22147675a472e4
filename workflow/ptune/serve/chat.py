"""`ptune chat`: the seed's cli_demo.py over our engine. `clear` clears the history, `stop` quits; with several bundles
(`--bundle NAME=PATH` repeated, `--serve-base`), `use NAME` talks to another (the first to begin with) and `models`
lists them.

Ctrl-C while an answer streams stops that answer (what was said so far stays in the history); Ctrl-C or Ctrl-D
at the prompt quits.
"""

from __future__ import annotations

from .engine import Engine, RequestError
from .limits import latest_rounds

PROMPT = "\nYou: "
SPEAKER = "ptune: "


def run(engine: Engine) -> int:
    several = len(engine.variants) > 1
    print(
        f"ptune chat with {engine.description}. Type a message; `clear` clears the history, `stop` quits"
        + (
            f"; `use NAME` talks to another model ({', '.join(engine.variants)}), `models` lists them"
            if several
            else ""
        )
        + ".",
        flush=True,
    )
    history: list[tuple[str, str]] = []
    model = engine.name
    while True:
        try:
            query = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not query:
            continue
        if several and query == "models":
            for name, v in engine.variants.items():
                print(f"{'*' if name == model else ' '} {name}: {v.description}", flush=True)
            continue
        if several and query.startswith("use "):
            wanted = query[4:].strip()
            if wanted not in engine.variants:
                print(f"(no model {wanted!r}; these are served: {', '.join(engine.variants)})", flush=True)
                continue
            # A new model, a new conversation: the earlier answers were another prefix's, in its prompt format.
            model, history = wanted, []
            print(f"(now talking to {model}; history cleared)", flush=True)
            continue
        try:
            reply = engine.start(query, latest_rounds(query, history, None, engine.limits), model=model)
        except RequestError as exc:
            print(f"(not sent: {exc.message})", flush=True)
            continue
        dropped = len(history) - reply.history_used
        if dropped:
            print(f"(the {dropped} oldest rounds no longer fit the model's context and are left out)", flush=True)
        print(SPEAKER, end="", flush=True)
        try:
            for piece in reply:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            reply.cancel()
            reply.wait()
            print(" [stopped]", end="")
        print(flush=True)
        history.append((query, reply.text))
