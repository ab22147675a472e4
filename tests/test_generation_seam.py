"""The generation seam, crossed with the user's commands: what `ptune evaluate` wrote to reports/predictions.jsonl
for a prompt it read whole (not cut to preprocess.max_source_length) is what `ptune serve api` answers to the same
message on /v1/chat/completions with the same settings.

Evaluation generates in length-sorted batches through the backend's own generate, seeded once per batch (seed +
batch index); the server decodes each request in the continuous-batching scheduler with a generator of its own.
Greedy, the two must give the same answer; sampled, they draw the same tokens when evaluate's batches hold one
prompt each and the request's seed is that batch's. (The tiny test model's greedy answers decode to blank text, so
the sampled comparison is the one with teeth here; on a real model both are.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptune.serve.process import ApiProcess


@pytest.fixture(scope="module")
def api(serving_project):
    with ApiProcess(["--bundle", "models/deploy"], cwd=serving_project.root, env=serving_project.env) as server:
        yield server


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))


def _predictions(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "reports/predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def _served(api, content: str, **settings) -> tuple[str, int]:
    """The server's answer to one user message, and its prompt's length in tokens."""
    _, body = api.post(
        "/v1/chat/completions", {"model": "ptune", "messages": [{"role": "user", "content": content}], **settings}
    )
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]


def test_evaluates_greedy_answer_is_what_serve_api_answers(serving_project, api):
    params = _params(serving_project.root)
    cfg = params["evaluate"]
    assert cfg["do_sample"] is False  # the tiny pipeline's evaluate is greedy
    compared = 0
    for row in _predictions(serving_project.root):
        answer, prompt_tokens = _served(api, row["content"], temperature=0.0, max_tokens=cfg["max_new_tokens"])
        if prompt_tokens > params["preprocess"]["max_source_length"]:
            continue  # evaluate read this prompt cut short: another prompt than the server's
        assert answer == row["ptuned"], row["content"]
        compared += 1
    assert compared >= 1, "no dev prompt of the tiny pipeline fits preprocess.max_source_length"


def test_evaluates_seeded_batches_of_one_are_what_serve_api_answers_with_their_seeds(
    pipeline_run, serving_project, api, tmp_path
):
    """`ptune evaluate` with batches of one, sampling: batch b's answer is the server's with seed evaluate.seed + b."""
    from datasets import load_from_disk

    work = tmp_path / "work"
    for rel in ("models/base", "models/ptuning", "data/processed"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to((pipeline_run.root / rel).resolve())
    params = _params(pipeline_run.root)
    cfg = params["evaluate"]
    cfg.update(batch_size=1, do_sample=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "ptune.cli", "evaluate"],
        cwd=work,
        env={**pipeline_run.env, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Batch b holds the b-th prompt in length order (compute/evaluation.py: length_sorted_batches).
    dev = load_from_disk(str(work / "data/processed"))["dev"]
    lengths = [len(ids) for ids in dev["input_ids"][: cfg["max_examples"]]]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    compared = 0
    for batch, i in enumerate(order):
        row = _predictions(work)[i]
        answer, prompt_tokens = _served(
            api,
            row["content"],
            temperature=cfg["temperature"],
            top_p=cfg["top_p"],
            seed=cfg["seed"] + batch,
            max_tokens=cfg["max_new_tokens"],
        )
        if prompt_tokens != lengths[i]:
            continue  # cut short by preprocess: another prompt than the server's
        assert answer == row["ptuned"], row["content"]
        compared += bool(answer)
    assert compared >= 1, "no dev prompt read whole got an answer that is not blank: nothing was compared"
