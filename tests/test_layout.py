"""The package's layers hold: a module imports only from its own folder or from layers below its own, and never,
directly or through others, a module that imports it; the modules meant to be light import no torch."""

from __future__ import annotations

import json
import subprocess
import sys

from ptune.pipeline import code

from conftest import REPO

# Lowest first. A folder (or a top-level module) may import its own modules and any layer below its own; units
# within one layer never import each other. docs/design.md explains each layer.
LAYERS = (
    ("errors", "paths", "guards"),
    ("pipeline",),
    ("state",),
    ("config",),
    ("data",),
    ("model", "sources", "reporting", "remote"),
    ("compute", "bundle"),
    ("serve",),
    ("stages", "doctor", "presets"),
    ("cli",),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    """The layer unit of a module: its folder under ptune (ptune.model.native: model), or the top-level module's
    own name (ptune.config: config); None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    """The package's import graph (pipeline/code.py, which also finds each stage's code), a package's own __init__
    left out of what its modules import."""
    return {m: {i for i in imported if not m.startswith(i + ".")} for m, imported in code.graph().items()}


def test_every_folder_and_top_level_module_has_a_layer():
    units = {_unit(m) for m in _graph()} - {None}
    assert units == set(LEVEL), (
        f"units without a layer: {sorted(units - set(LEVEL))}; gone: {sorted(set(LEVEL) - units)}"
    )


def test_imports_point_down_between_folders():
    wrong = []
    for module, imported in sorted(_graph().items()):
        here = _unit(module)
        for other in sorted(imported):
            there = _unit(other)
            if here is None or there is None or here == there:
                continue
            if LEVEL[there] >= LEVEL[here]:
                wrong.append(f"{module} (layer {LEVEL[here]}, {here}) imports {other} (layer {LEVEL[there]}, {there})")
    assert not wrong, "imports that do not point down (tests/test_layout.py LAYERS, docs/design.md):\n" + "\n".join(
        wrong
    )


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# What the light paths must not load: each takes seconds, and the CLI's help or a params check needs none of them.
HEAVY = ("torch", "transformers", "datasets", "accelerate", "gradio", "fastapi", "dvc", "snakemake", "pandas")
LIGHT = """
import json, sys
from ptune import cli, config, paths
cli.build_parser().format_help()
for command in ("serve", "chat", "status", "remote", "doctor", "compare"):
    try:
        cli.build_parser().parse_args([command, "--help"])
    except SystemExit:
        pass
config.load(sys.argv[1])
from ptune.bundle import manifest, opening
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_light_modules_import_nothing_heavy():
    """The CLI's help (every command's), params checking, paths and reading a bundle import no torch, transformers,
    dvc or server library: kept by this test, not by comments."""
    proc = subprocess.run(
        [sys.executable, "-c", LIGHT, str(REPO / "params.yaml")], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert not loaded & set(HEAVY), f"heavy libraries loaded by the light paths: {sorted(loaded & set(HEAVY))}"
