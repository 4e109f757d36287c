"""Structure: the import rules of docs/architecture.md (no cycles anywhere, no module
outside cli/ imports the CLI, curvature never imports spectra, the engine never imports
training, store or analysis, the settings and vocabularies are free of torch); the CLI's
help starts without torch; grid settings map to typed configs; the atomic writer's files
follow the umask."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerhessians
from layerhessians.cli.main import COMMANDS
from layerhessians.errors import UserError
from layerhessians.pipeline.grid import GridRun, flags_to_config
from layerhessians.store.atomic import atomic_path
from layerhessians.training.config import HessianConfig, TrainConfig

PACKAGE = Path(layerhessians.__file__).resolve().parent


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree) -> set:
    """The import nodes under ``if TYPE_CHECKING:`` (annotations, never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def import_graph() -> dict:
    """``{module: {package modules it imports}}`` over every module of the package, from
    its AST: imports at any depth (a function's lazy import counts), except those under
    ``if TYPE_CHECKING:``; ``from package import name`` points at the submodule ``name``
    where there is one, else at the package; relative imports resolved."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1]
                                    + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # importing a module imports its parent packages first: not an edge
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or ``None`` (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a function-level import (resume_target imports store.resume only when called)
    assert "layerhessians.store.resume" in graph["layerhessians.training.resume"]
    # the cycle finder finds a cycle where there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere():
    assert _cycle(import_graph()) is None


def _offenders(importer: str, forbidden) -> list:
    return sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                  if module == importer or module.startswith(importer + ".")
                  for target in targets
                  if any(target == f or target.startswith(f + ".") for f in forbidden))


def test_curvature_never_imports_spectra():
    assert _offenders("layerhessians.curvature", ["layerhessians.spectra"]) == []


@pytest.mark.parametrize("engine", ["layerhessians.curvature", "layerhessians.spectra"])
def test_the_engine_never_imports_training_store_or_analysis(engine):
    forbidden = ["layerhessians.training", "layerhessians.store", "layerhessians.analysis",
                 "layerhessians.tracking", "layerhessians.pipeline"]
    assert _offenders(engine, forbidden) == []


@pytest.mark.parametrize("module", ["layerhessians.settings", "layerhessians.vocabulary",
                                    "layerhessians.errors", "layerhessians.training.config"])
def test_settings_and_vocabularies_do_not_import_torch(module):
    code = f"import sys, {module}; print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "NO-TORCH", done.stderr


def test_no_module_outside_cli_imports_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":
            continue
        names = list(_imports(ast.parse(path.read_text())))
        if any(n == "layerhessians.cli" or n.startswith("layerhessians.cli.") for n in names):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_does_not_import_torch(argv):
    code = ("import sys, runpy; sys.argv = ['layerhessians', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('layerhessians', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60)
    assert "usage: layerhessians" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "NO-TORCH"


def test_grid_flags_map_to_a_typed_config():
    config = flags_to_config({"learning_rate": 0.05, "hessian_iterations": 64,
                              "init_spectra": True, "layers": False, "cuda": 1,
                              "hessian_total": "all", "log_dir": "ignored"})
    assert isinstance(config, TrainConfig) and config.learning_rate == 0.05
    assert config.hessian == HessianConfig(iterations=64, init=True, layers=False).validated()
    assert config.device == "cuda:1" and config.hessian_total == "all"
    assert GridRun("r", {"seed": 3}).config({"seed": 4}).seed == 4


def test_grid_unknown_flag_and_wrong_type_are_user_errors():
    with pytest.raises(UserError, match="unknown setting 'learning_rte'.*learning_rate"):
        flags_to_config({"learning_rte": 0.1})
    with pytest.raises(UserError, match="--num_epochs must be an integer"):
        flags_to_config({"num_epochs": "ten"})
    with pytest.raises(UserError, match="--augment must be true or false"):
        flags_to_config({"augment": "yes"})


def test_grid_file_with_unknown_flag_is_refused(tmp_path):
    from layerhessians.pipeline.grid import load_grid

    grid = tmp_path / "grid.json"
    grid.write_text('{"runs": [{"run": "a", "flags": {"lr": 0.1}}]}')
    with pytest.raises(UserError, match="grid flag 'lr' of run 'a'"):
        load_grid(grid)


def test_atomic_writer_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "sub" / "f.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "f.txt"
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("y")
        raise RuntimeError("fails midway")
    assert path.read_text() == "x" and [p.name for p in path.parent.iterdir()] == ["f.txt"]
