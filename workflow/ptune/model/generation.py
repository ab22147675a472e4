"""Batched generation over token-id prompts: sorted by length, left-padded, seeded per batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ..config import GenerationConfig
from ..errors import PtuneError
from ..state import faults, stopping
from ..state.resume import Journal
from .backends import Backend

log = logging.getLogger(__name__)


def generation_kwargs(cfg: GenerationConfig, tokenizer, stop_ids: Sequence[int] | None = None) -> dict:
    """generate() arguments; `stop_ids`: the tokens an answer ends with (prompts.Prompter.stop_ids), else EOS."""
    kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": list(stop_ids) if stop_ids else tokenizer.eos_token_id,
    }
    if cfg.do_sample:
        kwargs.update(top_p=cfg.top_p, temperature=cfg.temperature)
    else:
        # Unset sampling knobs a model's generation_config may carry, so greedy really is greedy.
        kwargs.update(top_p=None, top_k=None, temperature=None)
    return kwargs


def _stop_criteria():
    """Ends generate() at the next token once a stop is requested (state/stopping.py), so that a stop does not wait
    for a long batch; the batch is then dropped, never journalled. A plain bool: transformers 4.33 (ChatGLM-6B's
    environment) takes any() of the criteria, 5.x ORs them into its per-row tensor."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnStopRequest(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return stopping.requested() is not None

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
    journal: Journal | None = None,
    shard: tuple[int, int] = (0, 1),
    stop_ids: Sequence[int] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str | None]:
    """Decoded completions (special tokens skipped), in the order of `prompts`; `encoder` None: the base alone;
    `backend` generates (backends.Backend); `stop_ids`: the tokens an answer ends with.

    With a `journal`, each finished batch is recorded there and batches it already holds are not generated
    again: a killed run continues where it stopped, with the same results. `shard=(rank, n)` generates only
    the batches b with b % n == rank (the rows of the others stay None): n processes share the work, and each
    batch is the one a single process would make (same rows, same seed), so the merged result does not depend
    on n.

    A stop request (SIGTERM, SIGINT, SIGHUP; state/stopping.py) ends generation at the next token: the batch being
    generated is dropped and stopping.Stopped raised, the journal holding every batch finished before it.
    `on_batch(batches_done, examples_done)` follows each new batch (live progress), counting this shard's batches,
    the ones a resumed run found in the journal included.
    """
    kwargs = {**generation_kwargs(cfg, tokenizer, stop_ids), "stopping_criteria": _stop_criteria()}
    rank, n = shard
    batches = length_sorted_batches(prompts, batch_size)
    done = journal.done if journal is not None else {}
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
                _stop_if_requested(desc, n_done, len(mine))
                # Seeded per batch (seed + batch index): a resumed run samples what an uninterrupted one would.
                torch.manual_seed(seed + b)
                new = backend.generate(model, encoder, tokenizer, [prompts[i] for i in batches[b]], kwargs)
                _stop_if_requested(desc, n_done, len(mine))  # cut short by the request: not a result
                texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                if journal is not None:
                    journal.record(b, texts)
                faults.point("batch")
            for i, text in zip(batches[b], texts):
                out[i] = text
            bar.update(len(batches[b]))
            n_done, examples = n_done + 1, examples + len(batches[b])
            if on_batch is not None and fresh:
                on_batch(n_done, examples)
    return out


def _stop_if_requested(desc: str, n_done: int, n_batches: int) -> None:
    request = stopping.requested()
    if request is not None:
        raise stopping.Stopped(
            request, f"{desc}: stopped ({request.reason}) with {n_done} of {n_batches} batches generated"
        )
