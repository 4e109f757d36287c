"""Integrations: optional packages imported only when used, TensorBoard event files, the
Lightning callback's run (and that it leaves training unchanged), and the two transformer
examples end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from layerhessians.store.run import load_run
from layerhessians.tracking import SpectraTracker, spectra_scalars
from problems import PROBLEMS, mlp_data

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPTIONAL = ("lightning", "pytorch_lightning", "tensorboard", "torch.utils.tensorboard")


def test_optional_packages_are_imported_only_when_used():
    code = ("import sys, layerhessians, layerhessians.integrations, layerhessians.tracking\n"
            "layerhessians.SpectraTracker\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- tensorboard
def test_tensorboard_logger_writes_scalars_and_density_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from layerhessians.integrations.tensorboard import TensorBoardLogger

    model, data = PROBLEMS["mlp"].build()
    logger = TensorBoardLogger(tmp_path / "tb", points=64)
    tracker = SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, iterations=6,
                             loggers=[logger])
    spectra = {epoch: tracker.update(epoch) for epoch in (1, 2)}
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == set(spectra_scalars(spectra[1]))
    assert set(tags["images"]) == {f"spectral_density/{b}" for b in spectra[1]}
    top = events.Scalars("top_eigenvalue/2.weight")
    assert [e.step for e in top] == [1, 2]
    np.testing.assert_allclose([e.value for e in top],
                               [spectra_scalars(spectra[e])["top_eigenvalue/2.weight"]
                                for e in (1, 2)], rtol=1e-6)  # stored as float32
    assert [e.step for e in events.Images("spectral_density/full")] == [1, 2]


# ----------------------------------------------------------------------------- lightning
def _fit(tmp_path, callback, epochs=2, shuffle=True, resume_from=None, checkpoints=False):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            loss = PROBLEMS["mlp"].loss_fn(self(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.seed_everything(0, verbose=False)
    module = Module()
    x, y = (torch.cat(t) for t in zip(*mlp_data(seed=3, sizes=(24,))))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.float(), y),
                                         batch_size=6, shuffle=shuffle)
    callbacks = [] if callback is None else [callback]
    if checkpoints:
        callbacks.append(pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", save_last=True))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=checkpoints, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=tmp_path)
    trainer.fit(module, loader, ckpt_path=resume_from)
    return module


def test_lightning_callback_writes_a_loadable_run_and_leaves_training_alone(tmp_path):
    pytest.importorskip("lightning")
    from layerhessians.integrations.lightning import SpectraCallback

    x, y = (torch.cat(t) for t in zip(*mlp_data(seed=4, sizes=(10,))))
    calls = []
    callback = SpectraCallback(PROBLEMS["mlp"].loss_fn, (x.float(), y), tmp_path / "run",
                               blocks=lambda module: {"last": module.net[2].weight},
                               loggers=[lambda *args: calls.append(args[0])], at_start=True,
                               iterations=6)
    tracked = _fit(tmp_path, callback)
    untracked = _fit(tmp_path, None)
    for (name, p), q in zip(tracked.named_parameters(), untracked.parameters()):
        assert torch.equal(p, q), name  # measuring never changes training
    assert tracked.training and callback.tracker is None  # closed at teardown
    run = load_run(tmp_path / "run")
    assert run.epochs == [0, 1, 2] and calls == [0, 1, 2]
    assert run.blocks == ["full", "last"]
    assert run.record.tracker["block_params"] == {"last": ["net.2.weight"]}
    np.testing.assert_allclose(run.measure("last", 2).nodes, callback.last["last"].nodes,
                               rtol=1e-15)
    assert run.metrics["train_loss"].notna().tolist() == [False, True, True]


def test_lightning_fit_resumed_from_a_checkpoint_resumes_the_record(tmp_path):
    pytest.importorskip("lightning")
    from layerhessians.integrations.lightning import SpectraCallback

    data = mlp_data(seed=4, sizes=(10,))[0]

    def callback(run, resume=False):
        return SpectraCallback(PROBLEMS["mlp"].loss_fn, (data[0].float(), data[1]), run,
                               at_start=True, iterations=6, resume=resume)

    _fit(tmp_path / "whole", callback(tmp_path / "whole" / "run"), epochs=3, shuffle=False)
    _fit(tmp_path / "cut", callback(tmp_path / "cut" / "run"), epochs=2, shuffle=False,
         checkpoints=True)
    _fit(tmp_path / "cut", callback(tmp_path / "cut" / "run", resume=True), epochs=3,
         shuffle=False, checkpoints=True, resume_from=tmp_path / "cut" / "ckpt" / "last.ckpt")
    whole, cut = load_run(tmp_path / "whole" / "run"), load_run(tmp_path / "cut" / "run")
    assert cut.epochs == [0, 1, 2, 3]
    assert not cut.spectra.duplicated(["epoch", "block", "vector", "node"]).any()
    pd.testing.assert_frame_equal(cut.spectra, whole.spectra)  # as if never interrupted


def test_lightning_callback_refuses_a_bad_period():
    pytest.importorskip("lightning")
    from layerhessians.errors import UserError
    from layerhessians.integrations.lightning import SpectraCallback

    with pytest.raises(UserError, match="every_n_epochs must be a positive integer"):
        SpectraCallback(PROBLEMS["mlp"].loss_fn, mlp_data(), every_n_epochs=0)


# ----------------------------------------------------------------------------- examples
@pytest.mark.parametrize("script, needs", [("transformer_lm.py", None),
                                           ("transformer_lm_lightning.py", "lightning")])
def test_transformer_examples_run(tmp_path, script, needs):
    if needs:
        pytest.importorskip(needs)
        pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--run",
                           str(run_dir)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]
    run = load_run(run_dir)
    assert run.epochs == [0, 1, 2]
    assert run.blocks == ["full", "embedding", "layers.0.attention", "layers.0.mlp",
                          "layers.1.attention", "layers.1.mlp", "head"]
    assert (run_dir / "images" / "spectrum_layers.0.attention.png").is_file()
