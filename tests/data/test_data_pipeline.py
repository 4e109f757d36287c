"""Digits, normalisation, batches, augmentation, the Hessian subset and the datasets table."""

import urllib.request

import numpy as np
import pytest
import torch

from data_fixtures import mnist_arrays, write_mnist
from layerhessians.cli.main import main
from layerhessians.data import (
    augment_batch,
    batches,
    dataset_table,
    hessian_subset,
    load_dataset,
)
from layerhessians.data.digits import DIGITS_SIZE, upsample
from layerhessians.errors import UserError


@pytest.fixture(scope="module")
def digits():
    with pytest.MonkeyPatch.context() as patch:  # prove it is offline
        patch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
        return load_dataset("digits", root="/nonexistent")


def test_digits_sizes_and_split(digits):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    assert len(digits.train_y) + len(digits.test_y) == DIGITS_SIZE == len(labels) == 1797
    assert digits.train_x.shape == (1438, 1, 32, 32) and digits.test_x.shape == (359, 1, 32, 32)
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(digits.test_y.numpy(), minlength=10), np.round(0.2 * counts))
    np.testing.assert_array_equal(np.bincount(digits.train_y.numpy(), minlength=10) +
                                  np.bincount(digits.test_y.numpy(), minlength=10), counts)
    assert digits.num_classes == 10 and digits.in_channels == 1 and not digits.flip
    assert load_dataset("Digits").checksum == digits.checksum


def _bilinear_reference(images8, side=28):
    """Dense float64 bilinear upsampling (half-pixel centres, edge clamped) of ``[N, 8, 8]``/16."""
    src = np.maximum((np.arange(side) + 0.5) * 8 / side - 0.5, 0)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, 7)
    frac = src - low
    weights = np.zeros((side, 8))
    weights[np.arange(side), low] += 1 - frac
    weights[np.arange(side), high] += frac
    return np.einsum("ik,nkl,jl->nij", weights, images8 / 16.0, weights)


def test_digits_upsampling_matches_dense_reference():
    from sklearn.datasets import load_digits

    images8 = load_digits().images[:50]
    np.testing.assert_allclose(upsample(images8)[:, 0], _bilinear_reference(images8), atol=1e-6)


def test_normalisation_zero_mean_unit_std_on_train(digits, tmp_path):
    x = digits.train_x.double()
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-5
    arrays = mnist_arrays(n_train=40, n_test=10)
    write_mnist(tmp_path / "MNIST" / "raw", arrays)
    mnist = load_dataset("MNIST", root=tmp_path)
    padded = np.pad(arrays["train-images-idx3-ubyte"], ((0, 0), (2, 2), (2, 2))) / 255.0
    assert mnist.mean[0] == pytest.approx(padded.mean(), abs=1e-12)
    assert mnist.std[0] == pytest.approx(padded.std(), abs=1e-12)
    torch.testing.assert_close(mnist.train_x.double().mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-5, rtol=0)
    black = mnist.black
    assert torch.allclose(mnist.train_x[:, :, 0, 0], black.expand(40, 1), atol=1e-6)  # padding pixels


def _toy(n=23, c=2, side=6):
    x = torch.arange(n * c * side * side, dtype=torch.float32).reshape(n, c, side, side)
    return x, torch.arange(n)


def test_batches_deterministic_per_seed_and_cover_everything():
    x, y = _toy()
    def run(seed, **kw):
        return [(a.clone(), b.clone()) for a, b in batches(x, y, 5, seed=seed, **kw)]

    first, again, other = run(0), run(0), run(1)
    assert [len(b) for _, b in first] == [5, 5, 5, 5, 3]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    order = torch.cat([b for _, b in first])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert all(torch.equal(xb, x[yb]) for xb, yb in first)
    assert [len(b) for _, b in run(0, drop_last=True)] == [5, 5, 5, 5]
    assert torch.cat([b for _, b in run(3, shuffle=False)]).tolist() == list(range(23))
    augmented = run(0, augment=True, flip=True, fill=-1.0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, augmented))  # same order
    assert all(a[0].shape == b[0].shape for a, b in zip(first, augmented))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented, run(0, augment=True, flip=True, fill=-1.0)))
    with pytest.raises(UserError):
        next(batches(x, y, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_cpu():
    x, y = _toy(n=40)
    fill = torch.tensor([-1.0, -2.0])
    cpu = list(batches(x, y, 16, seed=3, augment=True, flip=True, fill=fill))
    gpu = list(batches(x.cuda(), y.cuda(), 16, seed=3, augment=True, flip=True, fill=fill))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def _matching_crops(image, padded, side):
    """Every (top, left, mirrored) whose crop of ``padded`` equals ``image``."""
    width = padded.shape[-1] - side + 1
    return [(t, c, m) for t in range(width) for c in range(width) for m in (False, True)
            if torch.equal(image, padded[:, t:t + side, c:c + side].flip(-1) if m else padded[:, t:t + side, c:c + side])]


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_is_a_padded_crop(flip):
    n = 160
    x, _ = _toy(n=n)
    fill = torch.tensor([-1.0, -2.0])
    out = augment_batch(x, torch.Generator().manual_seed(5), padding=4, flip=flip, fill=fill)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = fill.view(1, 2, 1, 1).expand(n, 2, 14, 14).clone()
    padded[:, :, 4:10, 4:10] = x
    found = [_matching_crops(out[i], padded[i], 6) for i in range(n)]
    assert all(len(f) == 1 for f in found)  # each output is exactly one crop (values are unique)
    assert {f[0][0] for f in found} == set(range(9)) == {f[0][1] for f in found}  # every offset 0..8
    mirrored = [f[0][2] for f in found]
    assert any(mirrored) == flip and not all(mirrored)


def test_hessian_subset_balanced_deterministic():
    targets = torch.tensor([i % 4 for i in range(40)] + [3] * 5)
    subset = hessian_subset(targets, 3, seed=0)
    assert subset.dtype == torch.int64 and len(subset) == 12
    assert targets[subset].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        chunk = subset[3 * k:3 * k + 3]
        assert torch.equal(chunk, chunk.sort().values) and len(set(chunk.tolist())) == 3
    assert torch.equal(subset, hessian_subset(targets.numpy(), 3, seed=0))
    assert any(not torch.equal(subset, hessian_subset(targets, 3, seed=s)) for s in (1, 2, 3))
    assert torch.equal(hessian_subset(targets, 10, seed=7)[:10], torch.arange(0, 40, 4))  # all of class 0
    with pytest.raises(UserError, match="class 0 has only 10"):
        hessian_subset(targets, 11)
    with pytest.raises(UserError):
        hessian_subset(targets, 0)


def test_datasets_command_prints_table(tmp_path, capsys):
    write_mnist(tmp_path / "MNIST" / "raw", mnist_arrays())
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "folder", "present", "classes", "image_shape", "flip"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == ["Digits", "MNIST5k", "MNIST5k-val", "MNIST", "FashionMNIST", "SVHN",
                          "CIFAR10", "CIFAR100"]
    assert rows["MNIST"][1:] == [str(tmp_path / "MNIST"), "True", "10", "1x32x32", "False"]
    assert rows["CIFAR100"][1:] == [str(tmp_path / "CIFAR100"), "False", "100", "3x32x32", "True"]
    table = dataset_table(tmp_path)
    assert table.set_index("name").loc["SVHN", "present"] == False  # noqa: E712
    assert main(["datasets", "--root", str(tmp_path), "--download", "nope"]) == 2
    assert "choose one of Digits" in capsys.readouterr().err
