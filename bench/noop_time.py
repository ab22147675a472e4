"""A no-op run of each front end on a finished project, this checkout against another revision, side by side: the
tiny pipeline is run once in a copy of each, then `dvc repro`, `dvc status` and `snakemake --cores 1 report` (all
with nothing to do) are timed in both, alternated round by round; medians and the ratio. Code deps (issue 35) add
some 260 files for DVC to hash and Snakemake to stat; the budget is 10 s each.

    python bench/noop_time.py 8346a09          # the revision before code deps, say
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "dvc repro": ["dvc", "repro"],
    "dvc status": ["dvc", "status"],
    "snakemake report": ["snakemake", "--cores", "1", "report"],
}


def _project(tree: Path, dest: Path, env: dict) -> Path:
    """A finished copy of what a clone of `tree` holds (the tiny params), as after a run."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=tree,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, files.split("\0")):
        if (tree / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / rel, dest / rel)
    shutil.copy2(tree / "tests/fixtures/params-tiny.yaml", dest / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "checkout"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    subprocess.run(COMMANDS["snakemake report"], cwd=dest, env=env, check=True, capture_output=True)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptune-noop-bench-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        (home / ".gitconfig").write_text("[user]\n\tname = bench\n\temail = bench@ptune.invalid\n")
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
            "DVC_NO_ANALYTICS": "1",
            "TQDM_DISABLE": "1",
        }
        base_tree = tmp / "baseline-tree"
        worktree = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*worktree, "add", "--detach", str(base_tree), args.baseline], check=True)
        try:
            projects = {}
            for name, tree in (("baseline", base_tree), ("this checkout", REPO)):
                dest = tmp / name.replace(" ", "-")
                dest.mkdir()
                # Each project runs its own package (the baseline predates the runner that sees to it).
                projects[name] = (_project(tree, dest, {**env, "PYTHONPATH": str(dest / "workflow")}), dest)
        finally:
            subprocess.run([*worktree, "remove", "--force", str(base_tree)], check=True)
        for root, _dest in projects.values():
            (root / ".ptune/stage.log").write_text("")  # what the rounds compute: nothing, checked below
        times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in COMMANDS} for n in projects}
        for _ in range(args.rounds):
            for name, (root, _dest) in projects.items():
                run_env = {**env, "PYTHONPATH": str(root / "workflow")}
                for label, cmd in COMMANDS.items():
                    t0 = time.perf_counter()
                    subprocess.run(cmd, cwd=root, env=run_env, check=True, capture_output=True)
                    times[name][label].append(time.perf_counter() - t0)
        for name, (root, _dest) in projects.items():
            ran = (root / ".ptune/stage.log").read_text().split()
            assert not ran, f"{name}: a no-op round ran stages: {ran}"
    print(f"{'':16}" + "".join(f"{label:>20}" for label in COMMANDS))
    med = {n: {c: statistics.median(t) for c, t in by.items()} for n, by in times.items()}
    for name, by in med.items():
        print(f"{name:16}" + "".join(f"{by[c]:>19.2f}s" for c in COMMANDS))
    print(f"{'ratio':16}" + "".join(f"{med['this checkout'][c] / med['baseline'][c]:>20.2f}" for c in COMMANDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
