"""The code a stage runs, as files: its module, the runner every stage starts in, the entries of the processes it
starts, and every module of the package these import, at their top or inside functions (a lazy import runs too),
found by reading the sources (ast), never by importing them. dvc.yaml lists them as the stage's deps, so an edit
reruns exactly the stages that run the edited file.

NOT_STAGE_CODE names, with the reason, what the import graph reaches but no stage runs; the graph stops there. A
test runs the stages and checks that each loads no module of the package outside its list.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from ..paths import REPO
from .declared import BY_NAME

PACKAGE = REPO / "workflow" / "ptune"
RUNNER = "ptune.stages.runner"  # what `ptune STAGE` runs, in every stage's process (stages/runner.py)
# The runner imports it for the stages declared model_env only; for the others the graph stops there.
ENVIRONMENT = "ptune.stages.environment"

# Modules the import graph reaches from a stage but that no stage runs, as paths under workflow/ptune/. A folder
# (ending in /) stands for every module in it.
NOT_STAGE_CODE: dict[str, str] = {
    "cli.py": "parses the command line and hands a stage to stages/runner.py; it runs no stage logic",
    "pipeline/": "the declarations: what in them changes a result (paths, params, the command) is in dvc.yaml, "
    "which DVC compares itself; help and resources change no output",
    "serve/web.py": "the Gradio page: deploy's check starts the API server, never the page",
    "serve/chat.py": "the terminal chat: deploy's check starts the API server",
}


def module_name(path: Path) -> str:
    """ptune.model.native for workflow/ptune/model/native.py; ptune.model for its __init__.py."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, at its top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base in modules:
                found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    found.discard(name)
    return found


@cache
def files() -> dict[str, Path]:
    """Every module of the package and its file."""
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in f.parts}


@cache
def graph() -> dict[str, frozenset[str]]:
    """module -> the package's modules it imports (a package's own __init__ included where it is imported)."""
    known = set(files())
    return {m: frozenset(imports(f, known)) for m, f in files().items()}


def _excluded(module: str) -> bool:
    rel = files()[module].relative_to(PACKAGE).as_posix()
    return any(rel == key or (key.endswith("/") and rel.startswith(key)) for key in NOT_STAGE_CODE)


def _with_packages(module: str) -> list[str]:
    """A module and the packages above it, whose __init__ runs when it is imported."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _entry(module: str) -> list[str]:
    """What `python -m module` runs: a package's __main__ as well."""
    main = f"{module}.__main__"
    return [module, main] if main in files() else [module]


def modules(stage: str) -> set[str]:
    """The package's modules that `stage` runs (NOT_STAGE_CODE left out, and not followed)."""
    declared = BY_NAME[stage]
    todo = [f"ptune.stages.{stage}", RUNNER, *(m for entry in declared.starts for m in _entry(entry))]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        for m in _with_packages(module):
            if m in seen or m not in files() or _excluded(m) or (m == ENVIRONMENT and not declared.model_env):
                continue
            seen.add(m)
            todo.extend(graph()[m])
    return seen


def stage_files(stage: str) -> list[str]:
    """The files `stage` runs or reads as code, relative to the project root, sorted: its deps in dvc.yaml."""
    paths = [files()[m] for m in modules(stage)] + [PACKAGE / rel for rel in BY_NAME[stage].data_files]
    return sorted(p.relative_to(REPO).as_posix() for p in paths)


def not_stage_code() -> list[str]:
    """The package's modules no stage runs, as paths under workflow/ptune/."""
    run = set().union(*(modules(s) for s in BY_NAME))
    return sorted(files()[m].relative_to(PACKAGE).as_posix() for m in set(files()) - run)
