"""The house rules of docs/ARCHITECTURE.md, checked on the source (AST, not strings).

* dependencies point one way, toward the pure core: every top-level component (a module of
  ``llave_ds/`` or a sub-package) has a layer, and a module imports only its own component
  and components of lower layers (``LAYERS``);
* no import cycle between modules, inside a sub-package or across them;
* ``torch.distributed`` is called from ``core/distributed.py`` only, DeepSpeed is imported by
  ``training/engine.py`` only;
* the house stays readable: no module over ~650 lines, at most 18 modules at the top level.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llave_ds"

# Layer of each top-level component. A module may import its own component and any
# component of a strictly lower layer; never one beside it or above it.
LAYERS = {
    "config": 0, "formats": 0, "files": 0,  # leaves: import nothing of llave-ds
    "core": 1,                              # distributed, gather, objective, gradcache: the pure core
    "media": 1,                             # images, videos, the Side; knows nothing of models or rows
    "data": 2, "model": 2,                  # rows -> batches; LMM -> embedding (they know nothing of each other)
    "training": 3,                          # engine (DeepSpeed), checkpoints, run dir, step log, optim
    "export": 4, "eval": 4,                 # compose model and training / model and data
    "train": 5, "mine": 5,                  # the training entry point; hard-negative mining (data + model + eval's encoder)
    "toy": 6,                               # tiny models, synthetic tasks, warm start, demo
    "bench": 7,                             # llave-ds bench
    "cli": 8,                               # llave-ds: imports each subcommand by name
}
DISTRIBUTED_MODULE = "llave_ds.core.distributed"
DEEPSPEED_MODULE = "llave_ds.training.engine"
MAX_MODULE_LINES = 650
MAX_TOP_LEVEL_MODULES = 18


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _component(module: str) -> str:
    """``core`` for ``llave_ds.core.gather``, ``train`` for ``llave_ds.train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _imported_modules(tree: ast.Module) -> list[str]:
    """Every module an import statement may load: ``from a.b import c`` gives ``a.b`` and
    ``a.b.c`` (``c`` may be a module); function-level imports count too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def _uses_torch_distributed(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = _imported_modules(ast.Module(body=[node], type_ignores=[]))
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("torch.distributed"):
            lines.append(node.lineno)
    return lines


def _module_graph(sources: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the llave_ds modules it imports (names that are not modules dropped)."""
    known = set(sources)
    graph = {}
    for name, tree in sources.items():
        deps = {m for m in _imported_modules(tree) if m in known and m != name and m != "llave_ds"}
        graph[name] = deps
    return graph


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        own = _component(module)
        if not own:
            continue
        for dep in sorted(deps):
            other = _component(dep)
            if other == own or not other:
                continue
            if LAYERS[other] >= LAYERS[own]:
                out.append(f"{module} (layer {LAYERS[own]}) imports {dep} (layer {LAYERS[other]})")
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_component_has_a_layer():
    components = {_component(m) for m in _sources()} - {""}
    assert components == set(LAYERS), (f"give new components a layer in LAYERS (and docs/ARCHITECTURE.md): "
                                       f"{sorted(components ^ set(LAYERS))}")


def test_dependencies_point_down_the_layers():
    violations = _layer_violations(_module_graph(_sources()))
    assert not violations, "imports across or up the layers:\n" + "\n".join(violations)


def test_no_import_cycles_between_modules():
    cycles = _cycles(_module_graph(_sources()))
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_only_core_distributed_calls_torch_distributed():
    offenders = sorted(f"{name}:{line}" for name, tree in _sources().items() if name != DISTRIBUTED_MODULE
                       for line in _uses_torch_distributed(tree))
    assert not offenders, f"torch.distributed used outside {DISTRIBUTED_MODULE}: {offenders}"


def test_only_training_engine_imports_deepspeed():
    offenders = sorted(f"{name}: {dep}" for name, tree in _sources().items() if name != DEEPSPEED_MODULE
                       for dep in _imported_modules(tree) if dep.split(".")[0] == "deepspeed")
    assert not offenders, f"DeepSpeed imported outside {DEEPSPEED_MODULE}: {offenders}"


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (cut them at a seam): {long}"
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} top-level modules: {top}"


@pytest.mark.parametrize("snippet, rule", [
    ("import torch.distributed as dist\n", "torch"),
    ("import torch\nx = torch.distributed.get_rank()\n", "torch"),
    ("from torch.distributed import barrier\n", "torch"),
    ("from deepspeed.utils import logger\n", "deepspeed"),
])
def test_the_checks_see_each_form(snippet, rule):
    """The scanners must catch every spelling, or the rules above could never fail."""
    tree = ast.parse(snippet)
    if rule == "torch":
        assert _uses_torch_distributed(tree)
    else:
        assert any(n.split(".")[0] == "deepspeed" for n in _imported_modules(tree))
    assert not _uses_torch_distributed(ast.parse('cmd = ["-m", "torch.distributed.run"]\n'))


def test_the_layer_and_cycle_checks_can_fail():
    """An upward import, a sideways one and a cycle inside a sub-package are each reported."""
    known = {"llave_ds.core.gather", "llave_ds.model.embedding", "llave_ds.data.batching",
             "llave_ds.eval.a", "llave_ds.eval.b"}
    sources = {name: ast.parse("") for name in known}
    sources["llave_ds.core.gather"] = ast.parse("from llave_ds.model.embedding import EmbeddingModel\n")
    sources["llave_ds.data.batching"] = ast.parse("def f():\n    from llave_ds.model import embedding\n")
    sources["llave_ds.eval.a"] = ast.parse("from llave_ds.eval import b\n")
    sources["llave_ds.eval.b"] = ast.parse("import llave_ds.eval.a\n")
    graph = _module_graph(sources)
    violations = _layer_violations(graph)
    assert any(v.startswith("llave_ds.core.gather") for v in violations), violations
    assert any(v.startswith("llave_ds.data.batching") for v in violations), violations
    assert [c for c in _cycles(graph) if "llave_ds.eval.a" in c], _cycles(graph)
