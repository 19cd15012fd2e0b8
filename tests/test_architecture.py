"""The house rules of docs/ARCHITECTURE.md, checked on the source (AST, not strings).

* ``torch.distributed`` is called from ``distributed.py`` only;
* DeepSpeed is imported by ``engine.py`` only;
* dependencies point one way: the pure core (distributed, gather, objective, gradcache)
  imports nothing outside itself but the leaf config.py, model and data modules import nothing of training,
  and no two modules import each other, directly or through others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llave_ds"

CORE = {"distributed", "gather", "objective", "gradcache"}
MODEL_AND_DATA = {"model", "processing", "tiny", "vision_cache", "embedder", "video",
                  "data", "synthetic", "synthetic_video", "eval_data", "metrics", "retrieval", "analysis",
                  "warm_start"}
TRAINING = {"train", "engine", "gradcache", "export", "checkpoint", "optim", "demo", "bench", "cli"}


def _component(path: Path) -> str:
    """Top-level component of a source file: ``bench`` for ``llave_ds/bench/runner.py``."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _sources() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _imported_modules(tree: ast.Module) -> list[str]:
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


def _llave_imports(tree: ast.Module) -> set[str]:
    deps = set()
    for name in _imported_modules(tree):
        parts = name.split(".")
        if parts[0] == "llave_ds" and len(parts) > 1 and not parts[1].startswith("__"):
            deps.add(parts[1])
    return deps


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path, tree in _sources().items():
        comp = _component(path)
        if comp == "__init__":
            continue
        graph.setdefault(comp, set()).update(_llave_imports(tree) - {comp})
    known = set(graph)
    return {k: {d for d in v if d in known} for k, v in graph.items()}


def test_only_distributed_py_calls_torch_distributed():
    offenders = {f"{p.relative_to(PACKAGE.parent)}:{line}"
                 for p, tree in _sources().items() if p.name != "distributed.py" or p.parent != PACKAGE
                 for line in _uses_torch_distributed(tree)}
    assert not offenders, f"torch.distributed used outside llave_ds/distributed.py: {sorted(offenders)}"


def test_only_engine_py_imports_deepspeed():
    offenders = sorted(f"{p.relative_to(PACKAGE.parent)}: {name}"
                       for p, tree in _sources().items() if not (p.name == "engine.py" and p.parent == PACKAGE)
                       for name in _imported_modules(tree) if name.split(".")[0] == "deepspeed")
    assert not offenders, f"DeepSpeed imported outside llave_ds/engine.py: {offenders}"


def test_the_pure_core_imports_only_itself():
    """The core may use config.py (its sections check their Literal choices with it), a
    leaf that itself imports no llave-ds module."""
    graph = _graph()
    assert graph["config"] == set(), graph["config"]
    allowed = CORE | {"config"}
    leaks = {m: sorted(graph[m] - allowed) for m in CORE if graph.get(m, set()) - allowed}
    assert not leaks, f"core modules import outside the core: {leaks}"


def test_model_and_data_know_nothing_of_training():
    graph = _graph()
    leaks = {m: sorted(graph[m] & TRAINING) for m in MODEL_AND_DATA if graph.get(m, set()) & TRAINING}
    assert not leaks, f"model/data modules import training modules: {leaks}"


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


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
