"""Speed beside a neighbour: the same fixed piece of ptune's work alone and next to other processes, as ratios.

    python bench/contention.py                 # both set-ups, four neighbours; about 6 minutes on 2 cores
    python bench/contention.py --steps 40 --train-steps 10   # a shorter piece of work

The piece of work runs in a fresh process set up as a ptune stage sets itself up (ptune.state.determinism), and
covers the three kinds of work the stages do, timed after the model is built: pre-training steps of the embedded GLM
(fetch_weights: forward, backward, AdamW over the whole model), P-tuning steps on it (train: the base frozen, the
prefix of params.yaml's `train` section trained by `ptune.compute.training.optimizer_step`, the loop `ptune train`
runs) and one batch of greedy generation (evaluate). It runs alone, then beside each neighbour:

- `torch nice 19`: another process doing torch matrix products with torch's default threads, at nice 19;
- `torch`: the same at the same priority (a notebook cell, another experiment);
- `ptune stage`: a real `ptune fetch_weights` (pre-training the embedded base) in a scratch folder, started as a
  stage is, measured once it is pre-training (`snakemake --cores 2` runs `fetch_weights` and `fetch_data` side by
  side, and each stage takes every core).

Each row is measured for two set-ups side by side in this one run: `before`, the environment of a stage before
ptune set GOMP_SPINCOUNT (its idle OpenMP threads spin 300,000 times before they sleep), and `ptune`, today's
stage set-up; `--try VAR=VALUE,...` adds set-ups.
Ratios are each set-up's time over its own time alone; the last line compares the two set-ups' quiet speed. Run it
with nothing else running: other load changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORK = """
import json, os, sys, time
from ptune.state import determinism
determinism.configure_threads()
if os.environ.get("BENCH_SETUP") == "before":
    os.environ.pop("GOMP_SPINCOUNT", None)  # the set-up before ptune chose how long idle threads spin
os.environ.update(json.loads(os.environ.get("BENCH_ENV", "{}")))  # --try VAR=VALUE
import contextlib
import torch
from ptune.config import load
from ptune.model import embedded
from ptune.model.backends import native
from ptune.model.prefix_encoder import PrefixEncoder, prefix_config_for
from ptune.data import synthetic_adgen
from ptune.compute.training import optimizer_step
steps, train_steps = int(sys.argv[1]), int(sys.argv[2])
params = load("params.yaml")
cfg, tcfg = params.fetch_weights.embedded, params.train
torch.manual_seed(0)
texts = [synthetic_adgen.plain_text(ex) for ex in synthetic_adgen.generate(1, 2000, style="plain")]
tok = embedded.build_tokenizer(texts, cfg.vocab_size)
model = embedded.build_model(cfg, tok)
stream = embedded._token_stream(tok, texts)
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
seq, batch = cfg.pretrain_seq_len, cfg.pretrain_batch_size
print("ready", flush=True)
sys.stdin.readline()  # start when told, so that neighbours are already running
t0 = time.perf_counter()
for step in range(steps):
    starts = torch.randint(0, len(stream) - seq - 1, (batch,))
    ids = torch.stack([stream[s:s + seq] for s in starts.tolist()])
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
# P-tuning: the base frozen, the prefix trained on rows of a 64-token source and a 64-token target.
model.requires_grad_(False)
encoder = PrefixEncoder(prefix_config_for(
    model, tcfg.pre_seq_len, tcfg.prefix_projection, tcfg.prefix_hidden_size, "bench", prefix_dropout=0.0))
prefix_optim = torch.optim.AdamW(encoder.parameters(), lr=tcfg.learning_rate)
pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
for step in range(train_steps):
    starts = torch.randint(0, len(stream) - 129, (tcfg.per_device_train_batch_size,)).tolist()
    rows = [{"input_ids": stream[s:s + 128].tolist(), "labels": [-100] * 64 + stream[s + 64:s + 128].tolist()}
            for s in starts]
    batch = native().collate(rows, pad_id)
    optimizer_step(model, encoder, [batch], prefix_optim, None, contextlib.nullcontext(), tcfg.max_grad_norm,
                   backend=native())
model.eval()
with torch.no_grad():
    model.generate(input_ids=ids[:, :32], max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
"""

# A neighbour that is not ptune: torch matrix products with torch's defaults (threads, wait policy), until killed.
MATMUL = """
import torch
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a)
"""


# This shell's thread settings reach neither the measured work (it sets its own, as a stage does) nor a neighbour.
THREAD_SETTINGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PTUNE_NUM_THREADS")
TRIES: dict[str, dict[str, str]] = {}  # --try VAR=VALUE: a further set-up, today's with these variables


def _env(setup: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    return {**env, "BENCH_SETUP": setup, "BENCH_ENV": json.dumps(TRIES.get(setup, {})), "TQDM_DISABLE": "1"}


def _start_work(setup: str, steps: int, train_steps: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORK, str(steps), str(train_steps)],
        cwd=REPO,
        env=_env(setup),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _finish(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    proc.wait()
    return json.loads(line)["seconds"]


def _ptune_stage(setup: str, scratch: Path) -> subprocess.Popen:
    """A real `ptune fetch_weights` in `scratch`, pre-training for longer than the measured piece takes; returns
    once it is pre-training. It sets its threads up itself, as every stage does; the `before` set-up gives it the
    spin count it had before ptune chose one (libgomp's default, 300,000)."""
    params = (REPO / "params.yaml").read_text(encoding="utf-8")
    scratch.mkdir(parents=True, exist_ok=True)
    longer = params.replace("pretrain_steps: 1000", "pretrain_steps: 100000")
    if longer == params:
        raise SystemExit("params.yaml no longer says `pretrain_steps: 1000`: update bench/contention.py")
    (scratch / "params.yaml").write_text(longer)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    env.update(GOMP_SPINCOUNT="300000") if setup == "before" else env.update(TRIES.get(setup, {}))
    log = scratch / "stage.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from ptune.cli import main; main()", "fetch_weights"],
            cwd=scratch,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    while "pre-train base" not in log.read_text(errors="replace"):  # its progress bar: the model is built
        if proc.poll() is not None:
            raise SystemExit(f"the ptune stage neighbour ended early:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    return proc


def _neighbour(kind: str, setup: str, scratch: Path) -> subprocess.Popen | None:
    if kind == "alone":
        return None
    if kind == "ptune stage":
        return _ptune_stage(setup, scratch)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    prefix = ["nice", "-n", "19"] if kind == "torch nice 19" else []
    proc = subprocess.Popen([*prefix, sys.executable, "-c", MATMUL], env=env)
    time.sleep(3)  # torch imported, its threads busy
    return proc


def measure(setup: str, kind: str, steps: int, train_steps: int, scratch: Path) -> float:
    work = _start_work(setup, steps, train_steps)
    neighbour = _neighbour(kind, setup, scratch)
    try:
        return _finish(work)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="pre-training steps in the piece of work")
    parser.add_argument("--train-steps", type=int, default=20, help="P-tuning steps in the piece of work")
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="VAR=VALUE[,VAR=VALUE]",
        help="also measure today's set-up with these environment variables (repeatable)",
    )
    args = parser.parse_args()
    for spec in args.tries:
        TRIES[spec] = dict(pair.split("=", 1) for pair in spec.split(","))
    kinds = ("alone", "torch nice 19", "torch", "ptune stage")
    setups = ("before", "ptune", *TRIES)
    with tempfile.TemporaryDirectory(prefix="contention-") as scratch:
        # set-ups interleaved per row
        seconds = {(s, k): measure(s, k, args.steps, args.train_steps, Path(scratch)) for k in kinds for s in setups}
    print(
        f"{args.steps} pre-training steps + {args.train_steps} P-tuning steps + one generation batch, "
        f"{os.cpu_count()} CPUs; seconds (ratio to alone)"
    )
    print(f"{'neighbour':<16}" + "".join(f"{s[:20]:>22}" for s in setups))
    for k in kinds:
        cells = "".join(f"{seconds[s, k]:>14.1f} ({seconds[s, k] / seconds[s, 'alone']:4.2f}×)" for s in setups)
        print(f"{k:<16}{cells}")
    for s in setups[1:]:
        print(f"quiet speed, {s} vs before: {seconds['before', 'alone'] / seconds[s, 'alone']:.2f}× (above 1: faster)")


if __name__ == "__main__":
    main()
