"""The trainer's wiring of the exact layer spectra (``--layer-spectra``,
``--validate-layer-spectra``), ``--threads``, progress off a terminal, and the quick grid."""

import json
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from layerhessians import load_run
from layerhessians.cli.main import main
from layerhessians.data import hessian_subset, load_dataset
from layerhessians.errors import SettingError, UserError
from layerhessians.models import build_model
from layerhessians.pipeline.grid import load_grid
from layerhessians.pipeline.run_grid import verdicts
from layerhessians.spectra import layer_spectra
from layerhessians.spectra.fidelity import relative_w1
from layerhessians.store.readers import read_spectra
from layerhessians.training import train
from layerhessians.training.config import HessianConfig, TrainConfig, apply_flags
from layerhessians.training.seeding import derive_seed
from layerhessians.training.setup import Setup
from layerhessians.training.spectra_hook import (
    FIDELITY_COLUMNS,
    compute_spectra,
    plan_layer_methods,
)

LENET_LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
TINY = ["-d", "digits", "-m", "lenet", "-lr", "0.05", "-b", "128", "--hessian-iterations", "6",
        "--examples_per_class", "1", "--no-progress"]
CE = nn.CrossEntropyLoss()


def _train(run, *argv) -> int:
    return main(["train", "-r", str(run), *TINY, *argv])


# ----------------------------------------------------------------------------- settings
def test_layer_spectra_settings_and_their_names():
    config = apply_flags(TrainConfig(), {"layer_spectra": "EXACT", "validate_layer_spectra": True,
                                         "threads": 2}).validated()
    assert (config.hessian.layer_method, config.hessian.validate_layers) == ("exact", True)
    assert config.threads == 2 and config.to_dict()["threads"] == 2
    assert TrainConfig().validated().hessian.layer_method == "auto"
    with pytest.raises(UserError, match="--layer-spectra"):
        apply_flags(TrainConfig(), {"layer_spectra": "dense"}).validated()
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UserError, match="--threads"):
            TrainConfig(threads=bad).validated()
    # a run recorded before the setting existed measured its layers by SLQ
    legacy = TrainConfig().to_dict()
    for key in ("layer_method", "validate_layers"):
        del legacy["hessian"][key]
    assert TrainConfig.from_dict(legacy).hessian.layer_method == "slq"


def _tanh_setup(layer_method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.arange(9) % 3
    config = TrainConfig(hessian=HessianConfig(iterations=8, layer_method=layer_method))
    blocks = OrderedDict([("0.weight", [model[0].weight]), ("2.weight", [model[2].weight])])
    return Setup(config=config.validated(), device=torch.device("cpu"), data=None, model=model,
                 optimizer=None, scheduler=None, loss_fn=CE, hessian_batch=(x, y),
                 blocks=blocks)


def test_exact_refused_before_training_where_not_certified():
    """tanh: the first layer's Hessian block is not its GGN block: ``exact`` is refused in
    both spellings; ``auto`` keeps the certified block exact and says why the other is SLQ."""
    with pytest.raises(SettingError) as err:
        plan_layer_methods(_tanh_setup("exact"))
    assert "layer_method=\"exact\" cannot treat 1 layer block(s)" in str(err.value)
    assert "0.weight" in str(err.value) and "2.weight" not in str(err.value)
    assert err.value.spelled("cli").startswith("--layer-spectra exact cannot treat")

    setup = _tanh_setup("auto")
    layers = plan_layer_methods(setup)  # a frozen plan, kept beside the settings
    setup = replace(setup, layers=layers)
    assert layers.methods == {"0.weight": "slq", "2.weight": "exact"}
    assert set(setup.fallbacks) == {"0.weight"} and setup.certificates["2.weight"].certified
    spectra = compute_spectra(setup, epoch=1, disable_progress=True)
    assert spectra.methods == {"full": "slq", "0.weight": "slq", "2.weight": "exact"}
    # the certificate of the setup is reused: same exact measure as a fresh probe
    fresh = layer_spectra(setup.model, CE, [setup.hessian_batch], iterations=8,
                          layers={"2.weight": setup.model[2].weight}, layer_method="exact")
    np.testing.assert_allclose(spectra["2.weight"].nodes, fresh["2.weight"].nodes, rtol=1e-12)


def test_cli_refuses_exact_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "-n", "1", "--hessian-kind", "residual", "--layer-spectra", "exact") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("layerhessians train: error: --layer-spectra exact cannot treat "
                              "5 layer block(s) of LeNet"), err
    assert "pass --layer-spectra auto or slq" in err[-1] and not run.exists()


# ----------------------------------------------------------------------------- the run directory
@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("validated") / "run"
    assert _train(run, "-n", "2", "--validate-layer-spectra", "--save_freq", "1",
                  "--hessian-vectors", "2") == 0
    return run


def test_methods_layer_metrics_and_log(validated_run):
    run = load_run(validated_run)
    methods = run.spectra.groupby("block")["method"].unique()
    assert list(methods["full"]) == ["slq"]
    assert all(list(methods[b]) == ["exact"] for b in LENET_LAYERS)
    assert run.measure("fc1.weight", 2).method == "exact"
    assert run.measure("full", 2).method == "slq"
    for block in LENET_LAYERS:
        for epoch in (1, 2):
            measure = run.measure(block, epoch)
            row = run.metrics[run.metrics["epoch"] == epoch].iloc[0]
            dim = run.record.block_dims[block]
            assert row[f"top_eigenvalue/{block}"] == pytest.approx(measure.nodes.max(), rel=1e-12)
            trace = dim * float(np.dot(measure.weights, measure.nodes))
            assert row[f"trace/{block}"] == pytest.approx(trace, rel=1e-9)
    log = (validated_run / "logs" / "train.log").read_text()
    assert "layer spectra (auto): exact for 5 of 5 blocks" in log


def test_slq_fidelity_table_equals_an_independent_slq_run(validated_run):
    """Every measured epoch x exact block has a row; the last epoch's W1 error is that of a
    separate SLQ run on the saved weights (same seed) against the recorded exact spectrum."""
    table = pd.read_csv(validated_run / "slq_fidelity.csv")
    assert list(table.columns) == FIDELITY_COLUMNS
    assert sorted(zip(table["epoch"], table["block"])) == sorted(
        (e, b) for e in (1, 2) for b in LENET_LAYERS)
    assert (table["w1_relative"] >= 0).all() and (table["w1_relative"] < 0.5).all()
    run = load_run(validated_run)
    data = load_dataset("Digits")
    model = build_model("LeNet", in_channels=data.in_channels, num_classes=data.num_classes)
    model.load_state_dict(torch.load(validated_run / "checkpoints" / "epoch_0002.pt",
                                     weights_only=True))
    index = hessian_subset(data.train_y, 1, seed=0)
    slq = layer_spectra(model, CE, [(data.train_x[index], data.train_y[index])], iterations=6,
                        vectors=2, seed=derive_seed(0, 2, "spectra"), layer_method="slq",
                        reorthogonalize=True)
    for block in LENET_LAYERS:
        row = table[(table["epoch"] == 2) & (table["block"] == block)].iloc[0]
        exact = run.measure(block, 2)
        exact.dim = run.record.block_dims[block]
        assert row["w1_relative"] == pytest.approx(relative_w1(slq[block], exact), rel=1e-6)
        assert row["exact_top"] == pytest.approx(exact.nodes.max(), rel=1e-12)
    assert "validate_seconds" in run.metrics.columns


def test_fallback_reasons_reach_the_run_log_and_stderr(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "-n", "1", "--hessian-kind", "residual") == 0
    err = capsys.readouterr().err
    log = (run / "logs" / "train.log").read_text()
    for text in (log, err):  # the setup's line, and the engine's own warning of each epoch
        assert "SLQ for conv1.weight (kind='residual' has no Gram route)" in text
        assert "layer spectra: SLQ instead of the exact route for 5 block(s)" in text
    assert set(load_run(run).spectra["method"]) == {"slq"}
    assert not any(c.startswith("top_eigenvalue/") for c in load_run(run).metrics.columns)


def test_older_runs_without_a_method_column_still_load(validated_run, tmp_path):
    frame = pd.read_csv(validated_run / "spectra.csv").drop(columns=["method"])
    frame.to_csv(tmp_path / "spectra.csv", index=False)
    old = read_spectra(tmp_path / "spectra.csv")
    assert "method" not in old.columns and len(old) == len(frame)
    frame.assign(method="lanczos").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match="unknown method 'lanczos'"):
        read_spectra(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------- threads
def test_threads_recorded_kept_on_resume_and_warned_when_changed(tmp_path, capsys):
    before = torch.get_num_threads()
    run = tmp_path / "run"
    assert _train(run, "-n", "1", "--threads", "1", "--no-layers") == 0
    assert json.loads((run / "config.json").read_text())["facts"]["threads"] == 1
    assert torch.get_num_threads() == before  # the library call leaves the process as it was
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "-n", "2"]) == 0  # reuses the recorded count
    err = capsys.readouterr().err
    assert "bit-identical" not in err and "resuming after epoch 1 of 2, 1 torch thread(s)" in err

    other = 2 if before != 2 else 3
    assert main(["train", "--resume", str(run), "-n", "3", "--threads", str(other)]) == 0
    err = capsys.readouterr().err
    assert (f"the run was trained with 1 thread(s) and continues with {other}: the "
            "continuation is not bit-identical") in err
    assert json.loads((run / "config.json").read_text())["facts"]["threads"] == 1
    assert "not bit-identical" in (run / "logs" / "train.log").read_text()


def test_library_resume_reuses_the_recorded_count(tmp_path, monkeypatch):
    config = TrainConfig(dataset="Digits", num_epochs=1, batch_size=256, examples_per_class=1,
                         threads=1, hessian=HessianConfig(iterations=4, layers=False))
    run = train(config, tmp_path / "run", progress=False, console=False)
    seen = []
    monkeypatch.setattr("layerhessians.training.threads.set_threads",
                        lambda n: seen.append(n) or torch.get_num_threads())
    from dataclasses import replace

    train(replace(config, num_epochs=2, threads=None), run, resume=True, progress=False,
          console=False)
    assert seen == [1]


def test_grid_commands_pass_threads_to_every_run(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"runs": [{"run": "a", "flags": {"num_epochs": 1}},
                                         {"run": "b", "flags": {"num_epochs": 1}}]}))
    assert main(["sweep", str(grid), "--root", str(tmp_path), "--threads", "1",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("threads=1") == 2
    assert main(["reproduce", "--grid", str(grid), "--root", str(tmp_path), "--threads", "0",
                 "--dry-run"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err
    assert main(["sweep", str(grid), "--root", str(tmp_path), "--threads", "1",
                 "--train-args", "--threads 2", "--dry-run"]) == 2
    assert "disagree" in capsys.readouterr().err


# ----------------------------------------------------------------------------- progress
def test_progress_lines_off_a_terminal_go_to_the_log_and_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("layerhessians.progress.LOG_INTERVAL_S", 0.02)
    run = tmp_path / "run"
    argv = [a for a in TINY if a != "--no-progress"]  # default: log lines off a terminal
    assert main(["train", "-r", str(run), *argv, "-n", "1", "-b", "16", "--no-layers"]) == 0
    out, err = capsys.readouterr()
    log = (run / "logs" / "train.log").read_text()
    for text in (log, err):
        lines = [line for line in text.splitlines() if "epoch 1: " in line and "steps (" in line]
        assert lines and ("left" in lines[0] or "unknown" in lines[0]), text
    assert "epoch 1/1" not in out and "steps (" not in out  # stdout: no log lines


# ----------------------------------------------------------------------------- the quick grid
def test_quick_grid_shape():
    runs = load_grid("quick")
    configs = [r.config() for r in runs]
    assert len(configs) >= 2 and any(c.dataset == "MNIST5k" for c in configs)
    for config in configs:
        assert config.hessian.iterations >= 64 and config.hessian.layer_method == "auto"
        assert config.hessian.init and config.threads == 1


def test_grid_ends_with_the_figures_and_one_verdict_per_run(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    flags = {"num_epochs": 2, "dataset": "Digits", "hessian_iterations": 8,
             "examples_per_class": 1, "batch_size": 256}
    grid.write_text(json.dumps({"runs": [{"run": "a", "flags": flags},
                                         {"run": "b", "flags": {**flags, "seed": 1}}]}))
    assert main(["sweep", str(grid), "--root", str(tmp_path), "--threads", "1", "--no-plots",
                 "--train-args=--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("sweep: figures: ") and "match_distros_wasserstein.png" in lines[-3]
    for line, run in zip(lines[-2:], ("a", "b")):
        assert line.startswith(f"sweep: LeNet+Digits [{run}]: over training, "), line
    assert json.loads((tmp_path / "a" / "config.json").read_text())["facts"]["threads"] == 1


def test_verdicts_from_a_summary():
    summary = pd.DataFrame([
        {"run": "r", "model": "LeNet", "dataset": "MNIST5k", "metric": "wasserstein",
         "best_index": 2, "best_layer": "fc1.weight", "best_depth": 0.5, "peak_epoch": 3,
         "peak_index": 1, "peak_layer": "conv2.weight", "peak_depth": 0.25},
        {"run": "r", "model": "LeNet", "dataset": "MNIST5k", "metric": "paper",
         "best_index": 0, "best_layer": "conv1.weight", "best_depth": 0.0, "peak_epoch": 3,
         "peak_index": 0, "peak_layer": "conv1.weight", "peak_depth": 0.0}])
    assert verdicts(summary) == [
        "LeNet+MNIST5k [r]: closest to the full spectrum over training: #2 fc1.weight "
        "(depth 0.50); at the peak epoch 3: #1 conv2.weight (depth 0.25) [wasserstein]"]
    assert verdicts(summary.assign(verdict="a tie")) == ["LeNet+MNIST5k [r]: a tie"]
    assert verdicts(None) == []
    judged = summary.assign(best_verdict=["fc1.weight", "conv1.weight"], best_share=0.78,
                            peak_verdict="no layer significantly closer",
                            peak_runner_up="fc1.weight", peak_share=0.002)
    assert verdicts(judged) == [
        "LeNet+MNIST5k [r]: over training, #2 fc1.weight (depth 0.50, 78% of parameters) "
        "significantly closest; at the peak epoch 3, no layer significantly closer (closest "
        "#1 conv2.weight (depth 0.25, 0.2% of parameters), runner-up fc1.weight) [wasserstein]"]
