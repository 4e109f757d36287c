"""Helpers for the data tests: tiny files in each official format, written independently of
the package's readers, and a local HTTP server on 127.0.0.1 that plays the download mirror."""

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import scipy.io


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path, array):
    data = idx_bytes(array)
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def mnist_arrays(n_train=30, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.permutation(np.arange(n_test) % 10).astype(np.uint8),
    }


def write_mnist(folder, arrays, gz=True):
    """The four IDX files into ``folder`` (``.gz`` if ``gz``: bool or a set of stems)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        compressed = gz if isinstance(gz, bool) else stem in gz
        write_idx(folder / (stem + (".gz" if compressed else "")), array)


def cifar_arrays(kind="CIFAR10", per_batch=12, seed=0):
    """``{member: (data uint8 [n, 3072], labels, coarse)}`` in CIFAR batch layout."""
    rng = np.random.default_rng(seed)
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == "CIFAR10" else ["train", "test"]
    classes = 10 if kind == "CIFAR10" else 100
    out = {}
    for member in members:
        n = per_batch * (3 if kind == "CIFAR100" and member == "train" else 1)
        labels = rng.integers(0, classes, n).tolist()
        out[member] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels, [c // 5 for c in labels])
    return out


def write_cifar_archive(path, kind, arrays, protocol=2):
    """The official ``.tar.gz``: folder ``cifar-10-batches-py``/``cifar-100-python`` of pickles."""
    top = "cifar-10-batches-py" if kind == "CIFAR10" else "cifar-100-python"
    with tarfile.open(path, "w:gz") as tar:
        for member, (data, labels, coarse) in arrays.items():
            entry = {"batch_label": member, "data": data, "filenames": [f"{i}.png" for i in range(len(data))]}
            if kind == "CIFAR10":
                entry["labels"] = labels
            else:
                entry["fine_labels"], entry["coarse_labels"] = labels, coarse
            blob = pickle.dumps(entry, protocol=protocol)
            info = tarfile.TarInfo(f"{top}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def svhn_arrays(n_train=15, n_test=10, seed=0):
    """``{file: (X uint8 [32, 32, 3, n], y uint8 [n, 1] in 1..10)}``, as in the .mat files."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
        out[name] = (rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), y)
    return out


def write_svhn(folder, arrays):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in arrays.items():
        scipy.io.savemat(folder / name, {"X": x, "y": y})


def with_md5s(monkeypatch, name, md5s):
    """Patch the registry entry ``name`` so that its downloads expect ``md5s[filename]``."""
    from layerhessians.data import REGISTRY

    spec = REGISTRY[name]
    downloads = tuple(dataclasses.replace(r, md5=md5s.get(r.filename, r.md5)) for r in spec.downloads)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, downloads=downloads))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_directory(directory):
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def files_under(folder) -> list[str]:
    """Every file below ``folder`` (relative paths, sorted), hidden ones included."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
