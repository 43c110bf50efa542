"""The package's layering, read from the source: no import cycle, and the library core (``mmprefix/core/``) never
reaches into the harness around it (data, models, training, evaluation, serving, the experiment helpers, the
embedded backbones, the trainer integrations); old import paths of moved modules give the same module objects."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmprefix"
CORE = "mmprefix.core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every mmprefix module ``path`` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {m for m in found if m and m.startswith("mmprefix")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycle_from(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path of module names, or None. A package's ``__init__`` importing its own
    submodules is not a cycle of the code, so those edges are left out."""
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    assert cycle_from(graph()) is None, " -> ".join(cycle_from(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_the_harness():
    core = {name: deps for name, deps in graph().items() if name.startswith(CORE)}
    assert len(core) > 20, "the core was found"
    offending = {name: sorted(d for d in deps if not d.startswith(CORE)) for name, deps in core.items()}
    assert not {k: v for k, v in offending.items() if v}


def test_the_harness_packages_hold_no_core_module():
    """What the core holds is the core's alone: the top of the package holds only the public names, the commands
    and their defaults, beside the core and the harness packages."""
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "cli.py", "defaults.py"]


def test_old_import_paths_give_the_moved_modules_themselves():
    """``mmprefix.model`` (and every other module that moved into core/ or models/) imports the module at its new
    place, one object under both names: a patch through the old name reaches the code that runs."""
    import importlib
    import subprocess
    import sys

    import mmprefix

    for old, new in mmprefix._MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
        assert importlib.import_module(old).__spec__.name == new
    assert callable(mmprefix.compose) and mmprefix.compose is importlib.import_module("mmprefix.compose").compose
    import mmprefix.attention.blip as blip
    from mmprefix.core.attention import blip as moved

    assert blip is moved
    # in a fresh process the old path comes first, and the new one still finds the same module
    code = ("import mmprefix.routing as a, mmprefix.core.routing as b, mmprefix.experiment.methods as c, "
            "mmprefix.models.methods as d; "
            "assert a is b and c is d, (a, b, c, d)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_loading_a_model_class_through_the_recipe_helpers_logs_no_pytree_notices():
    """transformers imports torchao when it is installed (as a model class loads), and torchao's import made torch
    log two deprecation notices (torch/utils/_pytree.py) at the start of every recipe run."""
    import subprocess
    import sys

    code = "import mmprefix.models.loading, transformers; transformers.BlipForQuestionAnswering; import torchao"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "_pytree" not in result.stderr, result.stderr


def test_no_module_outside_the_family_records_branches_on_a_model_type_name():
    """Per-family knowledge lives in the records (mmprefix/families.py; prompts and decoding in the prompt-format
    objects they name): no comparison elsewhere names a model type or a record's key (`kind == "blip"`,
    `model_type in ("opt",)`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from mmprefix.core.families import FAMILIES

    names = set(CONFIG_MAPPING_NAMES) | {key for family in FAMILIES for key in family.keys}

    def strings(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(set(), *(strings(element) for element in node.elts))
        return set()

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "families.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                named = set().union(strings(node.left), *(strings(c) for c in node.comparators)) & names
                if named:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {sorted(named)}")
    assert not found, found
