"""`ptune serve api` on the tiny pipeline's bundle, used as clients use it: raw HTTP, the `openai` client, many
at once, and bad requests that must get 4xx JSON while the server stays up."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from ptune.serve.process import ApiProcess

from support.processes import alive
from support.prompt_seam import QUESTIONS, logged_prompts, preprocessed_prompts, third_turn, three_turn_messages
from support.serving import MAX_NEW_TOKENS, cases

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api(serving_project):
    env = {**serving_project.env, "PTUNE_API_KEY": KEY}
    with ApiProcess(
        ["--bundle", "models/deploy", "--log-prompts"], cwd=serving_project.root, env=env, start_timeout=300
    ) as server:
        yield server
        assert server._proc.poll() is None, "the server died during the tests:\n" + server.output()


def _seed_body(prompt: str, seed: int, **extra) -> dict:
    return {
        "prompt": prompt,
        "seed": seed,
        "temperature": 0.95,
        "top_p": 0.7,
        "max_new_tokens": MAX_NEW_TOKENS,
        **extra,
    }


def _client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_health_and_models(api):
    status, health = api.get("/health", headers=AUTH)
    assert status == 200 and health["status"] == "ok" and health["model"] == "ptune"
    assert health["prefix_length"] == 4 and health["context_length"] == 512
    assert api.get("/v1/models", check=False)[0] == 401
    status, models = api.get("/v1/models", headers=AUTH)
    assert status == 200 and [m["id"] for m in models["data"]] == ["ptune"]
    assert [m.id for m in _client(api).models.list()] == ["ptune"]


def test_health_says_only_whether_it_can_answer_without_the_key_and_never_a_path(api, serving_project):
    """/health is open (a load balancer's probe holds no key), so without the key it says whether the server can
    answer and nothing else; with it, also what it serves and how busy it is, but no local path (the bundle's folder
    is this machine's business); a wrong key is refused there as everywhere."""
    assert api.get("/health") == (200, {"status": "ok"})
    status, health = api.get("/health", headers=AUTH)
    assert status == 200 and health["description"] == "deploy bundle (P-tuned, prefix of 4 tokens)"
    assert {"model", "pending", "context_length", "prefix_length"} <= health.keys()
    said = json.dumps(health)
    assert "models/deploy" not in said and str(serving_project.root) not in said and "/" not in said
    assert api.get("/health", headers={"Authorization": "Bearer wrong"}, check=False)[0] == 401


@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["thread", "none"])
def test_a_server_whose_scheduler_process_is_killed_answers_from_a_thread_or_says_so(serving_project, fallback):
    """SIGKILL of the scheduler's process (as the kernel's OOM killer sends it) used to leave a server that answered
    500 to every request while /health said ok. Now a thread takes over (logged once; /health says unavailable
    only until it has) and the answers are those of the process; with PTUNE_SERVE_FALLBACK=none nothing does, and
    every request, /health included, gets 503 (for a supervisor to restart the server)."""
    env = {**serving_project.env, "PTUNE_API_KEY": KEY, "PTUNE_SERVE_FALLBACK": fallback}
    with ApiProcess(["--bundle", "models/deploy"], cwd=serving_project.root, env=env) as server:
        (child,) = [c for c in psutil.Process(server._proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        body = _seed_body("类型#裤", 1)
        status, before = server.post("/", body, headers=AUTH)
        assert status == 200 and before["response"]
        mark = server.lines
        child.kill()
        # Until its last thread has exited the process can still take a request (it then fails, as a row in flight):
        # the server's warning says it has seen the process end.
        deadline = time.monotonic() + 30
        while "the scheduler's process has ended" not in server.output(since=mark):
            assert time.monotonic() < deadline, "the server never noticed that its scheduler's process had ended"
            time.sleep(0.01)
        if fallback == "none":
            assert server.get("/health", check=False) == (503, {"status": "unavailable"})
            status, health = server.get("/health", headers=AUTH, check=False)
            assert status == 503 and health["status"] == "unavailable" and health["pending"] == 0
            request = urllib.request.Request(
                server.url + "/", json.dumps(body).encode(), {"Content-Type": "application/json", **AUTH}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 503 and refused.value.headers["Retry-After"]
            assert json.loads(refused.value.read())["error"]["code"] == "server_unavailable"
            assert "PTUNE_SERVE_FALLBACK=none" in server.output(since=mark)
            return
        while (health := server.get("/health", check=False)) != (200, {"status": "ok"}):
            assert health == (503, {"status": "unavailable"}), health  # never ok while nothing can answer
            assert time.monotonic() < deadline, "no thread took over"
            time.sleep(0.01)
        status, after = server.post("/", body, headers=AUTH, check=False)
        assert (status, after.get("response")) == (200, before["response"]), server.output(since=mark)
        assert server.output(since=mark).count("decoding in a thread from now on") == 1


def test_seed_request_and_response_shape(api, serving_project):
    ((prompt, seed, expected),) = cases(serving_project.root, 1)
    status, body = api.post("/", _seed_body(prompt, seed), headers=AUTH)
    assert status == 200
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    # The served answer is the bundle's own, computed here without the engine, streamer or server.
    assert body["response"] == expected
    assert body["history"] == [[prompt, expected]]
    # A second round: the history comes back extended, as ChatGLM's api.py returns it.
    status, body2 = api.post("/", _seed_body("再写一句", seed, history=body["history"]), headers=AUTH)
    assert status == 200 and body2["history"][:1] == [[prompt, expected]]
    assert body2["history"][1] == ["再写一句", body2["response"]]


def test_both_apis_send_the_model_the_prompts_it_was_trained_on(api, serving_project, tmp_path):
    """A three-turn conversation through POST / and through OpenAI messages reaches the model as the very token ids
    `ptune preprocess` writes for a training example with that history; a first message as well."""
    answers = ("白色衬衫，简约百搭。", "有，红色更显气色。")
    body = {"prompt": QUESTIONS[2], "history": [list(p) for p in third_turn(answers)[1]], "max_new_tokens": 2}
    assert api.post("/", body, headers=AUTH)[0] == 200
    _client(api).chat.completions.create(model="ptune", messages=three_turn_messages(answers), max_tokens=2)
    assert api.post("/", {"prompt": QUESTIONS[0], "max_new_tokens": 2}, headers=AUTH)[0] == 200
    sent = logged_prompts(api.output())[-3:]
    trained = preprocessed_prompts(
        serving_project.root,
        tmp_path / "preprocess",
        serving_project.env,
        [third_turn(answers), third_turn(answers), (QUESTIONS[0], None)],
    )
    assert sent == trained
    assert len(sent[0]) > len(sent[2])  # the history is in it


def test_openai_client_with_and_without_streaming(api, serving_project):
    ((prompt, seed, expected),) = cases(serving_project.root, 1)
    client = _client(api)
    kwargs = dict(
        model="ptune",
        messages=[{"role": "user", "content": prompt}],
        seed=seed,
        temperature=0.95,
        top_p=0.7,
        max_tokens=MAX_NEW_TOKENS,
    )
    completion = client.chat.completions.create(**kwargs)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= MAX_NEW_TOKENS and completion.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected
    assert len(pieces) >= 2, pieces  # token by token, not one block at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == completion.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_eight_concurrent_requests_each_get_their_own_answer(api, serving_project):
    todo = cases(serving_project.root, 8)

    def ask(i: int) -> str:
        prompt, seed, _ = todo[i]
        if i % 2:  # half through the OpenAI client, streaming, half through the seed's POST /
            stream = _client(api).chat.completions.create(
                model="ptune",
                messages=[{"role": "user", "content": prompt}],
                seed=seed,
                temperature=0.95,
                top_p=0.7,
                max_tokens=MAX_NEW_TOKENS,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return api.post("/", _seed_body(prompt, seed), headers=AUTH)[1]["response"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [answer for _, _, answer in todo]


def _raw(api, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(api.url + path, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BAD_SEED_REQUESTS = [
    ({}, 400, "prompt"),  # missing prompt
    ({"prompt": 5}, 400, "prompt"),  # wrong type
    ({"prompt": ["a"]}, 400, "prompt"),
    ({"prompt": "x", "history": "no"}, 400, "history"),
    ({"prompt": "x", "history": [["only one"]]}, 400, "history.0"),
    ({"prompt": "x", "history": [[1, 2]]}, 400, "history.0.0"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 100000}, 400, "max_new_tokens"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "   "}, 400, "prompt"),  # nothing to answer
    ({"prompt": "类型#裤*" * 400}, 400, "prompt"),  # past the model's 512-token context
    ({"prompt": "x", "max_length": 3}, 400, "max_length"),  # no room left for an answer
]


@pytest.mark.parametrize("body,status,param", BAD_SEED_REQUESTS, ids=[str(i) for i in range(len(BAD_SEED_REQUESTS))])
def test_bad_seed_requests_get_4xx_json(api, body, status, param):
    got, error = api.post("/", body, headers=AUTH, check=False)
    assert got == status, error
    assert error["status"] == status and error["error"]["param"] == param and error["error"]["message"]


def test_bad_openai_requests_and_bodies_get_4xx_json(api, serving_project):
    client = _client(api)
    user = [{"role": "user", "content": "类型#裤"}]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=user)
    with pytest.raises(openai.BadRequestError, match="system"):
        client.chat.completions.create(model="ptune", messages=[{"role": "system", "content": "be nice"}, *user])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="ptune", messages=[*user, {"role": "assistant", "content": "ok"}])
    with pytest.raises(openai.BadRequestError, match="--max-n"):  # more choices than the server's cap (default 4)
        client.chat.completions.create(model="ptune", messages=user, n=5)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="ptune", messages=[{"role": "user", "content": "类型#裤*" * 400}])
    with pytest.raises(openai.BadRequestError, match="context"):  # streaming: refused before the stream starts
        client.chat.completions.create(
            model="ptune", stream=True, messages=[{"role": "user", "content": "类型#裤*" * 400}]
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert _raw(api, "/", b"{not json")[0] == 400
    assert _raw(api, "/", b"[1, 2]")[0] == 400
    assert _raw(api, "/", b"\xff\xfe")[0] == 400
    status, error = _raw(api, "/", json.dumps({"prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and error["error"]["code"] == "body_too_large"
    assert _raw(api, "/v1/nowhere", b"{}")[0] == 404
    # The server is still up and still answers correctly.
    ((prompt, seed, expected),) = cases(serving_project.root, 1)
    assert api.post("/", _seed_body(prompt, seed), headers=AUTH)[1]["response"] == expected


CHAT = "/v1/chat/completions"
USER_X = '"model": "ptune", "messages": [{"role": "user", "content": "x"}]'


# The bodies that answered 500 with a traceback in the log: NaN and temperatures so small that the model's
# scores overflow when divided by them; a lone surrogate (valid JSON, not Unicode); 100,000 nested `[`.
def test_deploy_checked_the_bundle_over_http(api, serving_project):
    check = json.loads((serving_project.root / "reports/deploy_check.json").read_text())
    assert check["server"] == "ptune serve api"
    assert check["load_s"] > 0 and check["latency_s"] > 0 and check["openai_latency_s"] > 0
    # Greedy, as the tiny params deploy: the served bundle still answers the smoke prompt as deploy recorded.
    _, body = api.post("/", {"prompt": check["prompt"]}, headers=AUTH)
    assert body["response"] == check["answer"]


def test_exposed_host_is_warned_about_and_share_refused(serving_project):
    for cmd in (["serve", "api", "--host", "0.0.0.0"], ["serve", "web", "--host", "0.0.0.0"]):
        proc = serving_project.run(sys.executable, "-m", "ptune.cli", *cmd, "--bundle", "nowhere", check=False)
        assert proc.returncode == 2  # stops on the missing bundle before binding anything
        assert "warning: --host 0.0.0.0 listens beyond this machine" in proc.stderr
        assert "nowhere: no deploy bundle here" in proc.stderr and "Traceback" not in proc.stderr
    proc = serving_project.run(
        sys.executable, "-m", "ptune.cli", "serve", "web", "--share", "--bundle", "nowhere", check=False
    )
    assert proc.returncode == 2 and "--share is not offered" in proc.stderr and "Traceback" not in proc.stderr


def test_docs_are_closed_with_a_key_and_server_errors_say_nothing_inside(api):
    """With --api-key (the fixture's PTUNE_API_KEY), /docs and /openapi.json are gone; a seed torch cannot take is a
    400 naming `seed` (it was a 500 carrying the exception's text)."""
    for path in ("/docs", "/openapi.json"):
        assert api.get(path, check=False)[0] == 404
    for seed in (2**70, 2**63, -1):
        status, error = api.post(
            "/", {"prompt": "类型#裤", "seed": seed, "max_new_tokens": 1}, headers=AUTH, check=False
        )
        assert status == 400 and error["error"]["param"] == "seed" and "must be 0 to" in error["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="seed"):
        _client(api).chat.completions.create(
            model="ptune", messages=[{"role": "user", "content": "x"}], seed=2**64, max_tokens=1
        )
    assert "Traceback" not in api.output()


FAILED_INSIDE = {
    "nan": ("/", '{"prompt": "x", "temperature": NaN}', "temperature", "temperature nan: must be a number"),
    "1e-45": ("/", '{"prompt": "x", "temperature": 1e-45}', "temperature", "or at least 0.01"),
    "1e-300": ("/", '{"prompt": "x", "temperature": 1e-300}', "temperature", "or at least 0.01"),
    "infinity": ("/", '{"prompt": "x", "temperature": Infinity}', "temperature", "temperature inf: must be"),
    "top_p-nan": ("/", '{"prompt": "x", "top_p": NaN}', "top_p", "top_p nan: must be"),
    "chat-1e-300": (CHAT, "{" + USER_X + ', "temperature": 1e-300}', "temperature", "or at least 0.01"),
    "chat-stream-1e-300": (CHAT, "{" + USER_X + ', "stream": true, "temperature": 1e-300}', "temperature", "0.01"),
    "surrogate-prompt": ("/", '{"prompt": "\\ud800"}', "prompt", "lone UTF-16 surrogate (U+D800"),
    "surrogate-history": ("/", '{"prompt": "x", "history": [["a\\udfff", "b"]]}', "history", "round 0's question"),
    "surrogate-message": (CHAT, "{" + USER_X.replace('"x"', '"a\\ud800b"') + "}", "messages", "at character 1"),
    "nested": ("/", "[" * 100_000, "body", "nests arrays or objects too deeply"),
    "chat-nested": (CHAT, '{"model": "ptune", "messages": ' + "[" * 100_000, "body", "too deeply"),
}


@pytest.mark.parametrize("path,body,param,says", FAILED_INSIDE.values(), ids=FAILED_INSIDE.keys())
def test_numbers_and_text_that_failed_inside_get_400_naming_the_field(api, path, body, param, says):
    """Each used to be a 500 (the sampling, the tokenizer or json.loads failed); now a 400 in OpenAI's shape that
    names the field and says what it takes, refused before any work: nothing is logged as a failure."""
    mark = api.lines
    status, error = _raw(api, path, body.encode())
    assert status == 400, error
    assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error", error
    assert says in error["error"]["message"], error
    assert "failed" not in api.output(since=mark)


def test_a_500_carries_a_request_id_and_no_details(api):
    """A request that fails inside answers a generic 500 with a request id; the exception and its traceback are in
    the server's log under that id, not in the answer. Every request that once failed inside is refused as bad input
    now (the test above), so the failure here is the server's own: its scheduler's process is killed under the
    request, as the kernel's OOM killer kills (stopped first, so that the request is surely in flight when it
    dies); a thread then takes over."""
    (child,) = [c for c in psutil.Process(api._proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    body = {"prompt": "类型#裤", "seed": 1, "max_new_tokens": 4}
    mark = api.lines
    child.suspend()
    try:
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(api.post, "/", body, headers=AUTH, check=False)
            deadline = time.monotonic() + 30
            while api.get("/health", headers=AUTH)[1]["pending"] == 0:
                assert time.monotonic() < deadline, "the request never reached the engine"
                time.sleep(0.01)
            child.kill()
            status, error = asked.result(timeout=60)
    finally:
        if alive(child.pid):
            child.kill()
    assert status == 500, error
    message = error["error"]["message"]
    said = re.fullmatch(r"the server failed to answer \(request id (\w+); the server's log has the details\)", message)
    assert said, message
    ident = said.group(1)
    time.sleep(0.5)  # the log line may trail the answer
    assert f"request {ident} failed" in api.output(since=mark) and "Traceback" in api.output(since=mark)
    deadline = time.monotonic() + 30
    while api.get("/health", check=False)[0] != 200:  # a thread takes over (decoding for the tests below)
        assert time.monotonic() < deadline, "the server did not recover: " + api.output(since=mark)[-2000:]
        time.sleep(0.05)
    assert api.post("/", body, headers=AUTH)[0] == 200


def test_cross_origin_simple_requests_are_refused(api):
    """What any web page can make a browser send without a preflight (text/plain, a form) gets 415, not an answer."""
    body = json.dumps({"prompt": "类型#裤", "max_new_tokens": 1}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, error = _raw(api, "/", body, {"Content-Type": content_type, "Origin": "http://evil.example"})
        assert status == 415, error
        assert "Content-Type: application/json" in error["error"]["message"]
    req = urllib.request.Request(api.url + "/v1/chat/completions", data=body, method="POST", headers=AUTH)
    req.remove_header("Content-type")  # urllib would add a form type
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=60)
    assert exc.value.code == 415
    assert _raw(api, "/", body)[0] == 200


def _rounds(n: int, chars: int) -> list[list[str]]:
    """n history rounds of about `chars` characters in all."""
    each = max(1, chars // (2 * n))
    return [["类型#裤" * (each // 4) + str(i), "好" * each] for i in range(n)]


def test_long_histories_are_capped_and_truncated_quickly(api):
    """The issue's attack: a long history was re-tokenized once per dropped round (1,500 rounds: 22.7 s). At the
    caps (64 rounds, 32,000 characters) a request answers promptly; past them it is refused at once."""
    t0 = time.perf_counter()
    history = _rounds(64, 31_000)
    status, body = api.post("/", {"prompt": "类型#裤", "history": history, "max_new_tokens": 1}, headers=AUTH)
    at_cap = time.perf_counter() - t0
    assert status == 200 and at_cap < 30, at_cap
    t0 = time.perf_counter()
    status, error = api.post("/", {"prompt": "x", "history": _rounds(65, 1000)}, headers=AUTH, check=False)
    assert status == 400 and error["error"]["code"] == "too_many_rounds" and "--max-rounds" in error["error"]["message"]
    status, error = api.post("/", {"prompt": "x", "history": _rounds(10, 40_000)}, headers=AUTH, check=False)
    assert status == 413 and "--max-chars" in error["error"]["message"] and error["error"]["param"] == "history"
    status, error = api.post("/", {"prompt": "x" * 40_000}, headers=AUTH, check=False)
    assert status == 413 and error["error"]["param"] == "prompt"
    messages = [{"role": r, "content": "好"} for _ in range(65) for r in ("user", "assistant")]
    with pytest.raises(openai.BadRequestError, match="--max-rounds"):
        _client(api).chat.completions.create(model="ptune", messages=[*messages, {"role": "user", "content": "x"}])
    assert time.perf_counter() - t0 < 30


def test_busy_and_over_the_caps_are_refused_before_any_tokenization(serving_project):
    """The request counts as pending before its prompt is tokenized: past --max-pending (and past the caps) the
    tokenizer is never called."""
    from ptune.serve.engine import Busy, Engine, Limits, RequestError

    from support.serving import _bundle

    bundle = _bundle(str(serving_project.root), False)
    calls = []
    tokenizer = bundle.tokenizer
    original = type(tokenizer)
    tokenizer.__class__ = type(
        "Watched", (original,), {"__call__": lambda self, *a, **k: calls.append(a) or original.__call__(self, *a, **k)}
    )
    try:
        engine = Engine(bundle, "ptune", "test", max_pending=0)
        with pytest.raises(Busy):
            engine.start("类型#裤", [("好", "好")] * 60)
        engine = Engine(bundle, "ptune", "test", limits=Limits(max_rounds=2))
        with pytest.raises(RequestError, match="--max-rounds"):
            engine.start("类型#裤", [("好", "好")] * 3)
        assert calls == [] and engine.pending == 0
        engine.start("类型#裤", [("好", "好")] * 2, engine.settings(max_new_tokens=1)).wait()
        assert calls and engine.pending == 0
    finally:
        tokenizer.__class__ = original


def test_a_non_streaming_client_that_goes_away_stops_its_generation(api):
    """A non-streaming request whose client closes the connection stops generating within a decoding step or so
    (it used to run to max_tokens with nobody waiting): the server's pending count drops at once, and its log says
    how few tokens were generated."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(api.url).hostname, urlsplit(api.url).port
    long = {"model": "ptune", "messages": [{"role": "user", "content": "类型#裤"}], "max_tokens": 480}
    long.update(temperature=2.0, top_p=1.0)
    # A seed whose answer runs to max_tokens when nobody goes away (found by asking: sampling is seeded).
    for seed in range(40):
        status, body = api.post("/v1/chat/completions", {**long, "seed": seed}, headers=AUTH)
        if body["choices"][0]["finish_reason"] == "length":
            break
    else:
        pytest.fail("no seed in 0..39 gave a 480-token answer")
    full = body["usage"]["completion_tokens"]
    data = json.dumps({**long, "seed": seed}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    mark = api.lines
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + data)
        deadline = time.monotonic() + 30
        while api.get("/health", headers=AUTH)[1]["pending"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    t0 = time.monotonic()
    while api.get("/health", headers=AUTH)[1]["pending"] != 0:
        assert time.monotonic() - t0 < 30, "the generation went on after its client left"
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while "generation cancelled" not in api.output(since=mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = re.findall(r"generation cancelled after (\d+) new tokens", api.output(since=mark))
    assert len(cancelled) == 1, api.output(since=mark)[-3000:]
    assert int(cancelled[0]) < full, (cancelled[0], full)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_scheduler_process_leaves_with_the_server(serving_project, sig):
    """On a CPU the server decodes in a child process: it answers through it, and the child does not outlive the
    server, whether the server is stopped (SIGTERM, as uvicorn, DVC or a terminal stop it) or killed (SIGKILL, as
    the kernel's OOM killer does, with no chance to stop its child)."""
    with ApiProcess(["--bundle", "models/deploy"], cwd=serving_project.root, env=serving_project.env) as server:
        server_pid = server._proc.pid
        # Its children: the scheduler, and multiprocessing's resource tracker (which ends once nobody holds it).
        children = psutil.Process(server_pid).children()
        (child,) = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        status, body = server.post("/", _seed_body("类型#裤", 1))
        assert status == 200 and body["response"]
        os.kill(server_pid, sig)
        deadline = time.monotonic() + 30
        while any(alive(c.pid) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [c.pid for c in children if alive(c.pid)]
        assert not left, f"processes {left} (the scheduler: {child.pid}) outlived the server ({sig.name})"


def test_more_clients_than_max_pending_get_503_with_retry_after_and_the_rest_their_answers(serving_project):
    """Past --max-pending the server says busy at once (503, Retry-After, an OpenAI-shaped error) instead of queueing
    without bound; the requests it took are answered, and it answers again once they are done."""
    body = json.dumps({**_seed_body("类型#裤", 1), "temperature": 2.0, "top_p": 1.0, "max_new_tokens": 300}).encode()

    def ask(url: str) -> tuple[int, str | None, dict]:
        req = urllib.request.Request(url + "/", data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, None, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Retry-After"), json.loads(exc.read())

    with ApiProcess(["--bundle", "models/deploy", "--max-pending", "2"], cwd=serving_project.root) as server:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, [server.url] * 8))
        busy = [(retry, answer) for status, retry, answer in got if status == 503]
        assert sorted({status for status, _, _ in got}) == [200, 503], got
        assert len(got) - len(busy) >= 2  # the first two (and any that came once one had ended)
        for retry, answer in busy:
            assert retry == "1" and answer["error"]["code"] == "server_busy" and "busy" in answer["error"]["message"]
        assert all(answer["response"] for status, _, answer in got if status == 200)
        assert ask(server.url)[0] == 200
