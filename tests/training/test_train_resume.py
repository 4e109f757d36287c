"""Crash safety and run-directory rules of ``layerhessians train`` on MNIST-format files the
test writes: a SIGKILLed run resumed with ``--resume`` equals an uninterrupted one exactly
(CPU), conflicting or concurrent writers are refused, divergence keeps what was computed."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_fixtures import mnist_arrays, write_mnist
from layerhessians import load_run
from layerhessians.cli.main import main
from layerhessians.store import checkpoints, writer
from layerhessians.store.writer import RunStore
from layerhessians.training.loop import CRASH_ENV

REPO = Path(__file__).resolve().parents[2]
SECONDS = ["train_seconds", "spectra_seconds", "eval_seconds"]



@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_mnist(root / "MNIST" / "raw", mnist_arrays(n_train=60, n_test=20, seed=2))
    return root


def flags(root, *extra):
    """A small run with SGD momentum, a learning-rate milestone and spectra at epoch 0."""
    return ["-d", "mnist", "--dataset_root", str(root), "-m", "LeNet", "-o", "sgd", "-n", "3",
            "-lr", "0.05", "-b", "16", "--milestones", "2", "--step_gamma", "0.5",
            "--hessian-iterations", "6", "--examples_per_class", "2", "--init-spectra",
            "--no-progress", *extra]


def train(run, argv) -> int:
    return main(["train", "-r", str(run), *argv])


def assert_same_results(a, b):
    """Metrics (but timings) and spectra identical, bit for bit; same final weights."""
    ra, rb = load_run(a), load_run(b)
    pd.testing.assert_frame_equal(ra.metrics.drop(columns=SECONDS),
                                  rb.metrics.drop(columns=SECONDS), check_exact=True)
    pd.testing.assert_frame_equal(ra.spectra, rb.spectra, check_exact=True)
    wa = torch.load(Path(a) / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(Path(b) / "checkpoints" / "last.pt", weights_only=True)
    assert wa["epoch"] == wb["epoch"]
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


@pytest.fixture(scope="module")
def straight(mnist_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train(run, flags(mnist_root)) == 0
    return run


def test_sigkilled_run_resumes_to_identical_results(straight, mnist_root, tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, CRASH_ENV: "2:spectra", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    killed = subprocess.run([sys.executable, "-m", "layerhessians", "train", "-r", str(run),
                             *flags(mnist_root)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after epoch 2's spectra
    assert RunStore(run).completed_epoch == 1
    assert list(load_run(run).metrics["epoch"]) == [0, 1]

    assert train(run, ["--resume"]) == 0  # every setting from config.json
    assert_same_results(straight, run)
    config = load_run(run).record.facts
    assert len(config["resumed_at"]) == 1 and "--resume" in config["command"]

    # a finished run is extended by raising -n; nothing is recomputed
    before = load_run(run).spectra
    assert train(run, ["--resume", "-n", "4"]) == 0
    after = load_run(run)
    assert list(after.metrics["epoch"]) == [0, 1, 2, 3, 4] and after.record.training["num_epochs"] == 4
    pd.testing.assert_frame_equal(after.spectra[after.spectra["epoch"] <= 3], before,
                                  check_exact=True)
    assert train(run, ["--resume"]) == 0  # complete: nothing to do
    assert train(run, ["--resume", "-n", "2"]) == 2  # would shorten it: refused
    assert list(load_run(run).metrics["epoch"]) == [0, 1, 2, 3, 4]
    assert load_run(run).record.training["num_epochs"] == 4


class Crash(Exception):
    pass


def test_crash_between_metrics_and_checkpoint(mnist_root, tmp_path, monkeypatch):
    """Adam with augmentation; the process dies after epoch 2's spectra and metrics are
    written but before its checkpoint: the stray rows are dropped and recomputed."""
    argv = flags(mnist_root, "-o", "adam", "-lr", "1e-3", "--augment")
    assert train(tmp_path / "straight", argv) == 0

    save_torch = checkpoints.save_torch

    def failing_save(path, obj):
        if Path(path).name == "last.pt" and obj.get("epoch") == 2:
            raise Crash("killed while writing the checkpoint")
        save_torch(path, obj)

    monkeypatch.setattr(writer, "save_torch", failing_save)
    with pytest.raises(Crash):
        train(tmp_path / "crashed", argv)
    monkeypatch.setattr(writer, "save_torch", save_torch)
    crashed = load_run(tmp_path / "crashed")
    # epoch 2's rows are written but not committed: readers show committed epochs only
    assert b"\n2," in (tmp_path / "crashed" / "metrics.csv").read_bytes()
    assert list(crashed.metrics["epoch"]) == [0, 1] and crashed.epochs == [0, 1]
    assert RunStore(tmp_path / "crashed").completed_epoch == 1

    assert train(tmp_path / "crashed", ["--resume"]) == 0
    assert_same_results(tmp_path / "straight", tmp_path / "crashed")


def test_refuses_other_settings_restarts_and_concurrent_writers(straight, mnist_root, tmp_path,
                                                                capsys):
    run = tmp_path / "copy"
    shutil.copytree(straight, run)
    capsys.readouterr()

    assert train(run, flags(mnist_root)) == 2  # same settings, but no --resume
    assert "--resume to continue it or --overwrite" in capsys.readouterr().err
    assert train(run, ["--resume", "-lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "different settings (learning_rate: 0.05 -> 0.1)" in err and "--overwrite" in err

    with RunStore.create(run, load_run(run).config, resume=True):  # another writer
        assert train(run, ["--resume", "-n", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being written by another process" in err[0]
    assert list(load_run(run).metrics["epoch"]) == [0, 1, 2, 3]

    assert train(run, flags(mnist_root, "-lr", "0.1", "--no-layers", "--hessian-every", "2",
                            "--overwrite")) == 0
    replaced = load_run(run)
    assert replaced.record.training["learning_rate"] == 0.1 and replaced.blocks == ["full"]
    assert list(replaced.metrics["epoch"]) == [0, 1, 2, 3]
    assert replaced.epochs == [0, 2, 3]  # every 2nd epoch, and always the last
    assert replaced.metrics["top_eigenvalue"].isna().tolist() == [False, True, False, False]


def test_divergence_stops_with_one_line_and_keeps_completed_epochs(mnist_root, tmp_path, capsys):
    run = tmp_path / "diverged"
    rc = train(run, ["-d", "MNIST", "--dataset_root", str(mnist_root), "-n", "3", "-lr", "1e12",
                     "-b", "8", "--init-spectra", "--no-layers", "--hessian-iterations", "4",
                     "--examples_per_class", "1"])  # default progress: quiet off a terminal
    # the run's log lines also go to stderr; the error is its one last line
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("layerhessians train: error")]
    assert rc == 2 and errors == err[-1:], err
    match = re.fullmatch(r"layerhessians train: error: training diverged at epoch (\d) "
                         r"\(loss=(nan|inf)\); epochs 0\.\.(\d) are kept in (.+); "
                         r"try a smaller --learning_rate", err[-1])
    assert match, err[-1]
    epoch, kept, where = int(match.group(1)), int(match.group(3)), match.group(4)
    assert kept == epoch - 1 and Path(where) == run
    result = load_run(run)
    assert list(result.metrics["epoch"]) == list(range(epoch))
    assert result.epochs == list(range(epoch)) and RunStore(run).completed_epoch == epoch - 1
    grid, density = result.density("full", 0)
    assert density.sum() > 0 and (run / "images" / "loss.png").exists()
    assert "training diverged" in (run / "logs" / "train.log").read_text()
