"""`ptune serve web` in a real headless browser: log in, ask, watch the answer stream in, clear the history."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
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
    """The page's URL; `log` is the server's output (its --log-prompts lines among it)."""

    log: Path


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
    url.log = log
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
