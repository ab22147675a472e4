"""Processes as Linux's /proc shows them, for tests that check what a signal or a crash leaves running."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
