"""The layers of cnnkit read one way (docs/architecture.md): a module imports its own layer or lower
ones, never a higher one, and no modules import each other in a circle. Read from the source with
`ast`, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cnnkit")

# Lowest first. A module not listed here fails the test: each new module takes a place on purpose.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        (
            "cnnkit.version",
            "cnnkit.errors",
            "cnnkit.files",
            "cnnkit.meta",
            "cnnkit.listing",
            "cnnkit.formats",
            "cnnkit.images",
            "cnnkit.batches",
            "cnnkit.csvcells",
            "cnnkit.confusion",
            "cnnkit.console",
            "cnnkit.devices",
            "cnnkit.provenance",
            "cnnkit.runs",
            "cnnkit.mistakes",
            "cnnkit.cpu",
        ),
    ),
    (
        "datasets",
        (
            "cnnkit.datasets",
            "cnnkit.datasets.idx",
            "cnnkit.datasets.layout",
            "cnnkit.datasets.mnist",
            "cnnkit.datasets.sample",
        ),
    ),
    (
        "runtime",
        (
            "cnnkit.runtime",
            "cnnkit.runtime.session",
            "cnnkit.runtime.openvino",
            "cnnkit.runtime.outputs",
            "cnnkit.runtime.precision",
            "cnnkit.runtime.shard",
            "cnnkit.runtime.backends",
            "cnnkit.runtime.infer",
            "cnnkit.runtime.predictor",
        ),
    ),
    ("models", ("cnnkit.models", "cnnkit.checkpoint")),
    (
        "export",
        (
            "cnnkit.export",
            "cnnkit.export.fold",
            "cnnkit.export.mobile",
            "cnnkit.export.onnx",
            "cnnkit.export.parity",
            "cnnkit.export.diff",
            "cnnkit.export.pipeline",
            "cnnkit.export.pt2",
            "cnnkit.export.quantize",
            "cnnkit.export.torchscript",
        ),
    ),
    (
        "trainer",
        (
            "cnnkit.trainer",
            "cnnkit.trainer.data",
            "cnnkit.trainer.distributed",
            "cnnkit.trainer.loop",
            "cnnkit.trainer.plots",
        ),
    ),
    # `cnnkit` itself is the public facade: its names come from the layers below, imported on first use.
    (
        "apps",
        ("cnnkit", "cnnkit.api", "cnnkit.bench", "cnnkit.report", "cnnkit.doctor", "cnnkit.cli", "cnnkit.__main__"),
    ),
]
LEVEL = {mod: i for i, (_, mods) in enumerate(LAYERS) for mod in mods}
TORCH_FREE = ("core", "datasets", "runtime")  # the Raspberry Pi install: numpy + onnxruntime
HEAVY = ("torch", "torchvision", "onnx", "onnxscript")


def _modules() -> dict[str, str]:
    found = {}
    for dirpath, _, filenames in os.walk(ROOT):
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                mod = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
                found[mod.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """Every cnnkit module and every top-level third-party package that `path` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return {name if name.startswith("cnnkit") else name.split(".")[0] for name in out}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {mod: {m for m in _imports(path, modules) if m != mod} for mod, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert sorted(set(graph) - set(LEVEL)) == []


def test_no_module_imports_a_higher_layer(graph):
    up = [
        f"{mod} ({LAYERS[LEVEL[mod]][0]}) imports {dep} ({LAYERS[LEVEL[dep]][0]})"
        for mod, deps in graph.items()
        for dep in deps
        if dep in LEVEL and mod in LEVEL and LEVEL[dep] > LEVEL[mod]
    ]
    assert up == []


def test_no_import_cycles(graph):
    internal = {mod: {d for d in deps if d in graph} for mod, deps in graph.items()}
    cycles, state = [], {}

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(internal[mod]):
            if state.get(dep) == "open":
                cycles.append(
                    " -> ".join(stack[stack.index(dep) :] + [mod, dep]) if dep in stack else f"{mod} -> {dep}"
                )
            elif dep not in state:
                visit(dep, [*stack, mod])
        state[mod] = "done"

    for mod in sorted(internal):
        if mod not in state:
            visit(mod, [])
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    cycles = [c for c in cycles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert cycles == []


def test_torch_free_layers_never_import_torch_or_onnx(graph):
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod in LEVEL and LAYERS[LEVEL[mod]][0] in TORCH_FREE
        for dep in deps
        if dep in HEAVY
    ]
    assert bad == []


def test_no_function_holds_more_than_60_lines_of_code():
    """A reader can hold a function that fits on one screen, its docstring included."""
    import importlib.util
    from pathlib import Path

    script = Path(ROOT).parent / "scripts" / "function_lengths.py"
    spec = importlib.util.spec_from_file_location("function_lengths", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.lengths(Path(ROOT))
    assert len(rows) > 100  # it did read the package
    assert [name for lines, _, name in rows if lines > 60] == []
