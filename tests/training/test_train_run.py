"""The main job end to end (Digits, LeNet), its stages against exact references, the seed's
command line through experiments/training_eigenspectrum.py, and the legacy export."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from data_fixtures import mnist_arrays, write_mnist
from layerhessians import load_run
from layerhessians.cli.main import main
from layerhessians.data import TensorData, hessian_subset, load_dataset
from layerhessians.models import build_model, layer_blocks
from layerhessians.training.config import HessianConfig, TrainConfig
from layerhessians.training.loop import evaluate, train_epoch
from layerhessians.training.seeding import derive_seed
from layerhessians.training.setup import Setup, build
from layerhessians.training.spectra_hook import compute_spectra

REPO = Path(__file__).resolve().parents[2]
LENET_BLOCKS = ["full", "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]



# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    rc = main(["train", "-r", str(run), "-d", "digits", "-m", "lenet", "-o", "sgd", "-n", "2",
               "-lr", "0.05", "-b", "256", "--hessian-iterations", "8",
               "--examples_per_class", "1", "--init-spectra", "--save_freq", "2",
               "--export-legacy", "--no-progress"])
    assert rc == 0
    return run


def test_run_directory_contract(digits_run):
    run = load_run(digits_run)
    # config.json is a run record (store/record.py): facts, spectra, blocks, training
    assert set(run.config) >= {"record", "facts", "spectra", "blocks", "training", "tracker"}
    record = run.record
    facts, config = record.facts, record.training_settings()
    assert (config["model"], config["dataset"], config["optimizer"]) == ("LeNet", "Digits", "sgd")
    assert record.block_names == LENET_BLOCKS == run.blocks
    assert facts["num_params"] == record.block_dims["full"] == 61706
    assert record.block_dims["fc1.weight"] == 400 * 120
    assert config["hessian"] == {"iterations": 8, "vectors": 1, "kind": "hessian",
                                 "bn_mode": "eval", "every": 1, "layers": True, "init": True,
                                 "distribution": "gaussian", "reorthogonalize": True,
                                 "subset_seed": 0, "layer_method": "auto",
                                 "validate_layers": False}
    assert facts["hessian_examples"] == 10 and facts["device"] == "cpu"
    assert set(facts["versions"]) >= {"layerhessians", "torch", "python"}
    assert len(facts["dataset_checksum"]) == 64 and facts["start_time"]
    assert facts["command"].startswith("layerhessians train --run ")
    for flag in ("learning_rate", "weight_decay", "num_epochs", "batch_size", "milestones",
                 "step_gamma", "augment", "seed", "examples_per_class", "save_freq"):
        assert flag in config

    metrics = run.metrics
    assert list(metrics["epoch"]) == [0, 1, 2]
    for column in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                   "spectra_seconds"):
        assert np.isfinite(metrics[column]).all(), column
    assert metrics["train_acc"].between(0, 1).all() and (metrics["lr"] == 0.05).all()
    assert metrics.loc[metrics["epoch"] == 0, "train_seconds"].item() == 0

    assert run.epochs == [0, 1, 2]
    sums = run.spectra.groupby(["epoch", "block", "vector"])["weight"].sum()
    assert len(sums) == 3 * 6 and np.allclose(sums, 1.0)
    slq_rows = run.spectra[run.spectra["method"] == "slq"]
    assert set(slq_rows["block"]) == {"full"}  # --layer-spectra auto: LeNet's blocks exact
    assert slq_rows.groupby(["epoch", "block"]).size().max() == 8
    # exact blocks: the 10 x 10 Gram matrix's eigenvalues and the zero eigenvalue
    exact_rows = run.spectra[run.spectra["method"] == "exact"]
    assert exact_rows.groupby(["epoch", "block"]).size().max() <= 10 * 10 + 1
    top = run.spectra.query("block == 'full'").groupby("epoch")["node"].max()
    assert np.allclose(top.to_numpy(), metrics["top_eigenvalue"].to_numpy())
    grid, density = run.density("fc2.weight", 1, points=256)
    assert grid.shape == density.shape == (256,) and np.all(density >= 0)

    ckpt = digits_run / "checkpoints"
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "rng"}
    assert sorted(p.name for p in ckpt.glob("epoch_*.pt")) == ["epoch_0000.pt", "epoch_0002.pt"]
    assert all(torch.equal(state["model"][k], v) for k, v in
               torch.load(ckpt / "epoch_0002.pt", weights_only=True).items())
    log = (digits_run / "logs" / "train.log").read_text()
    assert "epoch 2/2" in log and "top eigenvalue" in log
    assert sorted(p.name for p in (digits_run / "images").iterdir()) == ["acc.png", "loss.png"]


def test_recorded_test_metrics_match_the_saved_weights(digits_run):
    """Recompute epoch 2's test loss/accuracy from checkpoints/last.pt in float64."""
    data = load_dataset("Digits")
    model = build_model("LeNet").double().eval()
    state = torch.load(digits_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    model.load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        logits = model(data.test_x.double())
    loss = F.cross_entropy(logits, data.test_y).item()
    acc = (logits.argmax(1) == data.test_y).double().mean().item()
    row = load_run(digits_run).metrics.set_index("epoch").loc[2]
    assert row["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["test_acc"] == pytest.approx(acc, abs=1.5 / len(data.test_y))


def test_legacy_export_layout(digits_run):
    run = load_run(digits_run)
    legacy = digits_run / "ckpt"
    full = np.load(legacy / "training_eigenspectrum_full.npy")
    assert full.shape == (4, 1024)  # (grid, density) for epochs 1 and 2; epoch 0 has no slot
    for index, epoch in enumerate((1, 2)):
        grid, density = run.density("full", epoch, points=1024)
        np.testing.assert_array_equal(full[2 * index], grid)
        np.testing.assert_array_equal(full[2 * index + 1], density)
        for layer in LENET_BLOCKS[1:]:
            with np.load(legacy / f"training_eigenspectrums_epoch_{index}_layer_{layer}.npz") as f:
                assert sorted(f.files) == ["eigval", "eigval_density"]
                np.testing.assert_array_equal(f["eigval_density"], run.density(layer, epoch)[1])
    assert len(list(legacy.glob("*.npz"))) == 2 * 5


# ----------------------------------------------------------------------------- stages
def tiny_data(n_train=40, n_test=16, seed=0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(name="tiny", train_x=torch.randn(n_train, 1, 32, 32, generator=g),
                      train_y=torch.arange(n_train) % 10,
                      test_x=torch.randn(n_test, 1, 32, 32, generator=g),
                      test_y=torch.arange(n_test) % 10, num_classes=10, in_channels=1,
                      mean=(0.0,), std=(1.0,), checksum="0" * 64)


def test_train_epoch_matches_a_manual_sgd_replay():
    config = TrainConfig(learning_rate=0.1, weight_decay=1e-3, batch_size=16, seed=3,
                         examples_per_class=2).validated()
    data = tiny_data()
    setup = build(config, data, torch.device("cpu"))
    reference = build_model("LeNet")
    reference.load_state_dict(setup.model.state_dict())
    row = train_epoch(setup, 1, disable_progress=False)  # bars on (to stderr)

    # the replay: plain SGD with momentum 0.9 written out, same seeded batches
    buffers = [torch.zeros_like(p) for p in reference.parameters()]
    losses, correct = [], 0
    for x, y in data.train_batches(16, seed=derive_seed(3, 1, "batches")):
        out = reference(x)
        loss = F.cross_entropy(out, y)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g, b in zip(reference.parameters(), grads, buffers):
                b.mul_(0.9).add_(g + 1e-3 * p)
                p.sub_(0.1 * b)
        losses.append((loss.item(), len(y)))
        correct += int((out.argmax(1) == y).sum())
    assert row["train_loss"] == pytest.approx(sum(value * n for value, n in losses) / 40, rel=1e-12)
    assert row["train_acc"] == correct / 40
    for (name, p), q in zip(setup.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the Hessian batch is the class-balanced subset of the training set
    index = hessian_subset(data.train_y, 2, seed=0)
    assert torch.equal(setup.hessian_batch[0], data.train_x[index])
    assert torch.equal(setup.hessian_batch[1].bincount(), torch.full((10,), 2))


def test_evaluate_is_the_mean_over_all_examples():
    data = tiny_data(n_test=23)
    model = build_model("LeNet")
    loss, acc = evaluate(model, data.test_x, data.test_y, batch_size=5)
    with torch.no_grad():
        logits = model.double()(data.test_x.double())
    assert loss == pytest.approx(F.cross_entropy(logits, data.test_y).item(), rel=1e-6)
    assert acc == (logits.argmax(1) == data.test_y).double().mean().item()


def _dense_hessian(model, x, y, train_bn: bool) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train(train_bn)

    def loss_of(flat):
        tensors, start = {}, 0
        for name, shape in zip(names, shapes):
            tensors[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        out = torch.func.functional_call(model, {**tensors, **buffers}, (x,))
        return F.cross_entropy(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss_of, flat)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_spectra_are_eigenvalues_of_the_dense_hessian(bn_mode):
    """A full Krylov run on a tiny float64 model with batch norm: every Ritz value of the
    full and of each layer block is an eigenvalue of the dense Hessian (block), the extreme
    ones are found, and the running statistics and the train mode are left unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    with torch.no_grad():
        model(torch.randn(32, 1, 4, 4, dtype=torch.float64) * 2 + 1)  # non-trivial stats
    x, y = torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.arange(12) % 3
    dim = sum(p.numel() for p in model.parameters())
    config = TrainConfig(hessian=HessianConfig(iterations=dim, bn_mode=bn_mode)).validated()
    blocks = layer_blocks(model)
    setup = Setup(config=config, device=torch.device("cpu"), data=None, model=model,
                  optimizer=None, scheduler=None, loss_fn=nn.CrossEntropyLoss(),
                  hessian_batch=(x, y), blocks=blocks)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    spectra = compute_spectra(setup, epoch=1, disable_progress=False)
    assert model.training and all(torch.equal(stats[n], b) for n, b in model.named_buffers())
    assert list(spectra) == ["full", "0.weight", "4.weight"]

    dense = _dense_hessian(model, x, y, train_bn=bn_mode == "train")
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    for block, measure in spectra.items():
        part = dense if block == "full" else dense[offsets[block], offsets[block]]
        exact = torch.linalg.eigvalsh(part).numpy()
        scale = np.abs(exact).max()
        nodes = measure.nodes[measure.weights > 1e-10]
        gaps = np.abs(nodes[:, None] - exact[None, :]).min(axis=1)
        assert gaps.max() < 1e-7 * scale, block
        assert nodes.max() == pytest.approx(exact.max(), abs=1e-7 * scale)
        assert nodes.min() == pytest.approx(exact.min(), abs=1e-7 * scale)


# ----------------------------------------------------------------------------- the seed's CLI
def _tiny_mnist(root, n_train=60, n_test=20):
    write_mnist(Path(root) / "MNIST" / "raw", mnist_arrays(n_train, n_test, seed=1))


def test_seed_command_line_through_the_experiments_script(tmp_path, monkeypatch, capsys):
    """The README's first command (with -n 1 and a small Lanczos budget), run as a script
    (in this process, to spare the start-up of another interpreter)."""
    _tiny_mnist(tmp_path / "datasets")
    seed_line = ["-lr", "1e-2", "-l2", "0", "-n", "1", "-o", "sgd", "-d", "MNIST", "-b", "256",
                 "-m", "LeNet", "-r", "model=LeNet,dataset=MNIST,te,run1"]
    small = ["--dataset_root", str(tmp_path / "datasets"), "--hessian-iterations", "4",
             "--examples_per_class", "1", "--no-progress"]
    script = REPO / "experiments" / "training_eigenspectrum.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), *seed_line, *small])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0, capsys.readouterr().err
    run = load_run(tmp_path / "model=LeNet,dataset=MNIST,te,run1")
    assert list(run.metrics["epoch"]) == [1] and run.epochs == [1]
    assert run.record.training["learning_rate"] == 0.01 and run.record.dataset == "MNIST"
    assert run.record.facts["train_examples"] == 60 and run.blocks == LENET_BLOCKS
    assert "epoch 1/1" in capsys.readouterr().err  # log lines go to stderr


def test_seed_command_line_with_missing_gpu_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import training_eigenspectrum as script

    rc = script.main(["-lr", "1e-2", "-l2", "0", "-n", "50", "-o", "sgd", "-d", "MNIST", "-b",
                      "256", "-m", "LeNet", "--cuda", "2", "-r", str(tmp_path / "run1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no CUDA device 2" in err[0]
    assert "use --device cpu" in err[0] and not (tmp_path / "run1").exists()
