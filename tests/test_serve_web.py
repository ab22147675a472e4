"""`ptune serve web` in a real headless browser: log in, ask, watch the answer stream in, clear the history."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from support.prompt_seam import logged_prompts, preprocessed_prompts
from support.serving import CHROMIUM, CHROMIUM_ARGS, SAMPLING_FLAGS, cases, free_port, reference_answer

USER, PASSWORD = "ptune", "s3cret"
# Records each distinct text of the last answer bubble as the page updates it.
WATCH_ANSWER = """() => {
  window.answerTexts = [];
  const root = document.querySelector('#conversation');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (window.answerTexts[window.answerTexts.length - 1] !== text) window.answerTexts.push(text);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def _wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ptune serve web exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ptune serve web did not answer on {url} within {timeout} s")


class Web(str):
    """The page's URL; `log` is the server's output (its --log-prompts lines among it); `pid` the server's."""

    log: Path
    pid: int


@pytest.fixture(scope="module")
def web(serving_project, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (`apt-get install chromium`; .ci/run installs it)")
    port = free_port()
    env = {**serving_project.env, "PTUNE_WEB_AUTH": f"{USER}:{PASSWORD}"}
    log = tmp_path_factory.mktemp("web") / "server.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ptune.cli", "serve", "web", "--port", str(port), "--log-prompts", *SAMPLING_FLAGS],
            cwd=serving_project.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = Web(f"http://127.0.0.1:{port}/")
    url.log, url.pid = log, proc.pid
    try:
        _wait_until_up(proc, url)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def set_value(field, value: str, tries: int = 10) -> None:
    """Type `value` into a field and leave it, so that the page commits it before the message goes out (on a
    loaded machine an answer was once generated with the default seed instead). Typed again while the field does
    not hold it: a settings panel that has just opened can still be mounting its fields, and a field that mounts
    after the typing starts out with its default (seen once in CI: the seed box empty after `fill`)."""
    from playwright.sync_api import expect

    for _ in range(tries - 1):
        field.fill(value)
        field.press("Tab")
        try:
            expect(field).to_have_value(value, timeout=2_000)
            return
        except AssertionError:
            continue
    field.fill(value)
    field.press("Tab")
    expect(field).to_have_value(value)


def test_chat_page_streams_answers_and_clears_history(web, serving_project, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    prompt, seed, expected = cases(serving_project.root, 1)[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(web)
            page.locator("input[type=password]").fill(PASSWORD)
            page.locator("input[type=text]").fill(USER)
            page.get_by_role("button", name="Login").click()
            box = page.locator("#message textarea")
            expect(box).to_be_visible(timeout=60_000)
            expect(page.get_by_text("P-tuned, prefix of 4 tokens")).to_be_visible()
            page.get_by_text("Generation settings").click()
            seed_box = page.locator("#seed textarea, #seed input").first
            set_value(seed_box, str(seed))
            page.evaluate(WATCH_ANSWER)
            bots = page.locator('#conversation [data-testid="bot"]')

            box.fill(prompt)
            box.press("Enter")
            expect(bots).to_have_count(1, timeout=60_000)
            expect(bots.last).to_have_text(expected, timeout=60_000)
            seen = [t for t in page.evaluate("window.answerTexts") if t]
            # Streamed: the page showed growing beginnings of the answer before the whole of it.
            assert len(seen) >= 3 and seen[-1] == expected and all(expected.startswith(t) for t in seen), seen
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            # Asked again, with the first round as history (ChatGLM2's two-round prompt).
            second = reference_answer(serving_project.root, prompt, seed, history=((prompt, expected),))
            box.fill(prompt)
            page.get_by_role("button", name="Send").click()
            expect(bots).to_have_count(2, timeout=60_000)
            expect(bots.last).to_have_text(second, timeout=60_000)
            # A third turn: the model read each turn as `ptune preprocess` writes a training example with that
            # history (the server logs what it sent).
            box.fill(prompt)
            box.press("Enter")
            expect(bots).to_have_count(3, timeout=60_000)
            trained = preprocessed_prompts(
                serving_project.root,
                tmp_path / "preprocess",
                serving_project.env,
                [(prompt, None), (prompt, [(prompt, expected)]), (prompt, [(prompt, expected), (prompt, second)])],
            )
            assert logged_prompts(web.log.read_text(encoding="utf-8"))[-3:] == trained

            page.locator("#clear").click()
            expect(bots).to_have_count(0)
            expect(page.locator('#conversation [data-testid="user"]')).to_have_count(0)
            # The history is gone on the server too (the page shows the server's history): one round only.
            box.fill(prompt)
            box.press("Enter")
            expect(bots).to_have_count(1, timeout=60_000)
            expect(bots.last).to_have_text(expected, timeout=60_000)
            page.screenshot(path=str(tmp_path / "chat-after-clear.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_the_page_refuses_huge_bodies_and_messages(web, serving_project):
    """A 64 MiB message used to be taken in: now a body over the limit gets 413 before Gradio reads it (no login
    needed to find out), and a message over --max-chars is refused by the page's own handlers, whatever the
    browser's max_length let through."""
    import urllib.error

    import gradio as gr

    from ptune.serve import web as page
    from ptune.serve.engine import Engine

    from support.serving import _bundle

    for path in ("gradio_api/queue/join", "gradio_api/run/predict"):
        req = urllib.request.Request(
            web + path, data=b"x" * (8 << 20), method="POST", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=60)
        assert exc.value.code == 413
    engine = Engine(_bundle(str(serving_project.root), False), "ptune", "test")
    huge = "类型#裤" * 8001
    with pytest.raises(gr.Error, match=r"at most 32000 \(its --max-chars"):
        page.ask(engine, huge, [])
    d = engine.defaults
    with pytest.raises(gr.Error, match="--max-chars"):
        list(page.answer(engine, [[huge, None]], d.max_new_tokens, d.do_sample, d.top_p, d.temperature, ""))
    assert page.ask(engine, "类型#裤", [])[0] == ""


# Slow-marked: it failed once in the full module beside the module's own server (not reproduced alone); `make test-all`.
@pytest.mark.slow
def test_two_pages_asking_together_reach_the_engine_together_and_share_a_batch(serving_project):
    """Gradio's queue runs one event at a time unless told otherwise: then a second page's question would reach the
    engine only after the first answer ended. The scheduler is held while both pages ask, so both requests must be
    inside the engine at once (pending 2), and, released, they are decoded in one batch. No timing is assumed."""
    from playwright.sync_api import expect, sync_playwright

    from ptune.serve import web as page_module
    from ptune.serve.engine import Engine

    from support.serving import _bundle

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing")
    engine = Engine(_bundle(str(serving_project.root), False), "ptune", "test")
    assert engine.scheduler is not None
    demo = page_module.queued(page_module.build(engine), engine)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, mcp_server=False)
    prompt = "类型#裤*材质#牛仔布"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                pages = [browser.new_page() for _ in range(2)]
                for p in pages:
                    p.goto(f"http://127.0.0.1:{port}/")
                    expect(p.locator("#message textarea")).to_be_visible(timeout=60_000)
                with engine.scheduler._cv:  # the scheduler can neither take a request nor decode
                    for p in pages:
                        box = p.locator("#message textarea")
                        box.fill(prompt)
                        box.press("Enter")
                    deadline = time.monotonic() + 60
                    while engine.pending < 2 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert engine.pending == 2, "the second page's request did not reach the engine"
                # Both answered (an answer may be empty: unseeded sampling can draw the end-of-turn token first).
                for p in pages:
                    expect(p.locator('#conversation [data-testid="bot"]')).to_have_count(1, timeout=60_000)
                deadline = time.monotonic() + 60
                while engine.pending and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert engine.pending == 0
            finally:
                browser.close()
    finally:
        demo.close()
    assert engine.scheduler.largest_batch == 2


def _client(web):
    """The page's own protocol, as a script drives it (gradio_client): each call's outputs are what the server
    sends back, its session's state among them."""
    from gradio_client import Client

    return Client(web, auth=(USER, PASSWORD), verbose=False)


def _said(chat: list[dict]) -> list[tuple[str, str]]:
    """The Chatbot's messages as (role, text)."""
    return [
        (m["role"], m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"]))
        for m in chat
    ]


def test_unanswered_questions_neither_pile_up_nor_break_the_session(web, serving_project):
    """The issue's attack: Send outside the queue (its `ask` step) again and again with 32,000 characters, and never
    let an answer run (as when the queue is full). Each question used to be kept, unanswered, and the whole chat
    sent back each time (60 of them: 45 MiB of server memory); the next answer then failed on the unanswered ones
    (`object of type 'NoneType' has no len()`), and so did every later one. Now an unanswered question is dropped
    when the next is asked: the session holds one question, and the next answer is the bundle's own."""
    client = _client(web)
    for i in range(12):
        box, chat = client.predict(f"{i:02}:" + "x" * 31_990, api_name="/ask_")
        assert box == "" and [(role, text[:3]) for role, text in _said(chat)] == [("user", f"{i:02}:")]
    prompt, seed, expected = cases(serving_project.root, 1)[0]
    client.predict(prompt, api_name="/ask_")
    chat = client.predict(api_name="/respond", seed=str(seed))
    assert _said(chat) == [("user", prompt), ("assistant", expected)]


def test_the_page_keeps_the_latest_rounds_within_the_caps_and_names_bad_settings(serving_project):
    """What a session keeps is what the engine reads: the latest rounds within --max-rounds and --max-chars, the
    oldest forgotten and the page saying so; so however long a chat runs, its session holds at most the caps and one
    answer. Settings a script sends as something else than numbers, numbers the engine refuses (NaN, a temperature
    below 0.01) and a message that is not text get the page's error naming them, not an exception's text."""
    import gradio as gr

    from ptune.serve import web as page
    from ptune.serve.engine import Engine, Limits

    from support.serving import _bundle

    engine = Engine(_bundle(str(serving_project.root), False), "ptune", "test", limits=Limits(2, 1000))
    d = engine.defaults
    settings = (2, True, d.top_p, d.temperature, "1")  # max new tokens, sample, top_p, temperature, seed
    pairs = []
    for i in range(5):
        _, pairs, _ = page.ask(engine, f"{i}:" + "类型#裤" * 40, pairs)
        with warnings.catch_warnings(record=True) as said:  # the page's gr.Warning, outside a served page
            warnings.simplefilter("always")
            *_, (pairs, chat) = page.answer(engine, pairs, *settings)
        assert [q[:2] for q, _ in pairs] == [f"{j}:" for j in range(max(0, i - 2), i + 1)]
        assert chat == page.display(pairs) and all(a is not None for _, a in pairs)
        forgot = [str(w.message) for w in said if "forgotten" in str(w.message)]
        assert forgot == ([] if i < 3 else [page.forgotten(1, engine.limits)])
    assert "2 rounds and 1000 characters (its --max-rounds and --max-chars options)" in forgot[0]
    engine.limits = Limits(64, 400)  # now the characters bind: the message (164) and one round fit, two do not
    _, pairs, _ = page.ask(engine, "类型#裤" * 40 + "!!", pairs)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        *_, (pairs, _) = page.answer(engine, pairs, *settings)
    assert len(pairs) == 2 and sum(len(q) + len(a) for q, a in pairs[:-1]) + len(pairs[-1][0]) <= 400

    bad = {
        "max_new_tokens None: must be a whole number": (None, True, 0.7, 0.95, ""),
        "temperature nan: must be a number >= 0": (2, True, 0.7, float("nan"), ""),
        "temperature 1e-45: must be 0 .greedy decoding. or at least 0.01": (2, True, 0.7, 1e-45, ""),
        "top_p 'x': must be a number": (2, True, "x", 0.95, ""),
        "seed 'x1': must be a whole number, or empty": (2, True, 0.7, 0.95, "x1"),
    }
    for says, fields in bad.items():
        _, asked, _ = page.ask(engine, "类型#裤", [])
        with pytest.raises(gr.Error, match=says):
            list(page.answer(engine, asked, *fields))
    with pytest.raises(gr.Error, match=r"the message holds a lone UTF-16 surrogate \(U\+D800 at character 1\)"):
        page.ask(engine, "a\ud800", [])
    assert engine.pending == 0


@pytest.mark.slow
def test_a_page_session_is_forgotten_after_its_lifetime(serving_project):
    """A page's conversation lives SESSION_TTL_S seconds (an hour) after its last question or answer; here one
    second, and the next question starts a new conversation."""
    from gradio_client import Client

    from ptune.serve import web as page
    from ptune.serve.engine import Engine

    from support.serving import _bundle

    assert page.SESSION_TTL_S == 3600
    engine = Engine(_bundle(str(serving_project.root), False), "ptune", "test")
    demo = page.queued(page.build(engine, session_ttl=1), engine)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, mcp_server=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict("类型#裤", api_name="/ask_")
        assert [role for role, _ in _said(client.predict(api_name="/respond"))] == ["user", "assistant"]
        _, chat = client.predict("类型#裤", api_name="/ask_")
        assert len(chat) == 3  # within its lifetime: the earlier round is there
        time.sleep(3)  # past it; Gradio deletes expired state every second
        _, chat = client.predict("类型#裤", api_name="/ask_")
        assert _said(chat) == [("user", "类型#裤")]
    finally:
        demo.close()


def test_the_page_shows_a_request_id_not_the_exception_when_it_fails_inside(web):
    """The page used to show an exception's own text (show_error=True), where the API shows a request id. Now a
    failure inside (the scheduler's process killed under a question, as the kernel's OOM killer kills; stopped
    first, so that the question is surely in flight) shows a request id, the details being in the server's log under
    it; and Gradio's own errors (a field a script sends empty) show no exception text either. Last of the tests of
    the `web` server: its scheduler's process is gone afterwards (a thread takes over)."""
    import re

    import psutil
    from gradio_client.exceptions import AppError

    from support.processes import alive

    (child,) = [c for c in psutil.Process(web.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    client = _client(web)
    client.predict("类型#裤", api_name="/ask_")
    asked = len(logged_prompts(web.log.read_text(encoding="utf-8")))
    child.suspend()
    try:
        job = client.submit(api_name="/respond", max_new_tokens=4)
        deadline = time.monotonic() + 60
        while len(logged_prompts(web.log.read_text(encoding="utf-8"))) == asked:  # logged just before it is sent
            assert time.monotonic() < deadline, "the question never reached the engine"
            time.sleep(0.02)
        time.sleep(0.2)
        child.kill()
        with pytest.raises(AppError) as failed:
            job.result(timeout=60)
    finally:
        if alive(child.pid):
            child.kill()
    message = str(failed.value)
    said = re.fullmatch(r"the server failed to answer \(request id (\w+); the server's log has the details\)", message)
    assert said, message
    ident = said.group(1)
    time.sleep(0.5)  # the log line may trail the answer
    log = web.log.read_text(encoding="utf-8")
    assert f"request {ident} failed" in log and "Traceback" in log

    client.predict("类型#裤", api_name="/ask_")
    with pytest.raises(AppError) as refused:
        client.predict(None, True, 0.7, 0.95, "", api_name="/respond")  # no number of new tokens
    assert "Error" not in str(refused.value) and "NoneType" not in str(refused.value), str(refused.value)
