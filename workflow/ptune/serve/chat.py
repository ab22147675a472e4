"""`ptune chat`: the seed's cli_demo.py over our engine. `clear` clears the history, `stop` quits.

Ctrl-C while an answer streams stops that answer (what was said so far stays in the history); Ctrl-C or Ctrl-D
at the prompt quits.
"""

from __future__ import annotations

from .engine import Engine, RequestError
from .limits import latest_rounds

PROMPT = "\nYou: "
SPEAKER = "ptune: "


def run(engine: Engine) -> int:
    print(
        f"ptune chat with {engine.description}. Type a message; `clear` clears the history, `stop` quits.", flush=True
    )
    history: list[tuple[str, str]] = []
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
        try:
            reply = engine.start(query, latest_rounds(query, history, None, engine.limits))
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
