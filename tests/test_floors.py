"""The house's floors (issue 26): modules of one job and at most 400 lines, imports that run only
downwards through the layers declared in pyproject.toml ([tool.importlinter]), and no import cycle."""
from __future__ import annotations

import ast
import graphlib
import itertools
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "evalkit"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, (f"{len(over)} modules over {MAX_LINES} lines (split them along their jobs): "
                      + ", ".join(f"{name} ({n})" for name, n in sorted(over.items(), key=lambda kv: -kv[1])))


def test_the_import_contracts_hold():
    """`make lint` runs the same: layers (each imports only the layers below it) and no cycle between siblings."""
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_module_of_evalkit_has_a_layer():
    """A module the layers do not name is not checked: a new one must be placed."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c["layers"] for c in config["contracts"] if c["name"] == "evalkit's layers")
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    children = {f"evalkit.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    children |= {f"evalkit.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert not children - placed, f"place these in [tool.importlinter]'s layers: {sorted(children - placed)}"


def test_no_import_cycle():
    """Between any modules of evalkit and trainers, a package's __init__ included (the layers and
    acyclic_siblings contracts see packages, not a package and its own modules). Function-level and
    TYPE_CHECKING imports count, as in the contracts."""
    import grimp

    graph = grimp.build_graph("evalkit", "trainers", cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    try:
        graphlib.TopologicalSorter(imports).prepare()
    except graphlib.CycleError as e:
        cycle = e.args[1][::-1]  # graphlib lists each module before the one importing it
        steps = []
        for importer, imported in itertools.pairwise(cycle):
            lines = sorted(d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported))
            steps.append(f"{importer} (line {', '.join(map(str, lines))}) -> {imported}")
        raise AssertionError("an import cycle: " + "; ".join(steps)) from None


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import run when the module is imported: not those inside a function."""
    found: list[tuple[int, str]] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.lineno, child.module))
            walk(child)

    walk(tree)
    return found


def test_evalkit_imports_trainers_only_inside_functions():
    """The layers let evalkit's orchestration import trainers (it trains `train:` variants); at module
    level it would load on `import evalkit.runner`, and trainers, which imports evalkit at module
    level, could then not import a module on that path."""
    found = [f"{p.relative_to(REPO)}:{line}"
             for p in _modules()
             for line, module in _module_level_imports(ast.parse(p.read_text(encoding="utf-8")))
             if module == "trainers" or module.startswith("trainers.")]
    assert not found, f"import trainers inside the function that needs it: {', '.join(found)}"
