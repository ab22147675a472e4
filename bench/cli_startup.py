"""The CLI's start-up, this checkout against another revision, side by side: `import ptune.cli` plus building every
command's options, and `python -m ptune.cli --help`, alternated run by run; medians and the ratio.

    python bench/cli_startup.py 3b6b2d9        # the revision before issue 34's layering, say
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT = "import time; t = time.perf_counter(); import ptune.cli as c; c.build_parser(); print(time.perf_counter() - t)"


def _times(tree: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "workflow")}  # this venv's packages, that tree's ptune
    out = subprocess.run([sys.executable, "-c", IMPORT], env=env, capture_output=True, text=True, check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ptune.cli", "--help"], env=env, cwd=tree, capture_output=True, check=True)
    return float(out.stdout), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the git revision to compare against")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptune-cli-bench-") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline], check=True)
        try:
            runs = {"baseline": [], "this checkout": []}
            for _ in range(args.runs):
                for name, tree in (("baseline", base), ("this checkout", REPO)):
                    runs[name].append(_times(tree))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=True)
    med = {name: [statistics.median(t[i] for t in r) for i in (0, 1)] for name, r in runs.items()}
    for name, (imp, helptime) in med.items():
        print(f"{name:14} import ptune.cli + options {imp * 1000:6.1f} ms   ptune --help {helptime * 1000:6.0f} ms")
    b, n = med["baseline"], med["this checkout"]
    print(f"ratio (this / baseline): import {n[0] / b[0]:.2f}, --help {n[1] / b[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
