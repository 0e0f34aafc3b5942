"""The house: the package's import graph has no cycle, every module imports only from its
own floor of the flow or below, and private torch names appear in one module only.

Read from the source with ``ast`` (every import counts: module level, inside functions,
under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fxsight"

# the floors of the flow, bottom up: a module may import from its own floor or below
FLOORS = {
    "fxsight._torch": 0, "fxsight.errors": 0, "fxsight.stats": 0, "fxsight.locks": 0,
    "fxsight.record": 1,
    "fxsight.capture": 2,
    "fxsight.splice": 3,
    "fxsight.run": 4,
    "fxsight.generate": 5,
    "fxsight.bind": 6,
    "fxsight.api": 7,
    "fxsight.experiments": 8,
    "fxsight.patching": 9,
    "fxsight": 10,  # the package's __init__: the public names
}

PRIVATE_TORCH = re.compile(r"\btorch\._|torch\.utils\._pytree|torch\.fx\._|torch\.export\._"
                           r"|fx\.graph\._|fx\.experimental\._")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The fxsight modules ``name`` imports (resolving relative imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            targets = [f"{root}.{alias.name}" if f"{root}.{alias.name}" in modules else root
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _floor(module: str) -> int:
    while module not in FLOORS:
        module = module.rpartition(".")[0]
    return FLOORS[module]


def test_the_layout_is_read_from_the_real_package():
    modules = _modules()
    assert "fxsight.record.recorder" in modules and "fxsight.api.tracer" in modules
    edges = _imports("fxsight.api.tracer", modules["fxsight.api.tracer"], set(modules))
    assert "fxsight.record.recorder" in edges and "fxsight.run.forward" in edges


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path
                              else [name, target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_from_its_floor_or_below():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(name, path, set(modules)):
            if _floor(target) > _floor(name):
                wrong.append(f"{name} (floor {_floor(name)}) imports {target} "
                             f"(floor {_floor(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_type_checking_blocks():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if "TYPE_CHECKING" in p.read_text()]
    assert not offenders


def test_private_torch_names_appear_in_one_module_only():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_torch.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE_TORCH.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("sample, private", [
    ("import torch.utils._pytree as pytree", True),
    ("x = torch._ops.OpOverload", True),
    ("from torch._subclasses.fake_tensor import FakeTensorMode", True),
    ("torch.fx.experimental._config.patch(x=1)", True),
    ("torch.compiler.disable(fn)", False),
    ("torch.fx.GraphModule(root, graph)", False),
])
def test_the_private_name_pattern(sample, private):
    assert bool(PRIVATE_TORCH.search(sample)) == private


def test_the_public_api_has_runnable_examples():
    """Docstring examples (run by ``make test`` with ``--doctest-modules``) on the public
    API: at least 15."""
    import doctest
    import importlib

    finder = doctest.DocTestFinder()
    examples = {}
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module):
            if test.examples and test.name.startswith(name):
                examples[test.name] = len(test.examples)
    assert len(examples) >= 15, sorted(examples)
    for required in ("Tracer.invoke", "Tracer.cache", "Tracer.stop", "NNsight.scan",
                     "NNsight.edit", "NNsight.export", "LanguageModel.generate",
                     "Envoy.skip", "functions.save", "Proxy", "activation_patching"):
        assert any(required in name for name in examples), required
