"""Every field of a grid file is checked for type and value, names included, in one line
naming the file (issue 21, item 19)."""

import json

import pytest

from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.pipeline.grid import load_grid

GOOD_RUN = {"run": "a", "flags": {"num_epochs": 1}}


@pytest.mark.parametrize("grid, message", [
    ("[1, 2]", "a grid file is a JSON object"),
    ('{"runs": [}', "is not JSON"),
    (json.dumps({"run": [GOOD_RUN]}), "unknown key 'run'"),
    (json.dumps({"runs": []}), "runs must be a non-empty list"),
    (json.dumps({"runs": {"a": 1}}), "runs must be a non-empty list"),
    (json.dumps({"description": 3, "runs": [GOOD_RUN]}), "description must be a string"),
    (json.dumps({"runs": ["a"]}), "run 1 must be an object"),
    (json.dumps({"runs": [GOOD_RUN, {"run": "b", "flag": {}}]}), "run 2: unknown key 'flag'"),
    (json.dumps({"runs": [{"run": 5}]}), "run must be a folder name .*got 5"),
    (json.dumps({"runs": [{"run": ["a"]}]}), "run must be a folder name"),
    (json.dumps({"runs": [{"run": "a", "flags": [["num_epochs", 1]]}]}), "flags must be an object"),
    (json.dumps({"runs": [{"run": "a", "flags": {"num_epoch": 1}}]}),
     "'num_epoch' is not a `layerhessians train` setting"),
    (json.dumps({"runs": [{"run": "a", "flags": {"num_epochs": "3"}}]}), "num_epochs must be"),
    (json.dumps({"runs": [{"run": "a", "flags": {"learning_rate": -1.0}}]}), "learning"),
    (json.dumps({"runs": [{"run": "a", "flags": {"model": "LeNett"}}]}), "LeNet"),
    (json.dumps({"runs": [{"run": "a", "flags": {"hessian_iterations": 1}}]}), "iterations"),
])
def test_bad_grid_fields_are_refused_in_one_line_naming_the_file(tmp_path, capsys, grid,
                                                                 message):
    path = tmp_path / "grid.json"
    path.write_text(grid)
    with pytest.raises(UserError, match=message) as caught:
        load_grid(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert main(["sweep", str(path), "--root", str(tmp_path / "runs"), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert not (tmp_path / "runs").exists()


def test_the_shipped_grids_pass():
    assert [r.run for r in load_grid("quick")]
    assert len(load_grid("seed")) == 12
