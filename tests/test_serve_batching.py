"""The engine's continuous batching, in this process on the tiny bundle: requests that arrive together are decoded
together, and an answer does not depend on who else is asking (greedy: token-identical; seeded: the same text)."""

from __future__ import annotations

import contextlib
import time

import pytest

from support.serving import _bundle, cases, dev_prompts, reference_answer


@pytest.fixture(scope="module")
def engine(serving_project):
    from ptune.serve.engine import Engine

    with contextlib.chdir(serving_project.root):
        bundle = _bundle(str(serving_project.root), False)
    return Engine(bundle, "ptune", "test bundle", max_pending=32, max_batch=8)


def _together(engine, requests):
    """Start every request at once (the scheduler batches what is waiting); their replies, finished."""
    replies = [engine.start(prompt, settings=settings) for prompt, settings in requests]
    return [r.wait() for r in replies]


def test_greedy_answers_are_token_identical_alone_and_in_a_batch(engine, serving_project):
    prompts = dev_prompts(serving_project.root)[:6]
    greedy = engine.settings(max_new_tokens=24, do_sample=False)
    alone = [engine.complete(p, settings=greedy) for p in prompts]
    before = engine.scheduler.largest_batch
    batched = _together(engine, [(p, greedy) for p in prompts])
    assert engine.scheduler.largest_batch >= 2 or before >= 2, "the requests were never decoded together"
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]


def test_seeded_answers_are_the_same_alone_and_among_others(engine, serving_project):
    """Each row samples with its own generator: the bundle's lone answer (Bundle.answer) whatever runs beside it,
    greedy and sampled rows of different lengths mixed in the same batch."""
    todo = cases(serving_project.root, 4)
    requests = []
    for prompt, seed, _ in todo:
        requests.append((prompt, engine.settings(seed=seed, temperature=0.95, top_p=0.7, do_sample=True)))
        requests.append((prompt, engine.settings(max_new_tokens=7, do_sample=False)))
    replies = _together(engine, requests)
    for (prompt, seed, expected), reply in zip(todo, replies[::2]):
        assert reply.text == expected == reference_answer(serving_project.root, prompt, seed)
    assert all(r.completion_tokens <= 7 for r in replies[1::2])


def test_a_cancelled_row_leaves_the_batch_within_a_step(engine, serving_project):
    prompt = dev_prompts(serving_project.root)[0]
    long = engine.settings(max_new_tokens=400, do_sample=True, seed=3)
    others = [
        engine.start(prompt, settings=engine.settings(max_new_tokens=400, do_sample=True, seed=s)) for s in (4, 5)
    ]
    reply = engine.start(prompt, settings=long)
    pieces = iter(reply)
    next(pieces)  # it is decoding
    reply.cancel()
    steps = engine.scheduler.steps
    deadline = time.monotonic() + 30
    while not reply.done and time.monotonic() < deadline:
        time.sleep(0.001)
    assert reply.done and reply.finish_reason == "cancelled"
    assert engine.scheduler.steps - steps <= 1
    for other in others:
        other.cancel()
        other.wait()
    while (engine.pending or engine.scheduler.busy_rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending == 0 and engine.scheduler.busy_rows == 0


def test_one_at_a_time_gives_the_batched_answers(engine, serving_project):
    """`--max-batch 1` (and the chatglm backend) generate through the backend's own generate behind a lock: the same
    greedy and seeded answers, token counts and finish reasons as the scheduler."""
    from ptune.serve.engine import Engine

    single = Engine(engine.bundle, "ptune", "one at a time", max_pending=32, max_batch=1)
    assert single.scheduler is None
    prompt, seed, expected = cases(serving_project.root, 1)[0]
    for settings in (
        engine.settings(max_new_tokens=24, do_sample=False),
        engine.settings(seed=seed, temperature=0.95, top_p=0.7, do_sample=True),
    ):
        a, b = single.complete(prompt, settings=settings), engine.complete(prompt, settings=settings)
        assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)
    assert a.text == expected
