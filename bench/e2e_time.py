"""End-to-end time of the embedded default: `snakemake --cores 1 report` in a fresh copy of the project.

    python bench/e2e_time.py [--params FILE] [--keep DIR]

Prints the wall time, each stage's share (from reports/timings.json), the ROUGE-L of base and P-tuned, and,
as a baseline measured side by side on the same machine, the time of one `import torch, transformers`
(the fixed cost every model stage pays), so that figures from different machines can be compared as ratios.
Run it from the project root with the venv active (`source .venv/bin/activate`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
from ptune.pipeline.declared import NAMES as STAGES  # noqa: E402

BUDGET_S = 300


def copy_project(dest: Path, params: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    shutil.copy2(params, dest / "params.yaml")
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "b@x",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "b@x",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


def import_baseline() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--keep", type=Path, help="run in this (new) directory and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="ptune-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_project(work, args.params.resolve())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
    }
    baseline = import_baseline()
    t0 = time.perf_counter()
    proc = subprocess.run(["snakemake", "--cores", "1", "report"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1

    timings = json.loads((work / "reports/timings.json").read_text())
    metrics = json.loads((work / "reports/metrics.json").read_text())
    print(f"snakemake --cores 1 report: {wall:.1f} s wall ({wall / BUDGET_S:.0%} of the {BUDGET_S} s budget)")
    print(f"baseline `import torch, transformers`: {baseline:.2f} s; ratio e2e / import = {wall / baseline:.1f}")
    stage_sum = 0.0
    for stage, rec in sorted(timings.items(), key=lambda kv: STAGES.index(kv[0])):
        stage_sum += rec["wall_s"]
        print(f"  {stage:<14} {rec['wall_s']:7.1f} s")
    print(f"  {'(overhead)':<14} {wall - stage_sum:7.1f} s  (process start-up, imports, dvc, snakemake)")
    print(
        f"ROUGE-L base {metrics['base']['rouge-l']:.2f} -> P-tuned {metrics['ptuned']['rouge-l']:.2f} "
        f"({metrics['ptuned']['rouge-l'] - metrics['base']['rouge-l']:+.2f}) on {metrics['n_examples']} dev examples"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
