"""Stage evaluate: generate for the dev set with the base alone and with the prefix; score BLEU-4 and ROUGE.

Outputs: reports/metrics.json and reports/predictions.jsonl (content, label, base, ptuned per line), and
reports/intervals.json: each score's bootstrap interval over the dev examples, the gain's paired interval, and the
general set's loss with the prefix off and on (reporting/intervals.py); the general set's per-example losses and
a few generations side by side go to reports/general.jsonl (data/general.py describes the set). Finished
batches are journalled under .ptune/state/evaluate/, so a killed run resumes where it stopped and, with the
same seeds, ends with the same bytes as an uninterrupted one. With `devices: N` the length-sorted batches are
dealt out among N processes (batch b to process b mod N, each with its own model copy); each journals its
batches, and the launching process merges them in dev-set order: the same bytes as one process. Progress goes to
reports/live/evaluate/ as batches finish (reporting/live.py). SIGTERM, SIGINT or SIGHUP drop the batch being
generated and stop (state/stopping.py): the journal keeps the finished ones, and the rerun resumes there.
Generation is compute/evaluation.py's; journals, stop requests, fault points and live progress are the run
context's (stages/run_context.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict

from datasets import load_from_disk

from ..compute.evaluation import generate_all, in_prompt_order, length_sorted_batches, teacher_forced_nll
from ..config import Params
from ..data import general
from ..errors import PtuneError
from ..model import backends, prompting
from ..model.checks import context_window
from ..model.generation import Settings
from ..paths import BASE, GENERAL_SCORES, GENERAL_SET, INTERVALS, METRICS, PREDICTIONS, PREFIX
from ..paths import PROCESSED as DATA
from ..reporting import intervals, metrics
from ..state import atomic, multiprocess, stopping
from ..state.determinism import seed_everything
from ..state.resume import Journal
from .run_context import RunContext

MODELS = ("base", "ptuned")
# Batches and their seeds do not depend on how many processes share them: a run killed with one `devices`
# value resumes with another.
NOT_IN_RESUME_KEY = ("devices",)


def check_context(params: Params, prompt_ids: list) -> None:
    """Fail before generating where the prefix + the longest prompt + max_new_tokens exceed the model's context:
    a model asked for positions it has no embeddings for does not stop, it generates noise (or fails deep in
    attention) for hours, with at most a warning."""
    window = context_window(json.loads((BASE / "config.json").read_text(encoding="utf-8")))
    if window is None:
        return  # the config does not say; transformers checks what it can
    key, context = window
    prefix = backends.for_base(BASE).describe_prefix(PREFIX, BASE, allow_pickle=params.fetch_weights.allow_pickle)
    pre_seq_len = int(prefix["pre_seq_len"])
    longest = max(map(len, prompt_ids), default=0)
    max_new = params.evaluate.max_new_tokens
    total = pre_seq_len + longest + max_new
    if total <= context:
        return
    room = context - pre_seq_len - longest
    lower = (
        f"lower evaluate.max_new_tokens to at most {room}, or preprocess.max_source_length (it caps the prompts) "
        "or train.pre_seq_len"
        if room > 0
        else "lower preprocess.max_source_length (it caps the prompts) or train.pre_seq_len"
    )
    raise PtuneError(
        f"evaluate: the prefix ({pre_seq_len} positions, train.pre_seq_len, as {PREFIX} has it) + the longest "
        f"dev prompt ({longest} tokens) + evaluate.max_new_tokens ({max_new}) = {total} tokens, more than the "
        f"base model's context of {context} ({BASE}/config.json: {key}); {lower}"
    )


def _stopped(stop: stopping.Stopped, ctx: RunContext, n_batches: int) -> stopping.Stopped:
    """`stopped.json` beside the journals, and the message: how many batches of each model are kept."""
    done = {name: len(Journal.read_all(ctx.journals(name))) for name in MODELS}
    ctx.record_stop(batches_done=done, batches=n_batches)
    kept = ", ".join(f"{name} {n} of {n_batches}" for name, n in done.items())
    return stopping.Stopped(
        stop.request,
        f"evaluate: stopped ({stop.request.reason}); batches kept in {ctx.state.dir}: {kept}. `dvc repro`, "
        "`snakemake --cores 1 report` or `ptune evaluate` resumes from there",
    )


def run(params: Params) -> dict:
    cfg = params.evaluate
    ctx = RunContext.open("evaluate")  # $PTUNE_TRACKERS: a typo fails before the models load
    seed_everything(cfg.seed)
    dev = load_from_disk(str(DATA))["dev"]
    # The first max_examples of the dev set, in file order: the subset is the same on every run.
    if cfg.max_examples is not None:
        dev = dev.select(range(min(cfg.max_examples, len(dev))))
    prompt_ids = dev["input_ids"]
    check_context(params, prompt_ids)
    key = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_RESUME_KEY}
    key["prompt_format"] = params.preprocess.prompt_format  # it decides the tokens generation stops on
    ctx.resume([BASE, PREFIX, DATA], key)

    batches = length_sorted_batches(prompt_ids, cfg.batch_size)
    if multiprocess.rank() == 0:  # the launching process makes the folder (an output); its rank 0 logs into it
        ctx.track()
    if cfg.devices > 1 and not multiprocess.in_worker():
        outputs, speed, where = _merged(params, ctx, batches, len(prompt_ids))
        loaded = None
    else:
        outputs, speed, where, loaded = _generated(params, ctx, prompt_ids, batches)
        if multiprocess.world_size() > 1:  # a worker: the launching process merges the journals, writes the outputs
            return {"examples_per_s": speed, "device": where}

    t0 = time.perf_counter()
    outside = _general(params, loaded)
    general_s = time.perf_counter() - t0
    _write_outputs(ctx, params, dev, outputs, outside)
    # examples/s of what this run generated (not what it read back from the journal), for reports/timings/.
    return {"examples_per_s": speed, "device": where, "devices": cfg.devices, "general_set_s": round(general_s, 3)}


def _merged(params: Params, ctx: RunContext, batches: list[list[int]], n_prompts: int) -> tuple[dict, dict, str]:
    """The workers generate their shares of the batches into their journals; this process merges them."""
    cfg = params.evaluate
    per_rank = multiprocess.launch("evaluate", params, cfg.devices)
    outputs, speed = {}, {}
    for name in MODELS:
        outputs[name] = in_prompt_order(batches, Journal.read_all(ctx.journals(name)), n_prompts)
        # The processes generate side by side: their rates add up.
        speed[name] = round(sum(facts["examples_per_s"][name] for facts in per_rank), 3)
    return outputs, speed, f"{cfg.devices} x {per_rank[0]['device']}"


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The models and what generates with them, loaded once per process."""

    backend: backends.Backend
    tokenizer: object
    model: object
    encoder: object
    stop_ids: list


def _load(params: Params) -> Loaded:
    cfg = params.evaluate
    # The prompts are in data/processed; generation stops where the prompt format ends an answer.
    prompter = prompting.for_base(params.preprocess, BASE)
    model, encoder = prompter.backend.load_for_inference(
        BASE, PREFIX, multiprocess.local_device(), cfg.quantization, allow_pickle=params.fetch_weights.allow_pickle
    )
    stop_ids = prompter.stop_ids(model.generation_config.eos_token_id)
    return Loaded(prompter.backend, prompter.tokenizer, model, encoder, stop_ids)


def _generated(
    params: Params, ctx: RunContext, prompt_ids: list, batches: list[list[int]]
) -> tuple[dict, dict, str, Loaded]:
    """This process's batches (b mod world == rank) for the base alone and with the prefix, each journalled as it
    finishes; examples/s of what it generated."""
    cfg = params.evaluate
    rank, n = multiprocess.rank(), multiprocess.world_size()
    loaded = _load(params)
    backend, tokenizer, model, encoder, stop_ids = (
        loaded.backend,
        loaded.tokenizer,
        loaded.model,
        loaded.encoder,
        loaded.stop_ids,
    )
    mine = batches[rank::n]  # this process's batches, for each model
    outputs, speed = {}, {}
    for m, (name, enc) in enumerate(zip(MODELS, (None, encoder))):
        journal = ctx.journal(name, rank)
        already = set(journal.done)
        t0 = time.perf_counter()
        run = ctx.batches(journal, _progress(ctx, m, mine, t0))
        try:
            with ctx.deferred():
                outputs[name] = generate_all(
                    model,
                    enc,
                    tokenizer,
                    prompt_ids,
                    Settings.of(cfg),
                    cfg.batch_size,
                    cfg.seed,
                    desc=name,
                    backend=backend,
                    shard=(rank, n),
                    stop_ids=stop_ids,
                    run=run,
                )
        except stopping.Stopped as stop:
            raise _stopped(stop, ctx, len(batches)) from None
        generated = sum(len(texts) for b, texts in journal.done.items() if b not in already)
        speed[name] = round(generated / max(time.perf_counter() - t0, 1e-9), 3)
    return outputs, speed, str(model.device), loaded


def _general(params: Params, loaded: Loaded | None) -> list[dict]:
    """The general set's first `general_examples`: each response's summed NLL and token count with the prefix off
    (base) and on (ptuned), and for the first `general_generations` what each model writes from the prompt."""
    cfg, pre = params.evaluate, params.preprocess
    rows = general.read(GENERAL_SET)
    if cfg.general_examples is not None:
        rows = rows[: cfg.general_examples]
    if not rows:
        return []
    loaded = loaded or _load(params)
    backend, tokenizer = loaded.backend, loaded.tokenizer
    # Cut as the dev set is (preprocess.max_source_length / max_target_length): within the context that
    # evaluate's check_context allowed for the dev set. A prompt ends with the ids the backend ends every prompt
    # with (ChatGLM-6B's [gMASK] and BOS, which its forward looks for; none for transformers models).
    specials = backend.prompt_specials(tokenizer)
    pairs = [
        (
            (backend.encode_text(tokenizer, r["prompt"])[-pre.max_source_length :] if r["prompt"] else []) + specials,
            backend.encode_text(tokenizer, r["response"])[: pre.max_target_length],
        )
        for r in rows
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = {
        name: teacher_forced_nll(loaded.model, enc, tokenizer, backend, pairs, pad)
        for name, enc in (("base", None), ("ptuned", loaded.encoder))
    }
    out = [
        {**r, "tokens": len(resp) - (0 if prompt else 1), "nll": {m: round(nll[m][i], 6) for m in nll}}
        for i, (r, (prompt, resp)) in enumerate(zip(rows, pairs))
    ]
    shown = [i for i, r in enumerate(rows) if r["prompt"]][: cfg.general_generations]
    if shown:
        settings = dataclasses.replace(Settings.of(cfg), max_new_tokens=cfg.general_max_new_tokens)
        for name, enc in (("base", None), ("ptuned", loaded.encoder)):
            texts = generate_all(
                loaded.model,
                enc,
                tokenizer,
                [pairs[i][0] for i in shown],
                settings,
                len(shown),
                cfg.seed,
                desc=f"general set, {name}",
                backend=backend,
                stop_ids=None,  # plain text: it ends where the model ends it (EOS) or at general_max_new_tokens
            )
            for i, text in zip(shown, texts):
                out[i].setdefault("generated", {})[name] = text
    return out


def _progress(ctx: RunContext, m: int, mine: list[list[int]], t0: float) -> Callable[[int, int], None]:
    """Live progress of model `m` (rank 0 logs it): step = this process's batches done over both models."""

    def log(k: int, examples: int) -> None:
        ctx.log(
            m * len(mine) + k,
            {
                "examples": m * sum(map(len, mine)) + examples,
                "fraction_done": round((m * len(mine) + k) / (2 * len(mine)), 6),
                "examples_per_s": round(examples / max(time.perf_counter() - t0, 1e-9), 3),
            },
        )

    return log


def interval_facts(params: Params, scored: dict, outside: list[dict]) -> dict:
    """reports/intervals.json: the bootstrap's settings, each score's interval and the gain's, the general set's."""
    cfg = params.evaluate
    per = {m: {k: [s[k] for s, _ in scored[m]] for k in metrics.METRIC_NAMES} for m in MODELS}
    result: dict = {"bootstrap": intervals.settings(cfg.bootstrap_resamples, cfg.confidence, cfg.seed)}
    if cfg.bootstrap_resamples:
        result["scores"] = intervals.score_intervals(per, cfg.bootstrap_resamples, cfg.confidence, cfg.seed)
    general_set = {"given": bool(outside), "n_examples": len(outside)}
    if outside and cfg.bootstrap_resamples:
        nll = {m: [r["nll"][m] for r in outside] for m in MODELS}
        tokens = [r["tokens"] for r in outside]
        general_set.update(intervals.loss_intervals(nll, tokens, cfg.bootstrap_resamples, cfg.confidence, cfg.seed + 1))
    result["general"] = general_set
    return result


def _write_outputs(ctx: RunContext, params: Params, dev, outputs: dict, outside: list[dict]) -> None:
    """Scores, then predictions.jsonl, metrics.json and intervals.json; the run then ends complete (its resume state
    removed)."""
    labels = dev["label"]
    result: dict = {"n_examples": len(labels), "empty_predictions": {}}
    scored = {name: metrics.per_example(preds, labels) for name, preds in outputs.items()}
    for name in outputs:
        result[name], result["empty_predictions"][name] = metrics.corpus_of(scored[name])
    ci = interval_facts(params, scored, outside)

    # A stop requested while the outputs are written lets them finish: the stage then ends complete.
    with ctx.deferred():
        with atomic.atomic_file(PREDICTIONS) as fh:
            for content, label, base, ptuned in zip(dev["content"], labels, outputs["base"], outputs["ptuned"]):
                fh.write(
                    json.dumps({"content": content, "label": label, "base": base, "ptuned": ptuned}, ensure_ascii=False)
                    + "\n"
                )
        atomic.write_text(GENERAL_SCORES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outside))
        atomic.write_json(INTERVALS, ci)
        atomic.write_json(METRICS, result)
        ctx.finish()
