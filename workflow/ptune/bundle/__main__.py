"""`python -m ptune.bundle DIR PROMPT`: one answer from a deploy bundle, printed as JSON (bundle/command.py)."""

import sys

from .command import main

sys.exit(main(sys.argv[1:]))
