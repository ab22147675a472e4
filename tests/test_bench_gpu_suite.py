"""bench/gpu_suite.py, the one command a lent GPU runs: its dry run (tiny shapes on the CPU, every code path but CUDA
and bitsandbytes) prints the table and writes the JSON, so the script cannot rot between GPUs; and where no GPU is
there, the full suite stops at once saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.py"


def test_the_dry_run_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "DRY RUN" in table
    assert (
        "| run | base | samples/s | s/step | peak GiB | load s | loss first → last | falls | vs plain | goal |" in table
    )
    assert table.count("skipped (dry run: bitsandbytes needs a CUDA GPU)") == 2  # the 4-bit and 8-bit rows
    assert "| model | batch | 24 prompts, wall s | examples/s |" in table
    assert "Greedy, P-tuned, batched vs one at a time: 4 of 4 prompts identical" in table

    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"date", "device", "versions", "plan", "train", "eval", "total_s", "budget_s"} <= result.keys()
    assert {"torch", "transformers", "bitsandbytes"} <= result["versions"].keys()
    plan = result["plan"]
    bf16, four, eight = result["train"]
    assert (bf16["base"], four["base"], eight["base"]) == ("bf16", "4bit", "8bit")
    assert "skipped" in four and "skipped" in eight
    # A short real training through ptune train's step: the loss falls; the plain loop ran beside it.
    assert bf16["samples_per_s"] > 0 and bf16["loss_falls"], bf16
    assert bf16["timed_steps"] == plan["train_steps"] - plan["warmup_steps"]
    assert bf16["plain"]["samples_per_s"] > 0

    ev = result["eval"]
    assert ev["dtype"] == "float32"  # ptune evaluate's base on the CPU: fp32, as before (bf16 only on a GPU)
    rows = {(r["model"], r["batch_size"]): r for r in ev["rows"]}
    assert set(rows) == {(m, b) for m in ("base", "ptuned") for b in (*plan["eval_batches"], 1)}
    for (model, batch), row in rows.items():
        assert "error" not in row, row
        # Every row generated all its new tokens; the batched rows read every prompt, the loop a sample.
        assert row["new_tokens_per_row"] == plan["new_tokens"], row
        assert row["prompts"] == (plan["one_at_a_time"] if batch == 1 else plan["n_prompts"]), row
        assert row["examples_per_s"] > 0 and not row["guard_hit"], row
    assert ev["greedy_check"] == {"prompts": plan["greedy_check"], "identical": plan["greedy_check"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a CUDA GPU")
def test_without_a_gpu_the_suite_stops_at_once_saying_what_is_missing(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()
