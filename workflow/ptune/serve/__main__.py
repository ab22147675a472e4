"""`python -m ptune.serve [--params P] serve api|web ... | chat ...`: ptune's serving commands, with the same options,
without the rest of the CLI. Deploy's check starts its server this way (serve/process.py), so that the code the stage
runs is the serving code alone, never the other commands' (pipeline/code.py)."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
