"""The import order of the package, as a test: data flows one way, and no module needs itself.

``../shared/DESIGN.md`` orders the stages from the ground up; a module may import from its own
stage and from the stages below it, never from one above (inference never imports training: the
checkpoint format lives in ``models/``, the run store in ``train/``). Every import counts — a
function-level import is still a dependency, only a delayed one — so this reads each file with
``ast`` rather than importing it. And no cycle, even a delayed one: a cycle hidden in a function
body works only as long as nobody reorders two lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scratchlm"

# From the ground up. The first stage is the plumbing every stage may use.
ORDER = [
    {"io", "config", "device", "plots", "downloads"},
    {"tokenizers"},
    {"data"},
    {"models"},
    {"generate"},
    {"serve"},
    {"train"},
    {"posttrain"},
    {"eval"},
    {"pipeline"},
    {"cli", "__main__", "__init__"},
]
STAGE = {name: level for level, names in enumerate(ORDER) for name in names}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name lives in (``scratchlm.models.gpt.GPT`` -> ``scratchlm.models.gpt``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Package modules that ``module`` imports anywhere in its file (module- or function-level)."""
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import submodule`` depends on the submodule; a name defined in the
            # package's __init__ depends on the package (a parent package's __init__ runs on any
            # import of its submodules, so it is not counted as an edge of its own)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):  # importlib.import_module("scratchlm.x"): an import all the same
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            if name == "scratchlm" or name.startswith("scratchlm."):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGE["__init__" if len(parts) == 1 else parts[1]]


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_belongs_to_a_stage():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m and m.split(".")[1] not in STAGE})
    assert not unknown, (
        f"modules outside every stage of ORDER (add them to the stage they belong to): {unknown}"
    )


def test_no_import_points_up_the_stages():
    wrong = [
        f"{m} (stage {stage(m)}) imports {t} (stage {stage(t)})"
        for m, targets in sorted(GRAPH.items())
        for t in sorted(targets)
        if stage(t) > stage(m)
    ]
    assert not wrong, "imports against the order in DESIGN.md:\n" + "\n".join(wrong)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or several."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return components


def _path(a: str, b: str) -> list[str]:
    """One shortest import path from a to b (for the message)."""
    previous, frontier = {a: None}, [a]
    while frontier and b not in previous:
        reached = []
        for v in frontier:
            for w in sorted(GRAPH[v]):
                if w not in previous:
                    previous[w] = v
                    reached.append(w)
        frontier = reached
    path, v = [], b
    while v is not None:
        path.append(v)
        v = previous[v]
    return path[::-1]


def test_no_import_cycles():
    messages = []
    for component in _cycles():
        a = component[0]
        b = next(t for t in sorted(GRAPH[a]) if t in component)
        messages.append(" -> ".join([a] + _path(b, a)))
    assert not messages, "import cycles (function-level imports included):\n" + "\n".join(messages)


def test_the_checker_sees_what_it_must():
    """The reader is not blind: a function-level import, a relative import, ``import a.b as c`` and
    ``importlib.import_module("...")`` are each found, resolved to the module they name."""
    source = (
        "import scratchlm.io as plumbing\n"
        "from ..train import config\n"
        "def later():\n"
        "    from scratchlm.serve.engine import LLM\n"
        "    import importlib\n"
        "    importlib.import_module('scratchlm.posttrain.sft')\n"
    )
    found = imports_in(source, "scratchlm.models.inspect")
    assert found == {
        "scratchlm.io",
        "scratchlm.train.config",
        "scratchlm.serve.engine",
        "scratchlm.posttrain.sft",
    }
    assert [stage(m) > stage("scratchlm.models.inspect") for m in sorted(found)] == [False, True, True, True]
