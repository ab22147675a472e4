"""`python -m ptune.bundle DIR PROMPT`: one answer from a deploy bundle, printed as JSON (ptune.model.bundle).

Kept at this name because bundles' READMEs, the deploy check and users' scripts run it."""

import sys

from .model.bundle import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
