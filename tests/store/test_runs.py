"""The run store: atomic writes, locking, settings checks, commit order and read-back."""

import json
import multiprocessing as mp

import numpy as np
import pandas as pd
import pytest
import torch

from layerhessians.errors import UserError
from layerhessians.store.manifest import atomic_path
from layerhessians.store.run import load_run
from layerhessians.store.writer import RunStore


class FakeMeasure:
    def __init__(self, nodes, weights):
        self.nodes, self.weights = np.asarray(nodes, float), np.asarray(weights, float)

    def to_frame(self):
        return pd.DataFrame({"vector": 0, "node": self.nodes, "weight": self.weights})


CONFIG = {"model": "LeNet", "dataset": "Digits", "learning_rate": 0.01, "num_epochs": 2,
          "blocks": ["full", "conv1.weight"], "start_time": "t0"}


def commit(store, epoch):
    spectra = {"full": FakeMeasure([-1.0, epoch], [0.5, 0.5]),
               "conv1.weight": FakeMeasure([epoch + 0.5], [1.0])}
    store.commit_epoch(epoch, {"lr": 0.01, "train_loss": 1.0 / (epoch + 1)}, spectra,
                       {"model": {"w": torch.full((2,), float(epoch))}})


def test_commit_and_load_roundtrip(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG) as store:
        for epoch in (0, 1, 2):
            commit(store, epoch)
        assert store.completed_epoch == 2
    run = load_run(tmp_path / "r")
    assert run.record.model == "LeNet"
    assert list(run.metrics["epoch"]) == [0, 1, 2]
    assert run.epochs == [0, 1, 2]
    assert run.blocks == ["full", "conv1.weight"]
    assert list(run.spectra.columns) == ["epoch", "block", "vector", "node", "weight", "method"]
    assert set(run.spectra["method"]) == {"slq"}  # measures without a method are SLQ's
    rows = run.spectra.query("epoch == 2 and block == 'full'")
    np.testing.assert_allclose(rows["node"], [-1.0, 2.0])
    ckpt = RunStore(tmp_path / "r").load_checkpoint()
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["model"]["w"], torch.full((2,), 2.0))


def test_recommit_replaces_epoch(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG) as store:
        commit(store, 1)
        commit(store, 1)
    run = load_run(tmp_path / "r")
    assert list(run.metrics["epoch"]) == [1]
    assert len(run.spectra) == 3


def test_refuses_other_settings_and_unflagged_restart(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG) as store:
        commit(store, 1)
    with pytest.raises(UserError, match="different settings.*learning_rate"):
        RunStore.create(tmp_path / "r", {**CONFIG, "learning_rate": 0.1}, resume=True)
    with pytest.raises(UserError, match="--resume"):
        RunStore.create(tmp_path / "r", CONFIG)
    # volatile settings (more epochs) may change on resume; start time is kept
    with RunStore.create(tmp_path / "r", {**CONFIG, "num_epochs": 5, "start_time": "t1"},
                         resume=True) as store:
        assert store.completed_epoch == 1
        assert store.record.training["num_epochs"] == 5
        assert store.record.facts["start_time"] == "t0"
        assert store.record.facts["resumed_at"] == ["t1"]


def test_overwrite_clears_owned_files_only(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG) as store:
        commit(store, 1)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with RunStore.create(tmp_path / "r", {**CONFIG, "learning_rate": 0.1}, overwrite=True) as s:
        assert s.completed_epoch is None and s.metrics.empty
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["training"]["learning_rate"] == 0.1


def test_resume_drops_rows_after_last_checkpoint(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG) as store:
        commit(store, 1)
        # a crash after writing epoch 2's spectra and metrics but before its checkpoint
        store.commit_epoch(2, {"lr": 0.01}, {"full": FakeMeasure([3.0], [1.0])}, None)
    # readers show committed epochs only (issue 22 item 5): the checkpoint holds epoch 1
    assert load_run(tmp_path / "r").metrics["epoch"].max() == 1
    assert load_run(tmp_path / "r").spectra["epoch"].max() == 1
    with RunStore.create(tmp_path / "r", CONFIG, resume=True) as store:
        assert store.completed_epoch == 1
    run = load_run(tmp_path / "r")
    assert run.metrics["epoch"].max() == 1 and run.spectra["epoch"].max() == 1


def _try_lock(path, queue):
    try:
        RunStore.create(path, CONFIG, resume=True)
        queue.put("opened")
    except UserError as err:
        queue.put(str(err))


def test_second_writer_is_refused(tmp_path):
    with RunStore.create(tmp_path / "r", CONFIG):
        queue = mp.get_context("fork").Queue()
        proc = mp.get_context("fork").Process(target=_try_lock, args=(tmp_path / "r", queue))
        proc.start()
        proc.join(30)
        assert "another process" in queue.get(timeout=5)
    with RunStore.create(tmp_path / "r", CONFIG, resume=True):
        pass  # released on close


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_load_run_rejects_non_run(tmp_path):
    with pytest.raises(UserError, match="not a LayerHessians run directory"):
        load_run(tmp_path)
