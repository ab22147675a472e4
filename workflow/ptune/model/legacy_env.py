"""The environment ChatGLM-6B's remote code runs in: `.venv-legacy`, with transformers 4.33, layered over `.venv`.

ChatGLM-6B ships its model and tokenizer code in its weights repository (`trust_remote_code`), written for
transformers 4.27–4.33; the main environment keeps transformers 5. The stages that load the model (preprocess,
train, evaluate, deploy) and `python -m ptune.bundle` re-execute themselves here when the base model needs the
legacy code (`ptune.backends`), and this module creates the environment on first use, so a user never switches
environments by hand. `make` creates it up front when params.yaml asks for it.

    python -m ptune.model.legacy_env ensure                  # create or refresh it if its inputs changed
    python -m ptune.model.legacy_env ensure --if-needed P    # only when params file P selects the chatglm backend
    python -m ptune.model.legacy_env python                  # print its interpreter

Environment: PTUNE_LEGACY_VENV puts it elsewhere (default: .venv-legacy in the checkout); PTUNE_LEGACY_PYTHON names
an interpreter to use as it is (an environment you built yourself: it is neither created nor checked).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from ..errors import PtuneError
from ..paths import REPO

log = logging.getLogger(__name__)

VENV_VAR = "PTUNE_LEGACY_VENV"
PYTHON_VAR = "PTUNE_LEGACY_PYTHON"
SETUP = REPO / "scripts" / "setup-venv.sh"
# What the environment is made from: a change to any of them recreates it.
INPUTS = (REPO / "requirements" / "legacy.txt", REPO / "requirements" / "legacy-constraints.txt", SETUP)
STAMP = ".ptune-legacy-installed"


def venv_dir() -> Path:
    """$PTUNE_LEGACY_VENV, else .venv-legacy beside the virtual environment this runs in (`make` puts both in the
    checkout), so that a copy of the project run with the same venv (a DVC experiment's, a test's) shares it; outside
    a virtual environment, in the checkout."""
    if os.environ.get(VENV_VAR):
        return Path(os.environ[VENV_VAR]).absolute()
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix).absolute().parent / ".venv-legacy"
    return (REPO / ".venv-legacy").absolute()


def _own_python() -> Path | None:
    value = os.environ.get(PYTHON_VAR)
    return Path(value) if value else None


def is_current() -> bool:
    """Whether this process already runs in the legacy environment."""
    own = _own_python()
    if own is not None:
        return Path(sys.executable).absolute() == own.absolute()
    return Path(sys.prefix).resolve() == venv_dir().resolve()


def _fingerprint(main_python: str) -> str:
    h = hashlib.sha256(main_python.encode() + b"\0")
    for path in INPUTS:
        h.update(path.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(venv: Path) -> Iterator[None]:
    """One creator at a time (two stages may start together under `snakemake --cores 2`)."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure() -> Path:
    """The legacy interpreter, after creating or refreshing its environment when needed."""
    if is_current():
        return Path(sys.executable)
    own = _own_python()
    if own is not None:
        if not own.is_file():
            raise PtuneError(f"{PYTHON_VAR}={own}: no such interpreter; unset it to let ptune create {venv_dir()}")
        return own
    venv = venv_dir()
    python = venv / "bin" / "python"
    # Layered over the environment this process runs in: the main one.
    main_python = sys.executable
    wanted = _fingerprint(main_python)
    stamp = venv / STAMP
    with _locked(venv):
        if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == wanted and python.is_file():
            return python
        log.info("creating %s for ChatGLM-6B's remote code (transformers 4.33; about a minute)", venv)
        proc = subprocess.run(
            ["bash", str(SETUP), "--legacy", str(venv), main_python],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0:
            raise PtuneError(
                f"could not create {venv} (`{SETUP.relative_to(REPO)} --legacy`, exit "
                f"{proc.returncode}); pip needs to reach the package index once. Its output:\n"
                f"{proc.stdout.strip()[-3000:]}"
            )
        log.info("%s", proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "created")
        stamp.write_text(wanted + "\n", encoding="utf-8")
    return python


def reexec(module: str, argv: Sequence[str]) -> NoReturn:
    """Replace this process by `python -m module argv...` in the legacy environment (same pid, stdio, cwd)."""
    python = ensure()
    log.debug("re-executing %s in %s", module, python)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), "-m", module, *argv])


def _selects_chatglm(params: Path) -> bool:
    """Whether a params file asks for the chatglm backend. Read, not validated: a params file that is being edited
    must not stop `make setup`; the stages report what is wrong with it."""
    try:
        raw = yaml.safe_load(params.read_text(encoding="utf-8"))
        return raw["fetch_weights"]["backend"] == "chatglm"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptune.model.legacy_env", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ensure_p = sub.add_parser("ensure", help="create or refresh the legacy environment")
    ensure_p.add_argument("--if-needed", metavar="PARAMS", help="only if this params file selects backend chatglm")
    sub.add_parser("python", help="print the legacy interpreter (creating the environment if needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "ensure" and args.if_needed and not _selects_chatglm(Path(args.if_needed)):
            return 0
        python = ensure()
        if args.command == "python":
            print(python)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
