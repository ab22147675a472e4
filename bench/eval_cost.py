"""What issue 38's additions cost `ptune evaluate`: the bootstrap intervals and the general set (loss with the prefix
off and on, a few generations), against the same stage with both off, on the default params.

Needs a finished default run in this checkout (`make report` or `dvc repro`: models/base, models/ptuning,
data/processed). Each round runs `ptune evaluate` in a scratch copy (links to those inputs, its own reports/), once
with the features on (params.yaml as it is) and once off (evaluate.bootstrap_resamples: 0,
evaluate.general_examples: 0), in alternating order, and reads the stage's own wall time
(reports/timings/evaluate.json).
Prints each pair, the medians and the added share. Usage: python bench/eval_cost.py [--pairs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from ptune.data import general, synthetic_adgen  # noqa: E402


def scratch(params: dict, where: Path) -> Path:
    where.mkdir(parents=True)
    for rel in ("models", "workflow"):
        (where / rel).symlink_to(ROOT / rel)
    (where / "data").mkdir()
    (where / "data/processed").symlink_to(ROOT / "data/processed")
    fw, fd = params["fetch_weights"]["embedded"], params["fetch_data"]["embedded"]
    rows = synthetic_adgen.held_out_general(fw["seed"], fw["corpus_size"], fd.get("general_size", 100))
    (where / "data/general.jsonl").write_text(general.dumps(rows), encoding="utf-8")
    (where / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return where


def run(where: Path) -> tuple[float, float]:
    shutil.rmtree(where / "reports", ignore_errors=True)
    shutil.rmtree(where / ".ptune", ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [str(ROOT / ".venv/bin/ptune"), "evaluate"], cwd=where, check=True, capture_output=True, env=os.environ.copy()
    )
    total = time.perf_counter() - t0
    return json.loads((where / "reports/timings/evaluate.json").read_text())["wall_s"], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    on = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    off = json.loads(json.dumps(on))
    off["evaluate"].update(bootstrap_resamples=0, general_examples=0)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"on": scratch(on, Path(tmp) / "on"), "off": scratch(off, Path(tmp) / "off")}
        run(dirs["on"])  # warm the page cache and the Python bytecode once, not timed
        stage: dict[str, list[float]] = {"on": [], "off": []}
        proc: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.pairs):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                s, p = run(dirs[name])
                stage[name].append(s)
                proc[name].append(p)
            print(
                f"pair {i + 1}: on {stage['on'][-1]:.2f} s, off {stage['off'][-1]:.2f} s (stage wall time)", flush=True
            )
    m = {k: statistics.median(v) for k, v in stage.items()}
    p = {k: statistics.median(v) for k, v in proc.items()}
    ratios = [a / b - 1 for a, b in zip(stage["on"], stage["off"])]
    print(f"median stage wall time: on {m['on']:.2f} s, off {m['off']:.2f} s: +{(m['on'] / m['off'] - 1) * 100:.1f} %")
    print(
        f"per pair: {', '.join(f'{r * 100:+.1f} %' for r in ratios)}; median {statistics.median(ratios) * 100:+.1f} %"
    )
    print(
        f"median process time (load included): on {p['on']:.2f} s, off {p['off']:.2f} s: "
        f"+{(p['on'] / p['off'] - 1) * 100:.1f} %"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores)")


if __name__ == "__main__":
    main()
