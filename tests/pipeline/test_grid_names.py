"""Grid files cannot place runs outside --root (issue 12, kind 3)."""

import json

import pytest

from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.pipeline.grid import load_grid


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "a/b", "", ".."])
def test_grid_run_names_must_stay_under_root(tmp_path, name, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"runs": [{"run": name, "flags": {"num_epochs": 1}}]}))
    with pytest.raises(UserError, match="run name"):
        load_grid(grid)
    assert main(["sweep", str(grid), "--root", str(tmp_path / "runs"), "--no-plots",
                 "--no-match"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "run name" in lines[0]
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_run_inside_flags_is_refused(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"runs": [{"run": "a", "flags": {"run": "../x"}}]}))
    with pytest.raises(UserError, match="'run'"):
        load_grid(grid)
