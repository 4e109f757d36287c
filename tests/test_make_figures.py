"""docs/make_figures.py never reuses a run it did not make with its own settings (issue 21,
item 20): its runs live under its own root, and a run found there with other settings stops
it with a one-line message."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "make_figures.py"


@pytest.fixture
def script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path)
    return module


def test_its_runs_live_under_its_own_root(script):
    script.set_root(Path("runs/figures"))
    readme_runs = {Path("runs/mnist5k-lenet"), Path("runs/quick")}
    for path in (script.QUICK_ROOT, script.MNIST_RUN, script.MNIST_MATCH, script.FINDING_ROOT):
        assert path.parts[:2] == ("runs", "figures") and path not in readme_runs


def test_a_run_with_other_settings_is_not_reused(script, tmp_path):
    run = Path("runs/figures/mnist5k-lenet")
    (tmp_path / run).mkdir(parents=True)
    wanted = {**script.MNIST_SETTINGS, "hessian_vectors": 3}
    script.made_here(run, wanted)  # no run yet: nothing to check
    recorded = {"model": "LeNet", "dataset": "MNIST5k", "learning_rate": 0.01,
                "weight_decay": 0.0, "batch_size": 256, "optimizer": "sgd",
                "examples_per_class": 10, "num_epochs": 5,
                "hessian": {"iterations": 128, "vectors": 3, "init": True,
                            "layer_method": "auto"}}
    (tmp_path / run / "config.json").write_text(json.dumps(recorded))
    script.made_here(run, wanted)  # the same settings (fewer epochs: resumed) are reused
    # the README's hands-on example: lr 0.01, 1 vector, no initial spectra
    recorded["hessian"].update(vectors=1, init=False)
    (tmp_path / run / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match="holds a run with other settings.*hessian_vectors 1 "
                                         "\\(asked 3\\)"):
        script.made_here(run, wanted)
