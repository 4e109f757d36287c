"""Downloads from a local HTTP mirror on 127.0.0.1 (via $LAYERHESSIANS_DATASET_MIRROR)."""

import numpy as np
import pytest

from data_fixtures import (
    cifar_arrays,
    closed_port_url,
    files_under,
    md5,
    mnist_arrays,
    serve_directory,
    svhn_arrays,
    with_md5s,
    write_cifar_archive,
    write_mnist,
    write_svhn,
)
from layerhessians.cli.main import main
from layerhessians.data import MIRROR_ENV, REGISTRY, load_dataset
from layerhessians.errors import DatasetMissingError


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """``(served_dir, root)``: files under ``served_dir/<Name>/`` are downloadable into ``root``."""
    served, root = tmp_path / "mirror", tmp_path / "datasets"
    served.mkdir()
    with serve_directory(served) as url:
        monkeypatch.setenv(MIRROR_ENV, url)
        yield served, root


def _serve_mnist(served, monkeypatch, md5_override=None):
    arrays = mnist_arrays(n_train=20, n_test=10)
    write_mnist(served / "MNIST", arrays, gz=True)
    md5s = {r.filename: md5(served / "MNIST" / r.filename) for r in REGISTRY["MNIST"].downloads}
    md5s.update(md5_override or {})
    with_md5s(monkeypatch, "MNIST", md5s)
    return arrays


def test_download_good_files(mirror, monkeypatch):
    served, root = mirror
    arrays = _serve_mnist(served, monkeypatch)
    data = load_dataset("MNIST", root=root, download=True)
    assert files_under(root) == sorted(f"MNIST/raw/{r.filename}" for r in REGISTRY["MNIST"].downloads)
    for r in REGISTRY["MNIST"].downloads:
        assert md5(root / "MNIST" / "raw" / r.filename) == r.md5
    np.testing.assert_array_equal(data.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    assert load_dataset("MNIST", root=root).checksum == data.checksum  # second load: offline


def test_bad_checksum_leaves_nothing(mirror, monkeypatch):
    served, root = mirror
    _serve_mnist(served, monkeypatch, {"t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DatasetMissingError, match="checksum mismatch") as err:
        load_dataset("MNIST", root=root, download=True)
    assert "\n" not in str(err.value) and "t10k-images-idx3-ubyte.gz" in str(err.value)
    assert "MNIST/raw/t10k-images-idx3-ubyte.gz" not in files_under(root)
    assert not [p for p in files_under(root) if p.endswith(".part")]


def test_missing_on_server_is_clear(mirror):
    served, root = mirror
    with pytest.raises(DatasetMissingError, match="HTTP 404") as err:
        load_dataset("SVHN", root=root, download=True)
    assert "train_32x32.mat" in str(err.value) and str((root / "SVHN").resolve()) in str(err.value)
    assert files_under(root) == []


def test_server_down(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, closed_port_url())
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("FashionMNIST", root=tmp_path, download=True)
    message = str(err.value)
    assert "\n" not in message and "could not download train-images-idx3-ubyte.gz" in message
    assert str((tmp_path / "FashionMNIST" / "raw").resolve()) in message
    assert list(tmp_path.iterdir()) == []  # not even the folders it made


def test_download_cifar_archive_and_svhn(mirror, monkeypatch):
    served, root = mirror
    (served / "CIFAR100").mkdir()
    archive = write_cifar_archive(served / "CIFAR100" / "cifar-100-python.tar.gz", "CIFAR100",
                                  cifar_arrays("CIFAR100", per_batch=4))
    with_md5s(monkeypatch, "CIFAR100", {archive.name: md5(archive)})
    write_svhn(served / "SVHN", svhn_arrays(n_train=6, n_test=4))
    with_md5s(monkeypatch, "SVHN", {n: md5(served / "SVHN" / n) for n in ("train_32x32.mat", "test_32x32.mat")})
    assert load_dataset("CIFAR100", root=root, download=True).train_x.shape == (12, 3, 32, 32)
    assert files_under(root / "CIFAR100") == ["cifar-100-python.tar.gz", "cifar-100-python/test",
                                              "cifar-100-python/train"]
    assert load_dataset("SVHN", root=root, download=True).test_x.shape == (4, 3, 32, 32)
    assert files_under(root / "SVHN") == ["test_32x32.mat", "train_32x32.mat"]


def test_cli_download_then_table(mirror, monkeypatch, capsys):
    served, root = mirror
    _serve_mnist(served, monkeypatch)
    assert main(["datasets", "--root", str(root), "--download", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "MNIST: ready in" in out
    row = next(line for line in out.splitlines() if line.split()[0] == "MNIST")
    assert "True" in row and str(root / "MNIST") in row
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    assert main(["datasets", "--root", str(root), "--download", "MNIST"]) == 2
    assert "fails its MD5 check" in capsys.readouterr().err
