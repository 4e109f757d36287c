"""``layerhessians reproduce --regularization`` end to end on a tiny grid, and the method
comparison it writes (grouping of reruns by setting and method, Welch's tests)."""

import json

import pytest

from layerhessians.analysis.method_comparison import method_groups
from layerhessians.analysis.regularization import last_epochs, welch
from layerhessians.cli.main import main

FLAGS = {"dataset": "digits", "model": "lenet", "optimizer": "sgd", "learning_rate": 0.05,
         "batch_size": 256, "num_epochs": 2, "hessian_iterations": 4,
         "examples_per_class": 1, "layers": True, "hessian_every": 2}


def test_reproduce_regularization_trains_and_compares(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    methods = {"sgd": {}, "l2": {"weight_decay": 1e-3},
               "ggn": {"htr_gamma": 1e-2, "htr_estimator": "ggn", "htr_form": "batched"}}
    grid.write_text(json.dumps({"runs": [
        {"run": f"model=LeNet,dataset=Digits,{m}", "flags": {**FLAGS, **flags}}
        for m, flags in methods.items()]}))
    root = tmp_path / "htr"
    assert main(["reproduce", "--regularization", "--grid", str(grid), "--root", str(root),
                 "--replicates", "2", "--threads", "1", "--no-plots"]) == 0
    out = capsys.readouterr().out
    groups = method_groups(root)
    assert list(groups) == ["model=LeNet,dataset=Digits"]
    runs = groups["model=LeNet,dataset=Digits"]
    assert list(runs) == ["sgd", "l2", "ggn"] and all(len(d) == 2 for d in runs.values())
    folder = root / "regularization" / "model=LeNet,dataset=Digits"
    table = (folder / "table.md").read_text()
    assert {"error_bars.png", "test_accuracy.png", "layer_curvature.png"} <= \
        {p.name for p in folder.iterdir()}
    # the table's test against SGD is Welch's test of the runs' last-epoch test errors
    errors = {m: 1 - last_epochs(d)["test_acc"].to_numpy() for m, d in runs.items()}
    w = welch(errors["ggn"], errors["sgd"])
    row = next(line for line in table.splitlines() if line.startswith("| ggn |"))
    assert f"{100 * w['difference']:+.2f} [{100 * w['low']:+.2f}, {100 * w['high']:+.2f}]" in row
    assert "| ggn |" in out and "3 method(s), 6 run(s)" in out
    assert not (root / "match_distros.csv").exists()  # no spectra match in this mode
    # an interrupted rerun (no epoch committed: its checkpoint is gone) is left out
    (root / "model=LeNet,dataset=Digits,l2,run2" / "checkpoints" / "last.pt").unlink()
    assert [p.name for p in method_groups(root)["model=LeNet,dataset=Digits"]["l2"]] == \
        ["model=LeNet,dataset=Digits,l2,run1"]


def test_method_groups_of_a_root_without_runs(tmp_path):
    assert method_groups(tmp_path) == {}
    with pytest.raises(FileNotFoundError):
        method_groups(tmp_path / "absent")
