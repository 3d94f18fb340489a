"""The layering is visible in the imports, and a test keeps it so.

distill_common at the bottom; the stages (data_prep, distill_pretrain, finetune) above it,
never importing each other; launcher above the stages; distill_cli on top. Every import
counts, at module level or inside a function. No cycles, not even inside one package.
Fine-tuning and the bottom layer never import DeepSpeed. Source files stay short enough to
read at once: over MAX_LINES, the module docstring says why (a line starting "Length:")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"distill_common": 0, "data_prep": 1, "distill_pretrain": 1, "finetune": 1,
          "launcher": 2, "distill_cli": 3}
NO_DEEPSPEED = ("distill_common", "finetune", "data_prep")
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    mods = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file refers to."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in mods.items():
        targets = {owner(n) for n in _imported_names(path, module)}
        # a package's __init__ importing its own modules is not an edge back up
        graph[module] = {t for t in targets if t and t != module
                         and not (t in LAYERS and module.startswith(t + "."))}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _violations({"distill_common.x": {"launcher.y"}, "finetune.z": {"data_prep.w"}}) \
        == ["distill_common.x -> launcher.y (up)", "finetune.z -> data_prep.w (sibling stage)"]


def _violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in graph.items():
        top = module.split(".")[0]
        for dep in deps:
            dep_top = dep.split(".")[0]
            if LAYERS[dep_top] > LAYERS[top]:
                out.append(f"{module} -> {dep} (up)")
            elif LAYERS[dep_top] == LAYERS[top] == 1 and dep_top != top:
                out.append(f"{module} -> {dep} (sibling stage)")
    return sorted(out)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers_and_never_across_stages():
    assert _violations(_graph()) == []


@pytest.mark.parametrize("package", NO_DEEPSPEED)
def test_deepspeed_stays_in_pretraining(package):
    offenders = [module for module, path in _modules().items()
                 if module.split(".")[0] == package
                 and any(n == "deepspeed" or n.startswith("deepspeed.")
                         for n in _imported_names(path, module))]
    assert offenders == []


def test_long_files_say_why():
    unexplained = []
    for module, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not any(line.startswith("Length:") for line in doc.splitlines()):
                unexplained.append(f"{module} ({text.count(chr(10))} lines)")
    assert unexplained == []


def test_every_user_error_derives_from_the_one_base():
    """The CLI prints DistillUserError as one line and lets anything else show its
    traceback; an error class named for users that misses the base would print a trace."""
    import importlib
    import inspect

    from distill_common.errors import DistillUserError

    user_facing = ("UserError", "ConfigError", "AssetError", "PrepError", "LaunchError",
                   "DataError", "TaskError", "RecipeValidationError", "HubModelError",
                   "UnsupportedArchitectureError", "DistributedUserError")
    missing = []
    for module in _modules():
        if module.endswith("__main__"):
            continue  # runs the CLI when imported
        for name, obj in vars(importlib.import_module(module)).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and \
                    name.endswith(user_facing) and not issubclass(obj, DistillUserError):
                missing.append(f"{module}.{name}")
    assert missing == []
