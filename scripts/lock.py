"""Finish the lock that `make lock` has pip-compile write: leave out torch and what only torch needs, and ptune itself.

    python scripts/lock.py requirements/lock.txt

pip-compile resolves torch like any package, with the CUDA libraries of the build it finds on the index; but torch is
chosen per machine by scripts/setup-venv.sh (a GPU image's own CUDA build, or the CPU build), so the lock must not
name it, nor the packages that come only with it (nvidia-*, triton, ...). ptune itself (the `ptune[cluster]`
self-reference of the test extra) is installed from the checkout, editable. The file is rewritten in place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LEFT_OUT = {"torch", "ptune"}
# Only torch's own dependencies go with it: every direct dependency is "via ptune (pyproject.toml)".
FOLLOWED = {"torch"}
NOTE = [
    "#",
    "# Then finished by scripts/lock.py: torch (chosen per machine by scripts/setup-venv.sh), what only torch needs,",
    "# and ptune itself are left out. Regenerate with `make lock`; see docs/testing.md.",
]
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==| @ )")


def _name(line: str) -> str | None:
    m = REQUIREMENT.match(line)
    return m.group(1).lower().replace("_", "-") if m else None


def _blocks(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """The header (comments before the first requirement) and one block per requirement (its lines)."""
    header, blocks = [], []
    for line in lines:
        if _name(line) is not None:
            blocks.append([line])
        elif blocks and (line.startswith((" ", "\t")) or not line.strip()):
            blocks[-1].append(line)
        elif blocks:
            blocks.append([line])  # a comment between requirements ("# The following packages ...")
        else:
            header.append(line)
    return header, blocks


def _via(block: list[str]) -> set[str]:
    """The packages a requirement is there for, from pip-compile's `# via` annotations."""
    names = set()
    for line in block:
        text = line.strip().removeprefix("#").strip()
        text = text.removeprefix("via").strip()
        if text and not text.startswith("--hash") and not text.endswith("\\"):
            names.add(text.split(" ")[0].lower().replace("_", "-"))
    return names


def finish(text: str) -> str:
    header, blocks = _blocks(text.splitlines())
    followed = set(FOLLOWED)
    changed = True
    while changed:  # what is there only for torch goes too (nvidia-* for torch, mpmath for sympy, ...)
        changed = False
        for block in blocks:
            name = _name(block[0])
            if name and name not in followed and _via(block) and _via(block) <= followed:
                followed.add(name)
                changed = True
    dropped = followed | LEFT_OUT
    kept = [
        b
        for b in blocks
        if _name(b[0]) not in dropped
        and not b[0].startswith("# WARNING")
        and not b[0].startswith("# Consider using a hashable URL")
    ]
    # Where this machine's pip looks (a local mirror, find-links) is no part of the lock.
    header = [
        re.sub(r"--output-file=\S+", "--output-file=requirements/lock.txt", h)
        for h in header
        if not h.startswith(("--index-url", "--extra-index-url", "--find-links", "--trusted-host"))
    ]
    header = header[: next((i for i, h in enumerate(header) if h == NOTE[1]), len(header))]  # run twice: one note
    while header and header[-1].strip() in ("", "#"):
        header.pop()
    return "\n".join(header + NOTE + [line for b in kept for line in b]) + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(finish(path.read_text(encoding="utf-8")), encoding="utf-8")
