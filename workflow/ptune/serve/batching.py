"""Continuous batching: one scheduler owns the model and decodes every active request together.

Requests wait in a queue; between two decoding steps the scheduler admits waiting requests (up to `max_batch`
rows), runs each new prompt's prefill on its own (batch 1, exactly as a lone `generate` would), and merges its
keys/values into the running batch's cache, left-padded with the attention mask covering only real positions.
Each decoding step then runs the model once on the last token of every active row, with per-row position ids (and,
under SDPA, the boolean mask the model would build from the padded one, built here once per step).

Every row carries its own settings: greedy or sampled, temperature and top-p (the model's own logits processors,
built as `generate` builds them for that row alone), its own `torch.Generator` seeded with the request's seed,
its own max_new_tokens, and its own cancel event. Greedy rows without processors take their tokens from one argmax
over the batch (the index each row's own argmax gives). A row that ends (a stop token, its length, a cancel) leaves
the batch before the next step, so it costs nothing more; the cache's columns no remaining row uses are dropped.

A row may also end on stop strings (transformers' StopStringCriteria on its own new tokens, `generation.stop_check`:
the scheduler is given the tokenizer for it) and ask for log-probabilities: those of its token and of the likeliest
`logprobs` others, from the model's own logits (before temperature and top-p, as vLLM's default `raw_logprobs`),
handed to `on_token` with the token.

A row's prefill is its own and its draws come from its own generator, so a request's answer does not depend on who
else is asking: greedy answers are token-identical alone and in a batch, and a seeded sampled answer is the one the
bundle gives alone (`Bundle.answer`); tests/test_serve_batching.py checks both. That identity is of tokens, not of
bits: a batched step's matrix products round differently from a lone step's (CPU BLAS picks its kernel by the
number of rows: one row against several differ in the last bits of most logits), so two candidates tied to within
that rounding could in principle come out the other way in a batch. Batching the prefills of rows admitted together
would add the same kind of difference (it does even for prompts of one length), and saves little here (most rows
are admitted one at a time: bench/README.md), so prefills stay one per row.

The prefix's keys/values are computed once, when the scheduler starts, and reused by every prefill (no prefix
projection per request); in the cache each row holds them as the first `pre_seq_len` positions of its own row,
since attention needs one (batch, heads, length, dim) tensor per layer.

Several prefixes on one base (`ptune serve --bundle NAME=PATH` repeated): the scheduler is given one encoder per
name (None: the base alone, no prefix), each computed once, and a row names its own (`Row.prefix`). A row is
prefilled from its own prefix's keys/values, so rows of different prefixes, of different prefix lengths and without
a prefix merge into one batch exactly as rows of one prefix do: left-padded, the mask covering each row's own
positions (its prefix's and its tokens'), each row's positions counted from its own prefix's length. Its stop tokens
are its own too (`Row.stop_ids`: its bundle's prompt format's end of turn). Nothing in a row's computation reads
another row's prefix, so its answer is the one a server of that bundle alone gives (tests/test_serve_bundles.py).

Where it runs: for `ptune serve` on a CPU, in a child process of its own (serve/scheduler_process.py), on the
engine's weights shared through shared memory; elsewhere (`ptune chat`, a GPU, PTUNE_SERVE_PROCESS=0) in a thread.
Its torch threads: all the process's but one, leaving a core to the HTTP server (PTUNE_SERVE_THREADS overrides): on
the small models a CPU serves, a decoding step is mostly Python, and more threads only add the cost of waking them.

Models whose cache is not transformers' plain `DynamicLayer` (sliding-window or indexed layers) get batches of one
row; backends that generate through their own remote code (chatglm) are served one request at a time through the
backend's `generate` (see Engine).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import PtuneError
from ..model.generation import stop_check
from ..model.prefixed import cache_kwarg, filled_cache, prefix_key_values, stand_in_id

log = logging.getLogger(__name__)


THREADS_ENV = "PTUNE_SERVE_THREADS"


def scheduler_threads(device: torch.device) -> int | None:
    """torch's threads for the scheduler: $PTUNE_SERVE_THREADS, else on a CPU all but one of the process's (one core
    is left to the HTTP server, the tokenizer and the readers, which the decoding steps would otherwise wait for),
    else None (as the process has them)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise PtuneError(f"{THREADS_ENV}={value!r}: must be a whole number of threads, 1 or more")
        return int(value)
    if device.type != "cpu":
        return None
    return max(1, torch.get_num_threads() - 1)


# What `on_token` gets with a token for a row that asked for log-probabilities: the token's own, and the likeliest
# tokens' (id, log-probability), likeliest first.
TokenInfo = tuple[float, list[tuple[int, float]]]


class Row:
    """One request in the scheduler: its prompt, settings and the callbacks that hand its tokens out.

    `on_token(token)` gets each new token, `on_token(token, info)` where the row asked for log-probabilities
    (`logprobs`: how many alternatives besides the token's own; None: none); `stop`: strings the answer ends on."""

    def __init__(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        generation_kwargs: dict,
        seed: int | None,
        cancel: threading.Event,
        on_token: Callable[[int], None],
        on_done: Callable[[list[int], BaseException | None], None],
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        prefix: str | None = None,
        stop_ids: Sequence[int] | None = None,
    ):
        self.ids = list(ids)
        # Which of the scheduler's prefixes the row is prefilled with (a name of its `encoders`; None: its first),
        # and the tokens that end its answer (None: the scheduler's).
        self.prefix = prefix
        self.stop_ids = None if stop_ids is None else frozenset(stop_ids)
        self.stop = tuple(stop)
        self.logprobs = logprobs
        self.stop_check: Callable[[Sequence[int]], bool] | None = None
        self.max_new_tokens = max_new_tokens
        self.kwargs = generation_kwargs
        self.seed = seed
        self.cancel = cancel
        self.on_token = on_token
        self.on_done = on_done
        self.tokens: list[int] = []
        self.number = -1  # its number in a scheduler's child process
        self.processors = None
        self.do_sample = False
        self.plain = False  # greedy with no logits processor: the batch's one argmax picks its token
        self.generator: torch.Generator | None = None
        # What a lone generate's input_ids would hold, for the processors that read it: a buffer of the row's whole
        # length, `length` of it filled (a view of it is handed to the processors; no copy per token).
        self.history: torch.Tensor | None = None
        self.length = 0


class Scheduler:
    """Owns the model: decodes the active rows together, admitting waiting rows between steps."""

    def __init__(
        self,
        model,
        encoders,
        stop_ids: Sequence[int],
        max_batch: int = 8,
        threads: int | None = None,
        after_step: Callable[[], None] | None = None,
        tokenizer=None,
    ):
        """`encoders`: the prefix encoder (None: the base alone), or {name: encoder or None} for several, which a
        row names (`Row.prefix`; None: the first); `tokenizer`: for rows with stop strings (without it they are
        refused)."""
        self.model = model
        self.tokenizer = tokenizer
        self.threads = threads  # torch's threads in the scheduler thread (None: as the process has them)
        # Called after each admission and each step (the engine wakes the readers of the tokens and ends handed out
        # meanwhile: on_token and on_done are called in this thread).
        self.after_step = after_step or (lambda: None)
        self.encoders = encoders if isinstance(encoders, dict) else {None: encoders}
        self.stop_ids = set(stop_ids)
        self.max_batch = max(1, max_batch)
        self.device = next(model.parameters()).device
        self._cache_kw = cache_kwarg(model)
        self._keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
        # SDPA reads a boolean mask (True: attend); other attention implementations want other masks, built by the
        # model from the 2D one.
        self._bool_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._prefix_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Per prefix name: its keys/values per layer (empty for the base alone) and its length.
        self._prefixes: dict[str | None, tuple[list[tuple[torch.Tensor, torch.Tensor]], int]] = {}
        self._stand_in = stand_in_id(model)
        # The running batch: rows, and per row its last token, next position, mask and cache.
        self.active: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._configs: OrderedDict[tuple, object] = OrderedDict()  # generation configs by request settings
        self.steps = 0  # decoding steps run (for tests and logs)
        self.largest_batch = 0
        if not self.mergeable():
            self.max_batch = 1

    # -- public ---------------------------------------------------------------------------------------------------

    def submit(self, row: Row) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="ptune-scheduler")
                self._thread.start()
            self._waiting.append(row)
            self._cv.notify()

    def cancel(self, row: Row) -> None:
        """The row's cancel event is set: here the scheduler sees it itself."""

    @property
    def busy_rows(self) -> int:
        return len(self.active)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's own (OpenMP's and MKL's counts are per thread)
        with torch.no_grad():
            try:
                self._prepare_prefix()
            except BaseException as exc:  # every request gets the error
                log.exception("preparing the prefix failed")
                self._prefix_error = exc
            while True:
                with self._cv:
                    while not self._waiting and not self.active:
                        self._cv.wait()
                    admit = []
                    while self._waiting and len(self.active) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                for row in admit:
                    self._admit(row)
                    self.after_step()
                self._drop_cancelled()
                self.after_step()  # rows cancelled meanwhile are reported ended before the next step
                if self.active:
                    try:
                        self._step()
                    except BaseException as exc:
                        log.exception("a decoding step failed")
                        rows, self.active = self.active, []
                        self._cache = self._mask = self._last = self._pos = None
                        for row in rows:
                            row.on_done(row.tokens, exc)
                self.after_step()

    def _prepare_prefix(self) -> None:
        """Each prefix's keys/values, once (a few KiB to MiB each: every row of that prefix starts from them)."""
        for name, encoder in self.encoders.items():
            if encoder is None:
                self._prefixes[name] = ([], 0)
                continue
            kv = [(k.detach(), v.detach()) for k, v in prefix_key_values(encoder, self.model, 1)]
            self._prefixes[name] = (kv, kv[0][0].shape[-2])

    def _prefix_of(self, row: Row) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        # A row that names none gets the first (a scheduler of one bundle has only that one).
        found = self._prefixes.get(next(iter(self._prefixes)) if row.prefix is None else row.prefix)
        if found is None:
            raise PtuneError(
                f"model {row.prefix!r}: this scheduler has no such prefix ({sorted(map(str, self._prefixes))})"
            )
        return found

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._keep_kw else {}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw: cache}, **extra
        )
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def _admit(self, row: Row) -> None:
        """Prefill the row alone, pick its first token, and merge it into the batch unless it has ended."""
        try:
            if self._prefix_error is not None:
                raise self._prefix_error
            if row.cancel.is_set():
                row.on_done([], None)
                return
            prefix, pre = self._prefix_of(row)
            self._setup(row, pre)
            n = len(row.ids)
            cache = filled_cache(self.model, prefix)
            ids = torch.tensor([row.ids], dtype=torch.long, device=self.device)
            mask = torch.ones((1, pre + n), dtype=torch.long, device=self.device)
            pos = torch.arange(pre, pre + n, device=self.device)[None]
            logits = self._forward(ids, mask, pos, cache)
            token = int(torch.argmax(logits, dim=-1)[0]) if row.plain else self._pick(row, logits)
            info = _logprobs(logits, [token], [row.logprobs])[0] if row.logprobs is not None else None
            self._took(row, token, info)
        except BaseException as exc:
            log.exception("prefill failed")
            row.on_done(row.tokens, exc)
            return
        if self._ended(row, token):
            row.on_done(row.tokens, None)
            return
        self._merge(row, cache, mask, token, pre + n)

    def _setup(self, row: Row, pre: int) -> None:
        """The row's logits processors, as generate builds them for this row alone, and its generator."""
        if row.stop and row.stop_check is None:  # the engine has built it where it runs in this process
            if self.tokenizer is None:
                raise PtuneError("this scheduler has no tokenizer: it cannot end answers on stop strings")
            row.stop_check = stop_check(self.tokenizer, row.stop)
        cfg = self._config(row)
        row.processors = self.model._get_logits_processor(
            generation_config=cfg, input_ids_seq_length=pre + len(row.ids), device=self.device, model_kwargs={}
        )
        row.do_sample = bool(cfg.do_sample)
        row.plain = not row.do_sample and not row.processors
        if row.do_sample:
            row.generator = torch.Generator(device=self.device)
            if row.seed is None:
                row.generator.seed()
            else:
                row.generator.manual_seed(row.seed)
        if row.processors:
            row.length = pre + len(row.ids)
            row.history = torch.full(
                (1, row.length + row.max_new_tokens), self._stand_in, dtype=torch.long, device=self.device
            )
            row.history[0, pre : row.length] = torch.tensor(row.ids, dtype=torch.long)

    def _config(self, row: Row):
        """generate's own merge of the model's generation config, the library's defaults and the request's kwargs;
        the same settings give the same config, so it is kept for the next request that names them (it costs a
        deep copy of the model's config)."""
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in row.kwargs.items()))
        key += (("max_new_tokens", row.max_new_tokens),)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg, _ = self.model._prepare_generation_config(None, **{**row.kwargs, "max_new_tokens": row.max_new_tokens})
            self.model._prepare_special_tokens(cfg, device=self.device)
            self._configs[key] = cfg
            if len(self._configs) > 64:
                self._configs.popitem(last=False)
        else:
            self._configs.move_to_end(key)
        return cfg

    def _pick(self, row: Row, logits: torch.Tensor) -> int:
        """The row's next token from its (1, vocab) logits, as a lone generate picks it (not for plain rows)."""
        if row.processors:
            scores = row.processors(row.history[:, : row.length], logits)
        else:
            scores = logits
        if row.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=row.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        return token

    def _took(self, row: Row, token: int, info: TokenInfo | None = None) -> None:
        """The row's new token: kept, and handed to the reader (with its log-probabilities if the row asked)."""
        row.tokens.append(token)
        if row.history is not None:
            row.history[0, row.length] = token
            row.length += 1
        if info is None:
            row.on_token(token)
        else:
            row.on_token(token, info)

    def _ended(self, row: Row, token: int) -> bool:
        return (
            token in (self.stop_ids if row.stop_ids is None else row.stop_ids)
            or len(row.tokens) >= row.max_new_tokens
            or row.cancel.is_set()
            or (row.stop_check is not None and row.stop_check(row.tokens))
        )

    # -- the batch's cache ----------------------------------------------------------------------------------------

    def _merge(self, row: Row, cache: DynamicCache, mask: torch.Tensor, token: int, next_pos: int) -> None:
        last = torch.tensor([token], dtype=torch.long, device=self.device)
        pos = torch.tensor([next_pos], dtype=torch.long, device=self.device)
        if not self.active:
            self.active = [row]
            self._cache, self._mask, self._last, self._pos = cache, mask, last, pos
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        for mine, new in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(new.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(new.values, width, -2)])
        self._last = torch.cat([self._last, last])
        self._pos = torch.cat([self._pos, pos])
        self.active.append(row)

    def mergeable(self) -> bool:
        return mergeable(self.model)

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the batch, then drop the leading columns no remaining row attends to."""
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._last = self._pos = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0, 0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._last = self._last.index_select(0, index)
        self._pos = self._pos.index_select(0, index)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self.active):
            if row.cancel.is_set():
                row.on_done(row.tokens, None)
            else:
                keep.append(i)
        self._keep(keep)

    def _step(self) -> None:
        """One decoding step for every active row; rows that end leave the batch."""
        batch = len(self.active)
        self.largest_batch = max(self.largest_batch, batch)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        mask = self._mask
        if self._bool_mask and batch > 1 and not bool(mask.all()):
            # The mask SDPA would get from the model's own mask code for the padded 2D one (a decoding step's query
            # sees every position its row has): built here, that code is skipped, the same bits come out.
            mask = mask.bool()[:, None, None, :]
        logits = self._forward(self._last[:, None], mask, self._pos[:, None], self._cache)
        self.steps += 1
        # Greedy rows without processors take their tokens from one argmax over the batch (the same index as each
        # row's own argmax); the others are picked row by row, each with its processors and generator.
        plain = [i for i, row in enumerate(self.active) if row.plain]
        if len(plain) == batch:
            picked = logits.argmax(dim=-1).tolist()
        else:
            picked = [None] * batch
            if plain:
                for i, token in zip(plain, logits[plain].argmax(dim=-1).tolist()):
                    picked[i] = token
        failed: set[int] = set()
        for i, row in enumerate(self.active):
            if picked[i] is None:
                try:
                    picked[i] = self._pick(row, logits[i : i + 1])
                except BaseException as exc:
                    log.exception("picking a token failed")
                    row.on_done(row.tokens, exc)
                    failed.add(i)
        # The rows that asked for log-probabilities get them from one log-softmax over their rows of the logits.
        infos: list[TokenInfo | None] = [None] * batch
        wanted = [i for i, row in enumerate(self.active) if row.logprobs is not None and i not in failed]
        if wanted:
            found = _logprobs(logits[wanted], [picked[i] for i in wanted], [self.active[i].logprobs for i in wanted])
            for i, info in zip(wanted, found, strict=True):
                infos[i] = info
        keep, last = [], []
        for i, row in enumerate(self.active):
            if i in failed:
                continue
            token = picked[i]
            try:
                self._took(row, token, infos[i])
                ended = self._ended(row, token)
            except BaseException as exc:
                log.exception("handing over a token failed")
                row.on_done(row.tokens, exc)
                continue
            if ended:
                row.on_done(row.tokens, None)
            else:
                keep.append(i)
                last.append(token)
        self._pos = self._pos + 1
        if keep:
            self._last = self._last.new_tensor([0] * batch)
            self._last[keep] = self._last.new_tensor(last)
        self._keep(keep)


def _logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenInfo]:
    """Per row of (rows, vocab) logits: the log-probability of its token and its `tops[i]` likeliest tokens', of the
    model's own distribution (no temperature or top-p: what vLLM returns by default)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    k = max(tops)
    if k:
        values, indices = torch.topk(lp, k, dim=-1)
        values, indices = values.tolist(), indices.tolist()
    return [
        (chosen[i], list(zip(indices[i][: tops[i]], values[i][: tops[i]], strict=True)) if k else [])
        for i in range(len(tokens))
    ]


def _left_pad(t: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    """Zeros on the left of `dim` up to `width` (mask columns, or cache positions the mask hides)."""
    short = width - t.shape[dim]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mergeable(model) -> bool:
    """Whether rows' caches can be merged (plain DynamicLayer layers); else the batch holds one row."""
    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers) if cache.layers else True
