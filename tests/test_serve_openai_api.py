"""What clients written for OpenAI or vLLM send to `ptune serve api` (issue 37), through the official `openai` client
against the server as a user starts it (its scheduler in a process of its own, on a CPU): stop strings, several
choices, log-probabilities, and fields it does not implement, streamed and not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from ptune.serve.process import ApiProcess

from support.serving import MAX_NEW_TOKENS, cases

KEY = "test-key-37"


@pytest.fixture(scope="module")
def api(serving_project):
    env = {**serving_project.env, "PTUNE_API_KEY": KEY}
    with ApiProcess(["--bundle", "models/deploy"], cwd=serving_project.root, env=env, start_timeout=300) as server:
        yield server
        assert server._proc.poll() is None, "the server died during the tests:\n" + server.output()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _sampled(prompt: str, seed: int, **extra) -> dict:
    """A seeded sampled request (the tiny model's greedy answers are blank)."""
    return dict(
        model="ptune",
        messages=[{"role": "user", "content": prompt}],
        seed=seed,
        temperature=0.95,
        top_p=0.7,
        max_tokens=MAX_NEW_TOKENS,
        **extra,
    )


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """A streamed request's text and finish reason per choice index, and its chunks."""
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


def _stop_in(answer: str) -> tuple[str, int]:
    """A two-character stop string inside `answer`, preferably one whose first character comes earlier too (that
    earlier character must be held back in a stream, then sent), and where it begins."""
    found = None
    for k in range(2, len(answer) - 1):
        stop = answer[k : k + 2]
        if answer.find(stop) == k and stop.strip() == stop:
            found = found or (stop, k)
            if stop[0] in answer[:k]:
                return stop, k
    assert found, f"no stop string to cut {answer!r} with"
    return found


def test_stop_ends_the_answer_before_the_first_stop_string_streamed_and_not(client, serving_project):
    (prompt, seed, full), *_ = cases(serving_project.root, 1, min_chars=8)
    whole = client.chat.completions.create(**_sampled(prompt, seed))
    assert whole.choices[0].message.content == full
    stop, at = _stop_in(full)
    expected = full[:at].rstrip()

    for given in (stop, [stop], ["never in any answer", stop]):
        cut = client.chat.completions.create(**_sampled(prompt, seed, stop=given))
        assert cut.choices[0].message.content == expected, (given, full)
        assert cut.choices[0].finish_reason == "stop"
        # The row ended there: it did not go on decoding to max_tokens.
        assert cut.usage.completion_tokens < whole.usage.completion_tokens

    # Streamed, the pieces add up to the same text: no piece ever held the stop string or its start.
    texts, finish, chunks = _streamed(client, **_sampled(prompt, seed, stop=stop))
    assert texts == {0: expected} and finish == {0: "stop"}
    assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens

    # The first of several stop strings to occur is the one that ends it.
    earlier = full[1:2]
    first = client.chat.completions.create(**_sampled(prompt, seed, stop=[stop, earlier]))
    assert first.choices[0].message.content == full[: full.find(earlier)].rstrip()


def test_stop_strings_cut_alike_in_a_batch_and_alone(client, serving_project):
    todo = cases(serving_project.root, 4, min_chars=8)
    stops = [_stop_in(answer)[0] for _, _, answer in todo]
    alone = [
        client.chat.completions.create(**_sampled(p, s, stop=stop)).choices[0].message.content
        for (p, s, _), stop in zip(todo, stops, strict=True)
    ]
    assert all(a == full[: full.find(stop)].rstrip() for a, (_, _, full), stop in zip(alone, todo, stops, strict=True))

    def ask(i: int) -> str:
        prompt, seed, _ = todo[i]
        if i % 2:
            return _streamed(client, **_sampled(prompt, seed, stop=stops[i]))[0][0]
        return client.chat.completions.create(**_sampled(prompt, seed, stop=stops[i])).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    assert together == alone


def test_n_choices_are_seeded_with_seed_plus_their_index_and_the_prompt_counted_once(client, serving_project):
    ((prompt, seed, _),) = cases(serving_project.root, 1)
    singles = [client.chat.completions.create(**_sampled(prompt, seed + i)) for i in range(3)]
    several = client.chat.completions.create(**_sampled(prompt, seed, n=3))
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.message.content for c in several.choices] == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in several.choices] == [s.choices[0].finish_reason for s in singles]
    assert len({c.message.content for c in several.choices}) == 3  # three seeds, three answers
    # As OpenAI counts: the prompt once, the completion tokens of every choice.
    assert several.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert several.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert several.usage.total_tokens == several.usage.prompt_tokens + several.usage.completion_tokens

    texts, finish, chunks = _streamed(client, **_sampled(prompt, seed, n=3))
    assert texts == {i: c.message.content for i, c in enumerate(several.choices)}
    assert finish == {i: c.finish_reason for i, c in enumerate(several.choices)}
    assert chunks[-1].usage.completion_tokens == several.usage.completion_tokens
    roles = [c.index for chunk in chunks for c in chunk.choices if c.delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]

    for n in (0, 5):  # the default --max-n is 4
        with pytest.raises(openai.BadRequestError, match="--max-n") as refused:
            client.chat.completions.create(**_sampled(prompt, seed, n=n))
        assert refused.value.body["param"] == "n"


def _check_logprobs(content: list, answer: str, top: int) -> None:
    """OpenAI's shape, and tokens whose bytes add up to the answer."""
    assert content, "no log-probabilities came back"
    joined = b""
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        raw = bytes(entry.bytes)
        joined += raw
        try:
            assert entry.token == raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI names it by its bytes
            assert entry.token.startswith("bytes:\\x")
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        if top:
            assert entry.logprob <= values[0] + 1e-6
    assert joined.decode("utf-8", errors="replace").strip() == answer


def test_logprobs_in_openai_shape_streamed_and_not(client, serving_project):
    ((prompt, seed, _),) = cases(serving_project.root, 1)
    plain = client.chat.completions.create(**_sampled(prompt, seed))
    assert plain.choices[0].logprobs is None  # not asked for, none given
    answer = plain.choices[0].message.content

    got = client.chat.completions.create(**_sampled(prompt, seed, logprobs=True, top_logprobs=3))
    assert got.choices[0].message.content == answer  # asking for them changes nothing of the answer
    content = got.choices[0].logprobs.content
    _check_logprobs(content, answer, 3)

    only = client.chat.completions.create(**_sampled(prompt, seed, logprobs=True))
    _check_logprobs(only.choices[0].logprobs.content, answer, 0)
    assert [e.token for e in only.choices[0].logprobs.content] == [e.token for e in content]

    texts, _, chunks = _streamed(client, **_sampled(prompt, seed, logprobs=True, top_logprobs=3))
    assert texts == {0: answer}
    streamed = [e for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)

    # n choices each get their own.
    several = client.chat.completions.create(**_sampled(prompt, seed, n=2, logprobs=True, top_logprobs=1))
    for choice in several.choices:
        _check_logprobs(choice.logprobs.content, choice.message.content, 1)

    # Greedy: each token is the likeliest.
    greedy = client.chat.completions.create(
        model="ptune", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    for entry in greedy.choices[0].logprobs.content:
        assert entry.token == entry.top_logprobs[0].token

    for bad, param in (
        (dict(logprobs=True, top_logprobs=6), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),  # without logprobs: true
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**_sampled(prompt, seed, **bad))
        assert refused.value.body["param"] == param


def test_fields_it_does_not_implement_are_refused_by_name_or_taken_where_they_ask_nothing(client, serving_project):
    ((prompt, seed, expected),) = cases(serving_project.root, 1)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = [
        (dict(tools=[tool]), "tools"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(logit_bias={"5": 10}), "logit_bias"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(presence_penalty=1.0), "presence_penalty"),
        (dict(extra_body={"top_k": 5}), "top_k"),  # vLLM's own
        (dict(extra_body={"repetition_penalty": 1.2}), "repetition_penalty"),
        (dict(extra_body={"whatever": 1}), "whatever"),
        (dict(extra_body={"min_tokens": False}), "min_tokens"),  # false is no 0
        (dict(stream_options={"include_usage": True, "continuous_usage_stats": True}, stream=True), None),
    ]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**_sampled(prompt, seed, **extra))
        body = error.value.body
        assert body["code"] == "unsupported_parameter", body
        if param:
            assert body["param"] == param and param in body["message"], body
        else:
            assert body["param"] == "stream_options.continuous_usage_stats", body
    # A message's own fields: `name` is ignored; an assistant message echoed back from a completion is taken.
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="ptune",
            messages=[
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "type": "function", "function": {
                    "name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": prompt},
            ],
        )  # fmt: skip
    assert error.value.body["param"] == "messages.1.tool_calls"

    # Taken: what changes nothing here, and the values that ask for nothing.
    taken = dict(
        user="someone",
        metadata={"k": "v"},
        store=False,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        response_format={"type": "text"},
        tool_choice="none",
        parallel_tool_calls=False,
        extra_body={"skip_special_tokens": True, "include_stop_str_in_output": False, "echo": False, "top_k": None},
    )  # null is no value, whatever the field
    answer = client.chat.completions.create(**_sampled(prompt, seed, **taken))
    assert answer.choices[0].message.content == expected
    echoed = client.chat.completions.create(**_sampled(prompt, seed))
    history = [
        {"role": "user", "content": prompt, "name": "alice"},
        echoed.choices[0].message.model_dump(exclude_unset=False),
        {"role": "user", "content": prompt},
    ]
    assert client.chat.completions.create(**{**_sampled(prompt, seed), "messages": history}).choices


def test_the_stop_filter_holds_back_what_may_begin_a_stop_string():
    from ptune.serve.reply_stream import _StopFilter

    f = _StopFilter(["</stop>", "END"])
    assert [f(p) for p in ["ab", "c<", "/st", "op", ">tail", "more"]] == ["ab", "c", "", "", "", ""]
    assert f.found and f.flush() == ""
    g = _StopFilter(["</stop>"])
    assert [g(p) for p in ["x<", "/s", "y", " E"]] == ["x", "", "</sy", " E"]
    assert not g.found and g.flush() == ""
    h = _StopFilter(["abc"])
    assert [h(p) for p in ["xa", "b"]] == ["x", ""] and h.flush() == "ab"  # the end: what was held goes out
