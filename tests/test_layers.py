"""The package's layers, as the folder tree shows them, import only downwards.

Low to high: ``algo`` (pure tensor functions) -> ``models`` (ops -> layers -> families, registry)
-> ``config``/``data`` (typed configuration, corpus) -> ``refine`` (the single-process REFINE
pipeline) -> ``transport`` (batches, weight sync, checkpoint files) -> ``serving`` (rollout
engines, vLLM) -> ``roles`` (the Ray actors) and ``eval`` -> ``system`` (the driver: controller,
experience, actor groups, placement, run dirs, metrics) -> the entry modules (cli, train, export,
preflight, plan). A module's layer is its top-level folder; every import counts, also those
inside functions.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ORDER = [{"algo"}, {"models"}, {"config", "data"}, {"refine"}, {"transport"}, {"serving"}, {"roles", "eval"},
         {"system"}, {"cli", "train", "export", "preflight", "plan", "__init__"}]
RANK = {name: rank for rank, names in enumerate(ORDER) for name in names}


def layer_of(module: str) -> str:
    """``roles.x`` -> roles; ``refine_ray.<top>...`` -> top; ``refine_ray`` -> __init__."""
    parts = module.split(".")
    if parts[0] == "roles":
        return "roles"
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in RANK:
        raise AssertionError(f"{module}: a module outside the known layers; add it to tests/test_layers.py")
    return top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every refine_ray/roles module imported anywhere in the file (absolute and relative)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import x`: x may be a submodule, so both pkg and pkg.x count
            names = ([target] if target != "refine_ray" else []) + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in ("refine_ray", "roles"))
    return out


def sources():
    return sorted(list((ROOT / "refine_ray").rglob("*.py")) + list((ROOT / "roles").rglob("*.py")))


def test_every_module_has_a_layer():
    for path in sources():
        layer_of(module_name(path))


def test_imports_only_go_down():
    upward = []
    for path in sources():
        src = module_name(path)
        for target in imports_of(path):
            if RANK[layer_of(target)] > RANK[layer_of(src)]:
                upward.append(f"{src} ({layer_of(src)}) imports {target} ({layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_roles_hold_only_actors():
    """roles/: one module per role plus their shared process set-up, nothing else."""
    names = sorted(p.stem for p in (ROOT / "roles").glob("*.py"))
    assert names == ["__init__", "common", "learner", "reference", "reward", "rollout", "scorer"]


def test_the_driver_is_imported_only_by_the_entry_points():
    """system/ is the top of the library: no role, engine or transport module reaches into it."""
    importers = sorted({module_name(p) for p in sources()
                        if layer_of(module_name(p)) != "system"
                        and any(layer_of(t) == "system" for t in imports_of(p))})
    assert all(RANK[layer_of(m)] == RANK["cli"] for m in importers), importers


def test_weight_sync_backends_are_chosen_in_one_place():
    """Only transport/weight_sync/__init__.py (the BACKENDS registry) imports a backend's module:
    roles and driver reach a backend through the registry, so a new backend is its file plus
    one registry line."""
    backends = {f"refine_ray.transport.weight_sync.{p.stem}"
                for p in (ROOT / "refine_ray" / "transport" / "weight_sync").glob("*.py")
                if p.stem not in ("__init__", "base")}
    importers = sorted({module_name(p) for p in sources() if module_name(p) not in backends
                        and any(t in backends or t.rsplit(".", 1)[0] in backends for t in imports_of(p))})
    assert importers == ["refine_ray.transport.weight_sync"], importers
