"""Imports inside ``refine_ray/models`` go only down fla's tiers: ops -> layers -> families -> registry.

Every import of every file is read with ``ast`` (module level and inside functions alike, since a
function-level import closes a circle just as well once it runs), resolved to the files it runs
(the module and the packages above it, below ``refine_ray.models`` itself, whose ``__init__``
only loads names lazily; a file's own packages are already initialised when it runs), and checked: no file imports one of a higher tier, and the graph has
no cycle.
"""
import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "refine_ray" / "models"
PACKAGE = "refine_ray.models"

# The tiers, lowest first; every file of models/ belongs to one (the first prefix it matches).
TIERS = (
    ("ops", ("ops/",)),
    ("layers", ("layers/", "base.py", "dtypes.py", "generation.py", "hf_generate.py")),
    ("families", ("deltanet/", "lact/", "llama/")),
    ("registry", ("registry.py", "auto.py", "__init__.py")),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(MODELS).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _files() -> dict[str, Path]:
    """Module name -> file, for every .py under models/."""
    return {_module_name(p): p for p in sorted(MODELS.rglob("*.py"))}


def _tier(path: Path) -> int:
    rel = path.relative_to(MODELS).as_posix()
    for i, (_, prefixes) in enumerate(TIERS):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return i
    raise AssertionError(f"refine_ray/models/{rel} is in no tier of {TIERS}; add it to one")


def _imported(name: str, files: dict[str, Path]) -> set[str]:
    """The models/ files that importing ``name`` runs: the module and its packages below the root."""
    out, parts = set(), name.split(".")
    for i in range(len(PACKAGE.split(".")) + 1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in files:
            out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the models/ modules it imports (anywhere in the file)."""
    files = _files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= _imported(alias.name, files)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                edges |= _imported(target, files)
                for alias in node.names:                # ``from pkg import submodule``
                    edges |= _imported(f"{target}.{alias.name}", files) & {f"{target}.{alias.name}"}
        own_packages = _imported(name, files)           # already initialised when ``name`` runs
        graph[name] = edges - own_packages
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # registry.py imports every family inside its loader functions only
    assert {f"{PACKAGE}.deltanet", f"{PACKAGE}.lact", f"{PACKAGE}.llama"} <= graph[f"{PACKAGE}.registry"]
    assert f"{PACKAGE}.ops.conv" in graph[f"{PACKAGE}.ops.dispatch"]       # ``from . import conv``


def test_models_imports_have_no_cycle():
    assert _cycles(import_graph()) == []


def test_models_imports_go_only_down_the_tiers():
    files = _files()
    upward = [f"{a} ({TIERS[_tier(files[a])][0]}) imports {b} ({TIERS[_tier(files[b])][0]})"
              for a, targets in import_graph().items() for b in sorted(targets)
              if _tier(files[b]) > _tier(files[a])]
    assert upward == []
