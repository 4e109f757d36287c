"""Structure: no library module imports the CLI; the CLI's help starts without torch; grid
settings map to typed configs; the atomic writer's files follow the umask."""

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
