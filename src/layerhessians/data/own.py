"""Your own data from a path (``layerhessians train -d PATH``): an image folder or a tensor
file, read into the same :class:`~layerhessians.data.tensors.TensorData` as the built-in
datasets (same label and shape checks, per-channel normalisation, class-balanced Hessian
subset and SHA-256 checksum of the decoded arrays).

Forms of ``PATH``:

- an image folder, one sub-folder per class (class ``k`` is the ``k``-th folder name in
  sorted order, as torchvision's ``ImageFolder``), PNG or JPEG files read with Pillow:
  ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, or ``PATH/<class>/*`` split per class
  80/20 by a fixed seed (as Digits). Grey images give 1 channel; if any image has colour,
  all are read as RGB (3 channels);
- a ``.npz`` file (``numpy.load(allow_pickle=False)``) or a ``.pt`` file
  (``torch.load(weights_only=True)``, a dict of tensors) with keys ``train_x``, ``train_y``,
  ``test_x``, ``test_y``, or ``x``, ``y`` (split 80/20 per class as above). Images ``x``:
  ``[N, C, H, W]`` (C 1 or 3) or ``[N, H, W]`` (grey), uint8 (0-255) or floating point
  (finite, any scale); labels ``y``: integers ``[N]`` in ``0..K-1``, every class present in
  the training part.

Images must be at most 32x32 pixels (they are zero-padded to 32x32, as MNIST is); all
images of a dataset have one size. Every malformed file is refused in one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from layerhessians.errors import UserError

#: File suffixes read as tensors, and image suffixes read from folders (lower case).
TENSOR_SUFFIXES = (".npz", ".pt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Keys of a tensor file: a given split, or one set split per class.
SPLIT_KEYS = ("train_x", "train_y", "test_x", "test_y")
WHOLE_KEYS = ("x", "y")
#: The per-class held-out share and seed when the data come unsplit (Digits' values).
TEST_FRACTION, SPLIT_SEED = 0.2, 0
#: Largest image side (the models take 32x32 inputs).
MAX_SIDE = 32
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_dataset_path(value) -> bool:
    """Whether a ``--dataset`` value names a path rather than a built-in dataset: it is not
    a registry name and it contains a path separator, ends in ``.npz``/``.pt``, or exists."""
    from layerhessians.data.registry import REGISTRY

    if not isinstance(value, (str, os.PathLike)):  # a DatasetSpec, None, ...
        return False
    text = str(value).strip()
    if text.lower() in {name.lower() for name in REGISTRY}:
        return False
    if "/" in text or os.sep in text or text.lower().endswith(TENSOR_SUFFIXES):
        return True
    try:
        return bool(text) and Path(text).exists()
    except OSError:  # a name too long for a path, ...
        return False


def check_dataset_path(value) -> str:
    """The absolute path of a ``--dataset`` path (what a run records), checked to be an
    existing folder or ``.npz``/``.pt`` file (the contents are read later, by
    :func:`read_own_dataset`).

    Raises:
        UserError: the path does not exist or is neither a folder nor a tensor file.
    """
    path = Path(str(value).strip()).expanduser()
    if not path.exists():
        raise UserError(f"dataset {value}: no such file or folder; give a built-in dataset name, "
                        f"an image folder (one sub-folder per class) or a .npz/.pt file")
    if not (path.is_dir() or path.suffix.lower() in TENSOR_SUFFIXES):
        raise UserError(f"dataset {value}: a file must be .npz or .pt (keys "
                        f"{', '.join(SPLIT_KEYS)}, or x, y); or give an image folder")
    return str(path.resolve())


def dataset_label(value) -> str:
    """A short name for a dataset value: the registry name, or a path's last component
    without suffix (for titles and default run names)."""
    return Path(str(value)).stem if is_dataset_path(value) else str(value)


# ----------------------------------------------------------------------------- reading
def read_own_dataset(value):
    """``(arrays, checksum, spec)`` of the dataset at ``value`` (see the module docstring).

    Returns:
        A :class:`~layerhessians.data.readers.RawSplits` (images ``[N, C, H, W]``, uint8 or
        float32; int64 labels), the SHA-256 hex of those arrays and the class names, and a
        :class:`~layerhessians.data.registry.DatasetSpec` describing them (name: the path's
        last component).

    Raises:
        UserError: one line naming the file or folder and what is wrong.
    """
    from layerhessians.data.registry import DatasetSpec
    from layerhessians.data.tensors import data_checksum

    path = Path(check_dataset_path(value))
    if path.is_dir():
        raw, classes = _read_image_folder(path)
    else:
        raw, classes = _read_tensor_file(path)
    _check_splits(path, raw, len(classes))
    spec = DatasetSpec(name=path.stem, reader="own", num_classes=len(classes),
                       image_shape=tuple(int(s) for s in raw.train_x.shape[1:]), flip=False,
                       description=str(path))
    checksum = data_checksum("own:" + "\x1f".join(classes), raw)
    return raw, checksum, spec


def _split(path, x, y):
    from layerhessians.data.readers import RawSplits
    from layerhessians.data.split import stratified_split

    train, test = stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    if len(test) == 0:
        raise UserError(f"{path}: too few examples to hold out a test part (20% of each class); "
                        "give train and test parts")
    return RawSplits(x[train], y[train], x[test], y[test])


def _check_splits(path, raw, num_classes: int) -> None:
    for part, x in (("train", raw.train_x), ("test", raw.test_x)):
        if len(x) == 0:
            raise UserError(f"{path}: the {part} part is empty")
        if x.shape[1] not in (1, 3):
            raise UserError(f"{path}: {part} images have {x.shape[1]} channels; give 1 (grey) "
                            "or 3 (RGB)")
        if max(x.shape[2:]) > MAX_SIDE:
            raise UserError(f"{path}: {part} images are {x.shape[2]}x{x.shape[3]} pixels; the "
                            f"models take at most {MAX_SIDE}x{MAX_SIDE}: resize them first")
    if raw.train_x.shape[1:] != raw.test_x.shape[1:]:
        raise UserError(f"{path}: train images {tuple(raw.train_x.shape[1:])} and test images "
                        f"{tuple(raw.test_x.shape[1:])} differ in shape")
    if num_classes < 2:
        raise UserError(f"{path}: {num_classes} class; a classifier needs at least 2")
    absent = sorted(set(range(num_classes)) - set(np.unique(raw.train_y).tolist()))
    if absent:
        raise UserError(f"{path}: class(es) {', '.join(map(str, absent[:5]))} have no training "
                        "example; every class needs some (the Hessian subset is class-balanced)")


# -- image folders
def _class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _read_image_folder(path: Path):
    from layerhessians.data.readers import RawSplits

    parts = {p.name for p in _class_folders(path)}
    if {"train", "test"} <= parts:
        classes = [p.name for p in _class_folders(path / "train")]
        extra = sorted({p.name for p in _class_folders(path / "test")} - set(classes))
        if extra:
            raise UserError(f"{path / 'test'}: class folder(s) {', '.join(extra)} have no "
                            f"training folder in {path / 'train'}")
        files = {part: _image_files(path / part, classes) for part in ("train", "test")}
        images = _decode(files["train"] + files["test"])
        count = len(files["train"])
        labels = np.asarray([k for _, k in files["train"] + files["test"]], dtype=np.int64)
        raw = RawSplits(images[:count], labels[:count], images[count:], labels[count:])
        return raw, classes
    classes = [p.name for p in _class_folders(path)]
    if not classes:
        raise UserError(f"{path}: no class folders; an image folder holds one sub-folder per "
                        "class (or train/ and test/ with one per class)")
    files = _image_files(path, classes)
    labels = np.asarray([k for _, k in files], dtype=np.int64)
    return _split(path, _decode(files), labels), classes


def _image_files(folder: Path, classes) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue  # a test part may lack a class
        found = 0
        for file in sorted(sub.iterdir(), key=lambda p: p.name):
            if file.name.startswith(".") or file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{file}: not a PNG or JPEG image ({', '.join(IMAGE_SUFFIXES)}); "
                                "move it out of the class folders")
            files.append((file, label))
            found += 1
        if not found:
            raise UserError(f"{sub}: an empty class folder; remove it or add images")
    return files


def _decode(files) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` of the image files, all of one size; C = 3 if any has colour."""
    from PIL import Image, UnidentifiedImageError

    images, colour, size = [], False, None
    for file, _ in files:
        try:
            with Image.open(file) as image:
                image.load()
                colour = colour or image.mode not in _GREY_MODES
                images.append(image.copy())
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise UserError(f"{file}: not a readable image ({' '.join(str(err).split())})") \
                from None
        if size is None:
            size = images[-1].size
        elif images[-1].size != size:
            raise UserError(f"{file}: {images[-1].size[0]}x{images[-1].size[1]} pixels, other "
                            f"images {size[0]}x{size[1]}: give every image one size")
    mode = "RGB" if colour else "L"
    arrays = [np.asarray(image.convert(mode), dtype=np.uint8) for image in images]
    stacked = np.stack(arrays)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2).copy()


# -- tensor files
def _load_arrays(path: Path) -> dict:
    """``{key: numpy array}`` of a .npz or .pt file (no code runs while reading)."""
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: np.asarray(archive[key]) for key in archive.files}
        except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways
            raise UserError(f"{path}: not a readable .npz of plain arrays ("
                            f"{type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal of the safe loader
        raise UserError(f"{path}: not a readable .pt of tensors (read with weights_only=True; "
                        f"{type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    if not isinstance(content, dict) or not all(torch.is_tensor(v) for v in content.values()):
        raise UserError(f"{path}: a .pt dataset is a dict of tensors with keys "
                        f"{', '.join(SPLIT_KEYS)} (or x, y)")
    return {str(key): value.detach().numpy() for key, value in content.items()}


def _read_tensor_file(path: Path):
    from layerhessians.data.readers import RawSplits

    arrays = _load_arrays(path)
    keys = set(arrays)
    if keys == set(SPLIT_KEYS):
        parts = [(_images(path, k, arrays[k]), _labels(path, k.replace("_x", "_y"),
                                                          arrays[k.replace("_x", "_y")],
                                                          len(arrays[k])))
                 for k in ("train_x", "test_x")]
        raw = RawSplits(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    elif keys == set(WHOLE_KEYS):
        x = _images(path, "x", arrays["x"])
        raw = _split(path, x, _labels(path, "y", arrays["y"], len(x)))
    else:
        raise UserError(f"{path}: keys {', '.join(sorted(keys)) or '(none)'}; expected "
                        f"{', '.join(SPLIT_KEYS)}, or x and y")
    if raw.train_x.dtype != raw.test_x.dtype:
        raise UserError(f"{path}: train images are {raw.train_x.dtype}, test images "
                        f"{raw.test_x.dtype}; give both one dtype")
    classes = int(max(raw.train_y.max(), raw.test_y.max())) + 1
    return raw, [str(k) for k in range(classes)]


def _images(path, key, x) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UserError(f"{path}: {key} has shape {tuple(x.shape)}; give images [N, C, H, W] "
                        "or [N, H, W]")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path}: {key} is {x.dtype}; give uint8 (0-255) or floating-point "
                        "images")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{path}: {key} holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(path, key, y, count: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != count:
        raise UserError(f"{path}: {key} has shape {tuple(y.shape)}; give one label per image "
                        f"[{count}]")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise UserError(f"{path}: {key} is {y.dtype}; give integer class labels 0..K-1")
    if len(y) and y.min() < 0:
        raise UserError(f"{path}: {key} holds negative labels; give class labels 0..K-1")
    return y.astype(np.int64)
