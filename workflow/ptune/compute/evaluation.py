"""Batched generation over token-id prompts: sorted by length, left-padded, seeded per batch.

What happens around the batches (a journal of finished ones, stop requests, fault points, live progress) belongs
to the run that calls generate_all: it comes in as one `BatchRun` (an evaluate stage's run context,
stages/run_context.py), or `Unattended` (benchmarks, tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import torch
from tqdm import tqdm

from ..config import GenerationConfig
from ..data.batching import IGNORE_INDEX
from ..errors import PtuneError
from ..model.backends import Backend
from ..model.generation import generation_kwargs
from ..state import stopping

log = logging.getLogger(__name__)


class BatchRun(Protocol):
    """What generate_all asks of the run around it."""

    @property
    def done(self) -> Mapping[int, list[str]]:
        """Batches finished earlier (a resumed run), by batch index: not generated again."""
        ...

    def stop_request(self) -> stopping.Request | None:
        """The stop request received so far (state/stopping.py), if any."""
        ...

    def batch_done(self, batch: int, texts: list[str]) -> None:
        """A batch newly generated: keep it (journal) before anything else may end the run."""
        ...

    def progress(self, batches_done: int, examples_done: int) -> None:
        """After each newly generated batch (live progress); counts include the batches found in `done`."""
        ...


class Unattended:
    """A run with nothing around it: no journal, no progress; a stop request (if the process takes them) still
    ends generation."""

    done: Mapping[int, list[str]] = MappingProxyType({})

    def stop_request(self) -> stopping.Request | None:
        return stopping.requested()

    def batch_done(self, batch: int, texts: list[str]) -> None:
        pass

    def progress(self, batches_done: int, examples_done: int) -> None:
        pass


def _stop_criteria(run: BatchRun):
    """Ends generate() at the next token once a stop is requested (state/stopping.py), so that a stop does not wait
    for a long batch; the batch is then dropped, never journalled. A plain bool: transformers 4.33 (ChatGLM-6B's
    environment) takes any() of the criteria, 5.x ORs them into its per-row tensor."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnStopRequest(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return run.stop_request() is not None

    return StoppingCriteriaList([OnStopRequest()])


def length_sorted_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (less padding), in a deterministic order."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def in_prompt_order(batches: list[list[int]], texts_by_batch: dict[int, list[str]], n_prompts: int) -> list[str]:
    """Completions placed back at their prompts' positions; raises if a batch has none."""
    missing = [b for b in range(len(batches)) if b not in texts_by_batch]
    if missing:
        raise PtuneError(
            f"evaluate: no completions for batches {missing[:5]} of {len(batches)}; rerun the stage to generate them"
        )
    out: list[str] = [""] * n_prompts
    for b, idx in enumerate(batches):
        for i, text in zip(idx, texts_by_batch[b]):
            out[i] = text
    return out


def generate_all(
    model,
    encoder,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    batch_size: int,
    seed: int,
    desc: str,
    backend: Backend,
    shard: tuple[int, int] = (0, 1),
    stop_ids: Sequence[int] | None = None,
    run: BatchRun | None = None,
) -> list[str | None]:
    """Decoded completions (special tokens skipped), in the order of `prompts`; `encoder` None: the base alone;
    `backend` generates (backends.Backend); `stop_ids`: the tokens an answer ends with.

    Batches `run.done` holds are not generated again, and each new one goes to `run.batch_done`: with a journal
    there, a killed run continues where it stopped, with the same results. `shard=(rank, n)` generates only the
    batches b with b % n == rank (the rows of the others stay None): n processes share the work, and each batch is
    the one a single process would make (same rows, same seed), so the merged result does not depend on n.

    A stop request (`run.stop_request()`) ends generation at the next token: the batch being generated is dropped
    and stopping.Stopped raised, every batch finished before it already passed to `run.batch_done`.
    """
    run = run if run is not None else Unattended()
    kwargs = {**generation_kwargs(cfg, tokenizer, stop_ids), "stopping_criteria": _stop_criteria(run)}
    rank, n = shard
    batches = length_sorted_batches(prompts, batch_size)
    done = run.done
    mine = [b for b in range(len(batches)) if b % n == rank]
    resumed = sum(1 for b in mine if b in done)
    if resumed:
        log.info("%s: resuming, %d of %d batches already done", desc, resumed, len(mine))
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=sum(len(batches[b]) for b in mine), desc=desc, unit="ex", mininterval=2) as bar:
        n_done = examples = 0
        for b in mine:
            fresh = b not in done
            if not fresh:
                texts = done[b]
            else:
                _stop_if_requested(run, desc, n_done, len(mine))
                # Seeded per batch (seed + batch index): a resumed run samples what an uninterrupted one would.
                torch.manual_seed(seed + b)
                new = backend.generate(model, encoder, tokenizer, [prompts[i] for i in batches[b]], kwargs)
                _stop_if_requested(run, desc, n_done, len(mine))  # cut short by the request: not a result
                texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                run.batch_done(b, texts)
            for i, text in zip(batches[b], texts):
                out[i] = text
            bar.update(len(batches[b]))
            n_done, examples = n_done + 1, examples + len(batches[b])
            if fresh:
                run.progress(n_done, examples)
    return out


def _stop_if_requested(run: BatchRun, desc: str, n_done: int, n_batches: int) -> None:
    request = run.stop_request()
    if request is not None:
        raise stopping.Stopped(
            request, f"{desc}: stopped ({request.reason}) with {n_done} of {n_batches} batches generated"
        )


def teacher_forced_nll(
    model,
    encoder,
    tokenizer,
    backend: Backend,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
) -> list[float]:
    """Each example's summed negative log-likelihood (nats) of its response tokens given its prompt, teacher-forced,
    with the prefix (`encoder`) or the base alone (None). `examples`: (prompt ids, response ids) pairs.

    One example per forward pass through the backend's own training loss (its mean over the response's tokens,
    times their count): no padding enters a score, and any backend that trains can score."""
    out = []
    with torch.no_grad():
        for prompt, response in examples:
            ids = list(prompt) + list(response)
            labels = [IGNORE_INDEX] * len(prompt) + list(response)
            batch = backend.collate([{"input_ids": ids, "labels": labels}], pad_id)
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            # The first token has no context to be predicted from: a prompt-less response scores from its second.
            scored = len(response) - (0 if prompt else 1)
            out.append(float(backend.loss(model, encoder, batch)) * scored if scored > 0 else 0.0)
    return out
