"""Readers of the official distribution formats, returning uint8 images ``[N, C, H, W]`` and
int64 labels ``[N]`` as numpy arrays: IDX (MNIST, FashionMNIST; plain or gzip), CIFAR pickled
batches (through a restricted unpickler that only rebuilds numpy arrays) and SVHN ``.mat``.

A malformed file raises :class:`UserError` naming the file and what to do.
"""

import gzip
import importlib
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from layerhessians.errors import UserError

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX file format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class RawSplits(NamedTuple):
    """Decoded arrays: images ``[N, C, H, W]`` (uint8 0-255, or float in [0, 1]), labels int64 ``[N]``."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _corrupt(path, reason) -> UserError:
    reason = " ".join(str(reason).split())  # one line, whatever the cause says
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return UserError(f"{path} is corrupt or truncated ({reason}): delete it and download it again")


def find_idx(folder, stem) -> Path:
    """``folder/stem`` if it exists, else ``folder/stem.gz``; ``None`` when neither does."""
    for candidate in (Path(folder) / stem, Path(folder) / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


#: the largest IDX file read (uncompressed): EMNIST's largest is about 0.55 GB
MAX_IDX_BYTES = 1 << 30


def read_idx(path) -> np.ndarray:
    """Decode one IDX file (plain, or gzip when the name ends in ``.gz``) into a native-endian
    array of the shape its header gives. The header is read first and the size it gives
    bounds what is read (a compressed file is never inflated past it, nor past
    :data:`MAX_IDX_BYTES`).

    Raises:
        UserError: a malformed, truncated or oversized file (naming it).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read(4)
            if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
                raise _corrupt(path, "bad IDX magic number")
            ndim = data[3]
            header = 4 + 4 * ndim
            data += handle.read(header - 4)
            if len(data) < header:
                raise _corrupt(path, "short header")
            shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
            dtype = np.dtype(_IDX_DTYPES[data[2]])
            expected = header + int(np.prod(shape, dtype=object)) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise _corrupt(path, f"its header gives {expected} bytes, more than the "
                                     f"{MAX_IDX_BYTES} this reader accepts")
            data += handle.read(expected - header + 1)  # one byte more: a longer file shows
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise _corrupt(path, err) from None
    if len(data) != expected:
        raise _corrupt(path, f"{len(data)}{'+' * (len(data) > expected)} bytes, header says "
                             f"{expected}")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _read_idx_pair(folder, images_stem, labels_stem):
    paths = [find_idx(folder, stem) for stem in (images_stem, labels_stem)]
    missing = [stem for stem, path in zip((images_stem, labels_stem), paths) if path is None]
    if missing:
        raise UserError(f"{', '.join(missing)} (or .gz) missing in {folder}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise _corrupt(paths[0], f"images {images.shape} {images.dtype} do not match labels {labels.shape}")
    return images[:, None], labels.astype(np.int64)


def read_mnist(folder, train_files, test_files) -> RawSplits:
    """MNIST-style IDX pairs ``(images, labels)`` for train and test from ``folder``;
    images ``uint8 [N, 1, 28, 28]``."""
    return RawSplits(*_read_idx_pair(folder, *train_files), *_read_idx_pair(folder, *test_files))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, and nothing else that runs code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # numpy 2 moved numpy.core to numpy._core; try the new name first (no warning)
        for candidate in (module.replace("numpy.core.", "numpy._core."),
                          module.replace("numpy._core.", "numpy.core.")):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find {module}.{name}")


def read_cifar_batch(path, label_key) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch: images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]``
    (``label_key`` is ``"labels"`` for CIFAR-10, ``"fine_labels"`` for CIFAR-100)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            entry = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - a hostile or damaged pickle fails in many ways
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise _corrupt(path, f"data {data.shape} {data.dtype}, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(folder, train_files, test_files, label_key) -> RawSplits:
    """CIFAR-10/100 from the extracted ``cifar-10-batches-py``/``cifar-100-python`` folder."""
    def read(names):
        parts = [read_cifar_batch(Path(folder) / name, label_key) for name in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return RawSplits(*read(train_files), *read(test_files))


def read_svhn_mat(path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat``: ``X [32, 32, 3, N]`` -> images ``uint8 [N, 3, 32, 32]``;
    ``y [N, 1]`` in 1..10 -> labels ``int64 [N]`` in 0..9 (10 is the digit 0)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, variable_names=("X", "y"))
        images, labels = mat["X"], np.asarray(mat["y"]).reshape(-1)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise _corrupt(path, f"X {images.shape} does not match y {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise _corrupt(path, f"labels outside 0..10 ({labels.min()}..{labels.max()})")
    images = np.ascontiguousarray(np.transpose(images, (3, 2, 0, 1)).astype(np.uint8, copy=False))
    return images, labels.astype(np.int64) % 10


def read_svhn(folder, train_files, test_files) -> RawSplits:
    """SVHN train and test from ``folder`` (one ``.mat`` each)."""
    (train,), (test,) = train_files, test_files
    return RawSplits(*read_svhn_mat(Path(folder) / train), *read_svhn_mat(Path(folder) / test))
