"""The package's layers, as the folder tree shows them, import only downwards.

Low to high: ``algo`` (pure tensor functions) -> ``models`` (ops -> layers -> families, registry)
-> ``config``/``data`` (typed configuration, corpus) -> ``refine`` (the single-process REFINE
pipeline) -> the system layer's libraries that roles use (``system.batches`` transport,
``system.weight_sync``, ``system.learner``, ``system.checkpoint``) -> ``serving`` (vLLM) ->
``roles`` (thin Ray actors) -> the rest of ``system`` (controller, experience, actor groups,
placement, run dirs, metrics sinks, KubeRay checks); ``eval`` sits beside the roles (it uses the
pipeline and models, never Ray); the entry modules (cli, train, export, preflight, plan) sit on top.
Only the controller imports ``roles``. Every import counts, also those inside functions.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYSTEM_LIBRARIES = {"batches", "weight_sync", "learner", "checkpoint"}
RANK = {"algo": 0, "models": 1, "config": 2, "data": 2, "refine": 3, "system-lib": 4, "serving": 5,
        "roles": 6, "eval": 6, "system": 7, "entry": 8}
ENTRY = {"cli", "train", "export", "preflight", "plan"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "roles":
        return "roles"
    if len(parts) == 1:                      # refine_ray/__init__.py
        return "entry"
    top = parts[1]
    if top == "system":
        return "system-lib" if len(parts) > 2 and parts[2] in SYSTEM_LIBRARIES else "system"
    if top in ENTRY:
        return "entry"
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
            # `from refine_ray import config` / `from refine_ray.system import checkpoint` name modules
            names = [f"{target}.{a.name}" for a in node.names] if target.count(".") <= 1 else [target]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in ("refine_ray", "roles"))
    return out


def sources():
    return sorted(list((ROOT / "refine_ray").rglob("*.py")) + list((ROOT / "roles").rglob("*.py")))


def test_imports_only_go_down():
    upward = []
    for path in sources():
        src = module_name(path)
        for target in imports_of(path):
            try:
                dst_layer = layer_of(target)
            except AssertionError:            # `from refine_ray.x import name`: x is the module
                dst_layer = layer_of(target.rsplit(".", 1)[0])
            if RANK[dst_layer] > RANK[layer_of(src)]:
                upward.append(f"{src} ({layer_of(src)}) imports {target} ({dst_layer})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_only_the_controller_imports_roles():
    importers = sorted({module_name(p) for p in sources() if not module_name(p).startswith("roles")
                        and any(t.split(".")[0] == "roles" for t in imports_of(p))})
    assert importers == ["refine_ray.system.controller"]


def test_roles_hold_only_actors():
    """roles/: one module per role plus their shared process set-up, nothing else."""
    names = sorted(p.stem for p in (ROOT / "roles").glob("*.py"))
    assert names == ["__init__", "common", "learner", "reference", "reward", "rollout", "scorer"]
