"""`python -m ptune.stages.worker STAGE PARAMS RESULTS`: one worker process of a stage run on several devices.

state/multiprocess.py launches N of these and keeps the life of each (stop requests, results); this module, above
the params and the stages, loads the params file the launcher wrote and runs the stage on them, so that state/
imports neither the params nor the stages.
"""

from __future__ import annotations

import importlib
import sys

from .. import config
from ..state import multiprocess


def main(argv: list[str]) -> int:
    stage, params_path, results = argv
    return multiprocess.run_worker(
        stage, results, lambda: importlib.import_module(f"ptune.stages.{stage}").run(config.load(params_path))
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
