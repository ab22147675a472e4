"""The engine's continuous batching, in this process on the tiny bundle: requests that arrive together are decoded
together, and an answer does not depend on who else is asking (greedy: token-identical; seeded: the same text)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
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
        assert a.token_ids == b.token_ids
    assert a.text == expected


def test_more_requests_than_rows_wait_their_turn_and_get_their_lone_answers(engine, serving_project):
    """Twelve requests at once through a batch of three rows: rows join between steps as others leave, never more
    than three at once, and every answer (greedy or seeded, of different lengths) is the one it gets alone."""
    from ptune.serve.engine import Engine

    small = Engine(engine.bundle, "ptune", "three rows", max_pending=32, max_batch=3)
    prompts = dev_prompts(serving_project.root)[:6]
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append((prompt, small.settings(max_new_tokens=5 + 3 * i, do_sample=False)))
        requests.append((prompt, small.settings(seed=i, temperature=0.95, top_p=0.7, do_sample=True)))
    alone = [small.complete(p, settings=s) for p, s in requests]
    together = _together(small, requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert 2 <= small.scheduler.largest_batch <= 3
    deadline = time.monotonic() + 30
    while (small.pending or small.scheduler.busy_rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert small.pending == 0 and small.scheduler.busy_rows == 0


def test_a_request_cancelled_while_it_waits_never_runs(engine, serving_project):
    """With the one row busy, a waiting request that is cancelled ends with no token, and the running one is
    unaffected."""
    from ptune.serve.engine import Engine

    one = Engine(engine.bundle, "ptune", "one row", max_pending=32, max_batch=1)
    prompt = dev_prompts(serving_project.root)[0]
    settings = one.settings(max_new_tokens=200, do_sample=True, seed=7)
    expected = one.complete(prompt, settings=settings).token_ids
    running = one.start(prompt, settings=settings)
    waiting = one.start(prompt, settings=settings)
    waiting.cancel()
    assert waiting.wait().token_ids == [] and waiting.finish_reason == "cancelled"
    assert running.wait().token_ids == expected


def test_a_reader_gets_every_token_since_it_last_looked_as_one_piece(engine, serving_project):
    """The scheduler only hands token ids over; the reader decodes them when it looks: a reader that looks once the
    answer is done gets it in one piece, the same text as one that reads along, and `wait` decodes nothing."""
    prompt, seed, expected = cases(serving_project.root, 1)[0]
    settings = engine.settings(seed=seed, temperature=0.95, top_p=0.7, do_sample=True)
    along = engine.start(prompt, settings=settings)
    pieces_along = list(along)
    late = engine.start(prompt, settings=settings).wait()
    assert "".join(pieces_along) == along.text == late.text == expected
    assert list(late) == [expected]


def test_async_readers_read_the_same_pieces_and_are_woken_at_the_end(engine, serving_project):
    """What the HTTP API does on its event loop: `async for` over `pieces()` (no thread per token), and `ended`
    (no polling for the end: it returns as soon as the answer is done)."""
    prompt, seed, expected = cases(serving_project.root, 1)[0]
    settings = engine.settings(seed=seed, temperature=0.95, top_p=0.7, do_sample=True)
    long = engine.settings(max_new_tokens=300, temperature=2.0, top_p=1.0, do_sample=True, seed=1)

    async def read():
        streamed = engine.start(prompt, settings=settings)
        pieces = [piece async for piece in streamed.pieces()]
        # Pieces at most every 10 s: the first at once, then the rest together when the answer ends.
        grouped = engine.start(prompt, settings=settings)
        t0 = time.monotonic()
        chunks = [piece async for piece in grouped.pieces(every=10)]
        assert time.monotonic() - t0 < 5 and len(chunks) <= 2 and "".join(chunks) == expected
        whole = engine.start(prompt, settings=settings)
        assert await whole.ended()
        slow = engine.start(prompt, settings=long)
        short = await slow.ended(0.0001)  # a 300-token answer is not done this soon
        slow.cancel()
        assert await slow.ended(30)
        return pieces, streamed, whole, short, slow

    pieces, streamed, whole, short, slow = asyncio.run(read())
    assert "".join(pieces) == streamed.text == whole.text == expected
    assert not short and slow.finish_reason == "cancelled"
    assert threading.active_count() < 50  # no thread per reader


def test_the_scheduler_threads_are_the_users_or_all_but_a_core(monkeypatch):
    import torch

    from ptune.errors import PtuneError
    from ptune.serve.batching import THREADS_ENV, scheduler_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert scheduler_threads(torch.device("cpu")) == max(1, torch.get_num_threads() - 1)
    assert scheduler_threads(torch.device("cuda")) is None
    monkeypatch.setenv(THREADS_ENV, "3")
    assert scheduler_threads(torch.device("cpu")) == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(PtuneError, match=THREADS_ENV):
        scheduler_threads(torch.device("cpu"))


def test_on_a_cpu_the_scheduler_runs_in_its_own_process_and_answers_as_a_thread(engine, serving_project, monkeypatch):
    """Asked for (as `ptune serve` asks), on a CPU the scheduler runs in a child process (the model's Python and the
    server's then never wait for each other's GIL), on the engine's own weights (shared memory, no copy);
    `PTUNE_SERVE_PROCESS=0` keeps it in a thread. Both give the same tokens, greedy or seeded, alone or together."""
    import gc

    from ptune.serve.batching import Scheduler
    from ptune.serve.engine import Engine
    from ptune.serve.scheduler_process import PROCESS_ENV, SchedulerProcess

    assert type(engine.scheduler) is Scheduler  # the fixture's: a thread unless asked
    monkeypatch.setenv(PROCESS_ENV, "0")
    assert type(Engine(engine.bundle, "ptune", "a thread", max_batch=8, own_process=True).scheduler) is Scheduler
    monkeypatch.delenv(PROCESS_ENV)
    apart = Engine(engine.bundle, "ptune", "a process", max_pending=32, max_batch=8, own_process=True)._ready()
    assert isinstance(apart.scheduler, SchedulerProcess)
    assert engine.bundle.model.get_input_embeddings().weight.is_shared()
    todo = cases(serving_project.root, 3)
    requests = [(p, engine.settings(seed=s, temperature=0.95, top_p=0.7, do_sample=True)) for p, s, _ in todo]
    requests += [(p, engine.settings(max_new_tokens=9, do_sample=False)) for p, _, _ in todo]
    assert [r.token_ids for r in _together(apart, requests)] == [r.token_ids for r in _together(engine, requests)]
    assert apart.complete(todo[0][0], settings=requests[0][1]).text == todo[0][2]
    # An engine that is dropped ends its process.
    process = apart.scheduler._process
    del apart
    gc.collect()
    process.join(timeout=10)
    assert not process.is_alive()


def test_a_scheduler_process_that_cannot_start_falls_back_to_a_thread(engine, monkeypatch, caplog):
    from ptune.serve import batching, scheduler_process
    from ptune.serve.engine import Engine

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot pickle this model")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler_process, "SchedulerProcess", refuse)
        fallback = Engine(engine.bundle, "ptune", "fallback", max_pending=32, max_batch=8, own_process=True)
    assert type(fallback.scheduler) is batching.Scheduler
    assert "decoding in a thread" in caplog.text
    assert fallback.complete("类型#裤", settings=fallback.settings(max_new_tokens=3)).completion_tokens >= 1
    # A child started early (as `ptune serve` starts it, before loading) that the engine does not use is ended.
    for unused in ({"own_process": False}, {"own_process": True, "max_batch": 1}):
        child = scheduler_process.Child()
        kept = Engine(engine.bundle, "ptune", "no process", **unused, child=child)
        assert type(kept.scheduler) is not scheduler_process.SchedulerProcess
        assert not child.process.is_alive()


def test_a_scheduler_process_that_dies_fails_its_rows_and_a_thread_takes_over(engine, serving_project, caplog):
    """Killed (SIGKILL, as the kernel's OOM killer kills), the child takes its rows with it: each running request gets
    an error (the API answers 500) and none stays pending; then a thread takes over (logged once) and answers as the
    process did. Until it has, the engine says it cannot answer (/health: 503), and a request that comes meanwhile
    waits for it rather than fail. Before that, a row whose callback raises in the reader thread fails alone: the
    answers after it still come."""
    from ptune.model.generation import generation_kwargs
    from ptune.serve.batching import Row, Scheduler
    from ptune.serve.engine import Engine

    doomed = Engine(engine.bundle, "ptune", "doomed", max_pending=32, max_batch=8, own_process=True)._ready()
    prompt = dev_prompts(serving_project.root)[0]
    greedy = doomed.settings(max_new_tokens=9, do_sample=False)
    expected = engine.complete(prompt, settings=greedy).token_ids  # the fixture's thread

    def broken(token: int) -> None:
        raise ValueError("a reader that breaks")

    ended = []
    ids = doomed.prompt_ids(prompt, (), 9)[0]
    kwargs = generation_kwargs(greedy, doomed.bundle.tokenizer, doomed.stop_ids)
    doomed.scheduler.submit(Row(ids, 9, kwargs, None, threading.Event(), broken, lambda t, e: ended.append(e)))
    after = doomed.start(prompt, settings=greedy)
    assert after._done.wait(60), "the reader thread stopped: no answer came after a row's callback raised"
    assert after.result().token_ids == expected
    assert [type(e) for e in ended] == [ValueError] and "handing over its token failed" in caplog.text

    running = doomed.start(prompt, settings=doomed.settings(max_new_tokens=400, temperature=2.0, top_p=1.0, seed=1))
    next(iter(running))  # it is decoding
    process = doomed.scheduler._process
    with ThreadPoolExecutor(1) as pool:
        with doomed._fallback_lock:  # held: the moment between the kill and the thread taking over
            process.kill()
            with pytest.raises(RuntimeError, match="process has ended"):
                running.wait()
            assert not doomed.available
            meanwhile = pool.submit(doomed.complete, prompt, (), greedy)
            time.sleep(0.2)
            assert not meanwhile.done()  # it waits for the thread
        assert meanwhile.result(timeout=60).token_ids == expected
    assert doomed.available and type(doomed.scheduler) is Scheduler
    assert doomed.complete(prompt, settings=greedy).token_ids == expected
    assert caplog.text.count("decoding in a thread from now on") == 1
    assert doomed.pending == 0
