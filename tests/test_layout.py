"""The architecture as checked facts: file sizes, no import cycles, and layers that only import
downward (see README "Layout" and shared/DESIGN.md).

Imports are read from the source with ``ast`` (module level and inside functions alike), so a
cycle dodged by a function-level import still counts.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("gptoss_jax", "pallas_kernels", "cpu_kernels", "convert")
MAX_LINES = 600

# Layer of each module prefix (longest prefix wins) and what a layer may import. A module may
# always import within its own layer. ``gptoss_jax`` (the package facade) may import anything.
LAYERS = {
    "pallas_kernels": "kernels",
    "cpu_kernels": "kernels",
    "gptoss_jax.parallel": "parallel",
    "gptoss_jax.ops": "ops",
    "gptoss_jax.model": "model",
    "gptoss_jax.introspect": "model",
    "convert": "convert",
    "gptoss_jax.checkpoint": "checkpoint",
    "gptoss_jax.chat": "chat",
    "gptoss_jax.harmony": "chat",
    "gptoss_jax.inference": "inference",
    "gptoss_jax.tools": "tools",
    "gptoss_jax.finetune": "finetune",
    "gptoss_jax.server": "server",
    "gptoss_jax.cli": "cli",
    "gptoss_jax.generate": "cli",
    "gptoss_jax.serve": "cli",
    "gptoss_jax.convert": "cli",
    "gptoss_jax.finetune.__main__": "cli",
    "gptoss_jax": "facade",
}
MAY_IMPORT = {
    "kernels": set(),
    "parallel": set(),
    "ops": {"kernels", "parallel"},
    "model": {"ops", "parallel", "kernels"},
    "convert": {"model", "kernels"},  # config and parameter declarations, never the forward pass
    "checkpoint": {"convert", "model", "parallel", "ops"},
    "chat": set(),
    "inference": {"model", "ops", "parallel", "chat", "kernels"},
    "tools": {"chat"},
    "finetune": {"model", "ops", "parallel", "checkpoint", "convert", "chat", "kernels"},
    "server": {"inference", "chat", "tools", "model", "parallel"},
    "cli": {"server", "inference", "finetune", "chat", "checkpoint", "tools", "model", "parallel",
            "ops", "convert"},
    "facade": set(LAYERS.values()),
}
FORWARD_PASS = ("gptoss_jax.model.transformer", "gptoss_jax.model.attention", "gptoss_jax.model.moe",
                "gptoss_jax.model.model")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Our modules that ``name`` imports (``from a import b`` counts a.b when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_source_files_stay_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (split it: at most {MAX_LINES})"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, function-level ones included.
    Package ``__init__`` modules that re-export their submodules are left out: importing a
    submodule runs its package first, which is not a dependency of the submodule's code."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downward():
    bad = []
    for module, deps in GRAPH.items():
        layer = _layer(module)
        for dep in deps:
            other = _layer(dep)
            if other != layer and other not in MAY_IMPORT[layer]:
                bad.append(f"{module} ({layer}) imports {dep} ({other})")
    assert not bad, "\n".join(sorted(bad))


def test_converter_never_imports_the_forward_pass():
    for module, deps in GRAPH.items():
        if _layer(module) == "convert":
            assert not [d for d in deps if d.startswith(FORWARD_PASS)], module


def test_kernels_import_no_model_code():
    for module, deps in GRAPH.items():
        if _layer(module) == "kernels":
            assert all(d.split(".")[0] in ("pallas_kernels", "cpu_kernels") for d in deps), module


def test_test_files_have_unique_basenames():
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
