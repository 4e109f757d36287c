"""Readers of the official formats, on tiny files generated in each format."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from data_fixtures import (
    cifar_arrays,
    files_under,
    md5,
    mnist_arrays,
    svhn_arrays,
    with_md5s,
    write_cifar_archive,
    write_idx,
    write_mnist,
    write_svhn,
)
from layerhessians.data import DATASETS, get_spec, load_dataset, read_dataset
from layerhessians.data.readers import read_cifar_batch, read_idx
from layerhessians.errors import DatasetMissingError, UserError


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / "a", array)
    write_idx(tmp_path / "a.gz", array)
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (3, 5, 4)
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("damage", ["truncate", "magic", "gzip"])
def test_read_idx_rejects_corrupt_files(tmp_path, damage):
    write_idx(tmp_path / "x", np.zeros((2, 3, 3), np.uint8))
    data = bytearray((tmp_path / "x").read_bytes())
    if damage == "truncate":
        (tmp_path / "x").write_bytes(bytes(data[:-1]))
        path = tmp_path / "x"
    elif damage == "magic":
        data[2] = 0x42
        (tmp_path / "x").write_bytes(bytes(data))
        path = tmp_path / "x"
    else:
        path = tmp_path / "x.gz"
        path.write_bytes(gzip.compress(bytes(data))[:-6])
    with pytest.raises(UserError, match="corrupt"):
        read_idx(path)


def _pixels(data, split):
    """Undo the normalisation: uint8 pixel values of the 32x32 tensors."""
    x = getattr(data, f"{split}_x").double()
    mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
    return (x * std + mean) * 255


def test_mnist_plain_and_gz_same_data_and_checksum(tmp_path):
    arrays = mnist_arrays(n_train=30, n_test=20)
    write_mnist(tmp_path / "a" / "MNIST" / "raw", arrays, gz=False)
    write_mnist(tmp_path / "b" / "MNIST" / "raw", arrays, gz={"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"})
    plain, mixed = load_dataset("mnist", root=tmp_path / "a"), load_dataset("MNIST", root=tmp_path / "b")
    assert plain.checksum == mixed.checksum and len(plain.checksum) == 64
    assert plain.name == "MNIST" and plain.num_classes == 10 and plain.in_channels == 1 and not plain.flip
    assert plain.train_x.shape == (30, 1, 32, 32) and plain.test_x.shape == (20, 1, 32, 32)
    assert plain.train_x.dtype == torch.float32 and plain.train_y.dtype == torch.int64
    torch.testing.assert_close(plain.train_x, mixed.train_x, rtol=0, atol=0)
    for split, stem in (("train", "train"), ("test", "t10k")):
        pixels = _pixels(plain, split)
        np.testing.assert_allclose(pixels[:, 0, 2:30, 2:30].numpy(), arrays[f"{stem}-images-idx3-ubyte"], atol=1e-3)
        border = pixels.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.abs().max() < 1e-3  # padding is black
        np.testing.assert_array_equal(getattr(plain, f"{split}_y").numpy(), arrays[f"{stem}-labels-idx1-ubyte"])


def test_checksum_changes_with_one_pixel(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path / "a" / "MNIST" / "raw", arrays)
    arrays["t10k-images-idx3-ubyte"][3, 4, 5] ^= 1
    write_mnist(tmp_path / "b" / "MNIST" / "raw", arrays)
    assert read_dataset("MNIST", tmp_path / "a")[1] != read_dataset("MNIST", tmp_path / "b")[1]


@pytest.mark.parametrize("kind", ["CIFAR10", "CIFAR100"])
def test_cifar_archive_verified_extracted_and_read(tmp_path, monkeypatch, kind):
    arrays = cifar_arrays(kind, per_batch=6)
    folder = tmp_path / kind
    folder.mkdir()
    archive = write_cifar_archive(folder / get_spec(kind).downloads[0].filename, kind, arrays)
    with_md5s(monkeypatch, kind, {archive.name: md5(archive)})
    data = load_dataset(kind.lower(), root=tmp_path)  # no download: the archive is there
    spec = get_spec(kind)
    assert (folder / spec.data_dir).is_dir() and data.flip
    assert data.num_classes == (10 if kind == "CIFAR10" else 100) and data.in_channels == 3
    train = [arrays[m] for m in spec.train_files]
    expect_x = np.concatenate([d for d, _, _ in train]).reshape(-1, 3, 32, 32)
    expect_y = np.concatenate([lab for _, lab, _ in train])  # fine labels, not coarse
    assert data.train_x.shape == expect_x.shape and data.test_x.shape == (len(arrays[spec.test_files[0]][0]), 3, 32, 32)
    np.testing.assert_allclose(_pixels(data, "train").numpy(), expect_x, atol=1e-3)
    np.testing.assert_array_equal(data.train_y.numpy(), expect_y)
    np.testing.assert_array_equal(data.test_y.numpy(), arrays[spec.test_files[0]][1])
    assert not [p for p in files_under(folder) if "/." in "/" + p]  # no temporary left


def test_cifar_corrupt_archive_is_refused(tmp_path):
    folder = tmp_path / "CIFAR10"
    folder.mkdir()
    write_cifar_archive(folder / "cifar-10-python.tar.gz", "CIFAR10", cifar_arrays(per_batch=2))
    with pytest.raises(DatasetMissingError, match="MD5 mismatch"):  # the registry's md5 is the real one
        load_dataset("CIFAR10", root=tmp_path)
    assert not (folder / "cifar-10-batches-py").exists()


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(UserError, match="refusing to load global"):
        read_cifar_batch(path, "labels")
    modern = tmp_path / "modern"  # numpy arrays pickled with the newest protocol still load
    modern.write_bytes(pickle.dumps({"data": np.ones((2, 3072), np.uint8), "labels": [1, 2]}, protocol=5))
    x, y = read_cifar_batch(modern, "labels")
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]


def test_svhn_mat_transposed_and_label_10_is_0(tmp_path):
    arrays = svhn_arrays(n_train=15, n_test=10)
    write_svhn(tmp_path / "SVHN", arrays)
    data = load_dataset("svhn", root=tmp_path)
    assert data.num_classes == 10 and data.in_channels == 3 and not data.flip
    for split, name in (("train", "train_32x32.mat"), ("test", "test_32x32.mat")):
        x, y = arrays[name]
        pixels = _pixels(data, split).numpy()
        assert pixels.shape == (x.shape[3], 3, 32, 32)
        n, c, h, w = 4, 2, 7, 19  # element [n, c, h, w] is X[h, w, c, n]
        assert abs(pixels[n, c, h, w] - x[h, w, c, n]) < 1e-3
        np.testing.assert_allclose(pixels, x.transpose(3, 2, 0, 1), atol=1e-3)
        labels = getattr(data, f"{split}_y").numpy()
        np.testing.assert_array_equal(labels, y.ravel() % 10)
        assert labels.min() == 0 and labels.max() == 9


def test_names_are_case_insensitive_and_unknown_lists_choices():
    assert get_spec("fashionmnist").name == "FashionMNIST" and get_spec(" Cifar100 ").name == "CIFAR100"
    with pytest.raises(UserError) as err:
        get_spec("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    assert DATASETS == ("Digits", "MNIST5k", "MNIST5k-val", "MNIST", "FashionMNIST", "SVHN",
                        "CIFAR10", "CIFAR100")


@pytest.mark.parametrize("name", ["MNIST", "SVHN", "CIFAR100"])
def test_missing_without_download_says_which_files_where(tmp_path, name):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset(name, root=tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path.resolve()) in message
    assert all(r.filename in message for r in get_spec(name).downloads)
    assert not any(tmp_path.iterdir())  # nothing created
