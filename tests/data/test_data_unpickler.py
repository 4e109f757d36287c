"""Every failure of the CIFAR readers' restricted unpickler is one line naming the file
(issue 21, item 19): damaged, truncated, hostile or foreign pickles alike."""

import os
import pickle

import numpy as np
import pytest

from layerhessians.data.readers import read_cifar_batch
from layerhessians.errors import UserError


def _batch(n=3):
    rng = np.random.default_rng(0)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist()}


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _cases():
    good = pickle.dumps(_batch(), protocol=2)
    yield "cut", good[: len(good) // 2]
    yield "cut_late", good[:-3]
    yield "empty", b""
    yield "garbage", bytes(range(256)) * 4
    yield "random", np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    yield "list", pickle.dumps([1, 2, 3])
    yield "array", pickle.dumps(np.zeros(4))
    yield "string", pickle.dumps("data")
    yield "code", pickle.dumps({"data": _Code(), "labels": [1]})
    yield "global", pickle.dumps({"data": np.zeros(3), "labels": [1], "f": np.save})
    yield "no_labels", pickle.dumps({"data": _batch()["data"]})
    yield "text_labels", pickle.dumps({"data": _batch()["data"], "labels": ["a", "b", "c"]})
    yield "wrong_shape", pickle.dumps({"data": np.zeros((3, 5), np.uint8), "labels": [1, 2, 3]})
    yield "deep", b"(" * 100000 + b"."
    flipped = bytearray(good)
    for i in range(10, len(flipped), 97):
        flipped[i] ^= 0x5A
    yield "flipped", bytes(flipped)


@pytest.mark.parametrize("name, content", list(_cases()), ids=[c[0] for c in _cases()])
def test_every_unpickler_failure_is_one_line_naming_the_file(tmp_path, name, content):
    path = tmp_path / f"data_batch_{name}"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        read_cifar_batch(path, "labels")
    message = str(caught.value)
    assert str(path) in message and "\n" not in message and len(message) < 400
    assert "pwned" not in message


def test_a_good_batch_still_reads(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(_batch(), protocol=2))
    x, y = read_cifar_batch(path, "labels")
    assert x.shape == (3, 3, 32, 32) and y.dtype == np.int64
