"""Every field of a grid file is checked for type and value, names included, in one line
naming the file (issue 21, item 19)."""

import json
import re

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
     "grid flag 'num_epoch' of run 'a' .* is not a `layerhessians train` setting "
     "\\(did you mean 'num_epochs'\\?\\)"),
    (json.dumps({"runs": [{"run": "a", "flags": {"num_epochs": "3"}}]}), "num_epochs must be"),
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


@pytest.mark.parametrize("flags, message", [
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"model": "LeNett"}, "did you mean 'LeNet'"),
    ({"hessian_iterations": 1}, "hessian-iterations"),
    ({"dataset": "Digitz"}, "did you mean 'Digits'"),
])
def test_bad_grid_values_are_refused_per_run_before_anything_trains(tmp_path, capsys, flags,
                                                                   message):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"runs": [{"run": "bad", "flags": {"num_epochs": 1, **flags}},
                                         {"run": "good", "flags": {"num_epochs": 1}}]}))
    assert main(["sweep", str(path), "--root", str(tmp_path / "runs"), "--dry-run"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("bad: error:"), captured.err
    assert re.search(message, errors[0]), errors[0]
    assert "1 of 2 runs to train" in captured.out
    assert not (tmp_path / "runs").exists()


def test_the_shipped_grids_pass():
    assert [r.run for r in load_grid("quick")]
    assert len(load_grid("seed")) == 12
