"""The OpenAI endpoint's server options (--system-message, --max-n: `ApiOptions`) and its one-at-a-time path (the
backend's own generate: `--max-batch 1`), on the tiny bundle in this process: the app is served by uvicorn in a
thread on 127.0.0.1 and asked through the official `openai` client."""

from __future__ import annotations

import contextlib
import threading
import time

import openai
import pytest

from support.serving import MAX_NEW_TOKENS, _bundle, cases, free_port


@pytest.fixture(scope="module")
def bundle(serving_project):
    with contextlib.chdir(serving_project.root):
        return _bundle(str(serving_project.root), False)


@pytest.fixture(scope="module")
def batched(bundle):
    from ptune.serve.engine import Engine

    return Engine(bundle, "ptune", "test bundle", max_pending=32, max_batch=8)


@pytest.fixture(scope="module")
def one_at_a_time(bundle):
    from ptune.serve.engine import Engine

    engine = Engine(bundle, "ptune", "test bundle", max_pending=32, max_batch=1)
    assert engine.scheduler is None  # the backend's own generate, behind a lock
    return engine


@contextlib.contextmanager
def served(engine, **options):
    """The API over `engine` with these ApiOptions, on a free loopback port; an `openai` client for it."""
    import uvicorn

    from ptune.serve.api import create_app
    from ptune.serve.arguments import ApiOptions

    app = create_app(engine, None, ApiOptions(**options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.should_exit = True
        thread.join(10)


def _sampled(messages: list[dict], seed: int, **extra) -> dict:
    return dict(
        model="ptune", messages=messages, seed=seed, temperature=0.95, top_p=0.7, max_tokens=MAX_NEW_TOKENS, **extra
    )


SYSTEM = "只写一句话。"


def test_a_system_message_is_refused_dropped_or_folded_as_the_server_says(batched, serving_project):
    assert not batched.supports_system  # the tiny bundle's prompt format has no {system}
    (prompt, seed, expected), (second, _, _) = cases(serving_project.root, 2)
    with_system = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]

    with served(batched) as client:  # the default: refuse, naming the option that would take it
        with pytest.raises(openai.BadRequestError, match="--system-message") as refused:
            client.chat.completions.create(**_sampled(with_system, seed))
        assert refused.value.body["param"] == "messages"
        folded_alone = client.chat.completions.create(
            **_sampled([{"role": "user", "content": f"{SYSTEM}\n\n{prompt}"}], seed)
        )
        history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "好的。"}]
        folded_first = client.chat.completions.create(
            **_sampled(
                [
                    {"role": "user", "content": f"{SYSTEM}\n\n{prompt}"},
                    *history[1:],
                    {"role": "user", "content": second},
                ],
                seed,
            )
        )

    with served(batched, system_message="drop") as client:
        raw = client.chat.completions.with_raw_response.create(**_sampled(with_system, seed))
        assert raw.parse().choices[0].message.content == expected  # as without the system message
        assert "system message was dropped" in raw.headers["warning"] and raw.headers["warning"].startswith("299 ")
        streamed = client.chat.completions.with_raw_response.create(**_sampled(with_system, seed), stream=True)
        assert "dropped" in streamed.headers["warning"]
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == expected
        plain = client.chat.completions.with_raw_response.create(
            **_sampled([{"role": "user", "content": prompt}], seed)
        )
        assert "warning" not in plain.headers  # nothing dropped, nothing said

    with served(batched, system_message="fold") as client:
        raw = client.chat.completions.with_raw_response.create(**_sampled(with_system, seed))
        assert "warning" not in raw.headers
        assert raw.parse().choices[0].message.content == folded_alone.choices[0].message.content
        # Before the first user message of a conversation, not the latest.
        longer = [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": second}]
        got = client.chat.completions.create(**_sampled(longer, seed))
        assert got.choices[0].message.content == folded_first.choices[0].message.content
        assert got.usage.prompt_tokens == folded_first.usage.prompt_tokens


def test_max_n_caps_the_choices_a_request_may_ask_for(batched, serving_project):
    from ptune.errors import PtuneError
    from ptune.serve.arguments import ApiOptions

    ((prompt, seed, _),) = cases(serving_project.root, 1)
    user = [{"role": "user", "content": prompt}]
    with served(batched, max_n=2) as client:
        assert len(client.chat.completions.create(**_sampled(user, seed, n=2)).choices) == 2
        with pytest.raises(openai.BadRequestError, match="must be 1 to 2"):
            client.chat.completions.create(**_sampled(user, seed, n=3))
    for bad in (dict(max_n=0), dict(max_n=1000), dict(system_message="ignore")):
        with pytest.raises(PtuneError):
            ApiOptions(**bad)


def test_the_one_at_a_time_path_stops_and_reports_logprobs_as_the_scheduler_does(
    batched, one_at_a_time, serving_project
):
    """The backend's own generate (--max-batch 1; the chatglm backend's only path) ends on stop strings with a
    stopping criterion and records log-probabilities with a logits processor: the same answers, cut at the same
    place after the same tokens, with the same log-probabilities (to rounding) as the scheduler's."""
    todo = cases(serving_project.root, 2, min_chars=8)
    answers = {}
    for name, engine in (("batched", batched), ("one", one_at_a_time)):
        with served(engine) as client:
            got = []
            for prompt, seed, full in todo:
                user = [{"role": "user", "content": prompt}]
                stop = full[4:6]
                cut = client.chat.completions.create(**_sampled(user, seed, stop=[stop]))
                assert cut.choices[0].message.content == full[: full.find(stop)].rstrip()
                assert cut.choices[0].finish_reason == "stop"
                streamed = client.chat.completions.create(**_sampled(user, seed, stop=[stop]), stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
                assert text == cut.choices[0].message.content
                lp = client.chat.completions.create(**_sampled(user, seed, n=2, logprobs=True, top_logprobs=2))
                assert lp.choices[0].message.content == full
                got.append((cut.usage.completion_tokens, lp))
            answers[name] = got
    for (tokens_b, lp_b), (tokens_o, lp_o) in zip(answers["batched"], answers["one"], strict=True):
        assert tokens_b == tokens_o  # the row ended after the same token
        assert [c.message.content for c in lp_b.choices] == [c.message.content for c in lp_o.choices]
        for cb, co in zip(lp_b.choices, lp_o.choices, strict=True):
            eb, eo = cb.logprobs.content, co.logprobs.content
            assert [e.token for e in eb] == [e.token for e in eo]
            assert [e.logprob for e in eb] == pytest.approx([e.logprob for e in eo], abs=1e-3)
            assert [[t.token for t in e.top_logprobs] for e in eb] == [[t.token for t in e.top_logprobs] for e in eo]


def test_log_probabilities_are_refused_where_the_backend_cannot_give_them(batched, monkeypatch):
    """A backend without the capability (the chatglm backend's remote code) answers a clear 400, before any work."""
    from ptune.serve.engine import RequestError

    monkeypatch.setattr(batched.backend, "logprobs", False, raising=False)
    with pytest.raises(RequestError, match="cannot return log-probabilities") as refused:
        batched.settings(logprobs=0)
    assert refused.value.param == "logprobs" and refused.value.status == 400


def test_the_command_line_options_reach_the_endpoint(serving_project):
    from ptune.serve.process import ApiProcess

    ((prompt, seed, expected),) = cases(serving_project.root, 1)
    args = ["--bundle", "models/deploy", "--system-message", "drop", "--max-n", "2"]
    with ApiProcess(args, cwd=serving_project.root, env=serving_project.env, start_timeout=300) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="must be 1 to 2"):
            client.chat.completions.create(**_sampled([{"role": "user", "content": prompt}], seed, n=3))
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        raw = client.chat.completions.with_raw_response.create(**_sampled(messages, seed))
        assert raw.parse().choices[0].message.content == expected and "dropped" in raw.headers["warning"]
