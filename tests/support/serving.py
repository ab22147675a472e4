"""Helpers for the serving tests: reference answers computed in this process, free ports, the browser's flags."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from functools import cache
from pathlib import Path

# The servers run with MKL's strict mode (ptune.state.determinism); so does this process's reference generation.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Sampling with a seed: the tiny test model's greedy answers are blank, sampled ones are not.
MAX_NEW_TOKENS = 16
SAMPLING_FLAGS = ["--sample", "--max-new-tokens", str(MAX_NEW_TOKENS)]
# Debian's chromium, run as root on a machine without a network (Playwright cannot download its own there).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@cache
def _bundle(root: str, base_only: bool):
    import torch

    from ptune.bundle.loader import Bundle

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as the servers do (ptune.state.determinism)
    with contextlib.chdir(root):  # the bundle names its base model relative to the project root
        bundle = Bundle.load("models/deploy", with_prefix=not base_only)
    bundle.generation = dataclasses.replace(bundle.generation, do_sample=True, max_new_tokens=MAX_NEW_TOKENS)
    return bundle


@cache
def reference_answer(
    root: Path, prompt: str, seed: int, base_only: bool = False, history: tuple[tuple[str, str], ...] = ()
) -> str:
    """The answer the bundle gives in this process (Bundle.answer: no engine, no streamer, no server), with
    `history` as earlier rounds of the conversation."""
    return _bundle(str(root), base_only).answer(prompt, seed=seed, history=history)


def dev_prompts(root: Path) -> list[str]:
    return [json.loads(line)["content"] for line in (root / "data/raw/dev.json").read_text().splitlines()]


def cases(root: Path, n: int, base_only: bool = False, min_chars: int = 6) -> list[tuple[str, int, str]]:
    """n (prompt, seed, answer) triples with answers of at least min_chars characters, all different."""
    found, seen = [], set()
    prompts = dev_prompts(root) if (root / "data/raw/dev.json").is_file() else []
    for seed in range(100):
        prompt = prompts[seed % len(prompts)]
        answer = reference_answer(root, prompt, seed, base_only)
        if len(answer) >= min_chars and answer not in seen:
            found.append((prompt, seed, answer))
            seen.add(answer)
            if len(found) == n:
                return found
    raise AssertionError(f"the tiny bundle gave fewer than {n} answers of {min_chars}+ characters")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
