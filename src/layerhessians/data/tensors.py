"""The in-memory pipeline: decoded arrays -> padded, normalised float32 tensors
(:class:`TensorData`), a seeded batch iterator (:func:`batches`) and whole-batch augmentation
(:func:`augment_batch`: random crop with 4-pixel padding, optional horizontal flip).
"""

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from layerhessians.data.readers import RawSplits
from layerhessians.errors import UserError

#: Side of every tensor image.
IMAGE_SIDE = 32


@dataclass(eq=False)
class TensorData:
    """A dataset held as tensors.

    ``train_x``/``test_x``: float32 ``[N, C, 32, 32]``, normalised per channel by the training
    set's ``mean``/``std`` (pixel units, [0, 1] scale, population std over the padded 32x32
    images); ``train_y``/``test_y``: int64 ``[N]`` in ``0..num_classes-1``. ``checksum``: sha256
    hex of the decoded source arrays. ``flip``: horizontal flips preserve labels (CIFAR).
    ``folder``: where the files were read from (``None`` when bundled).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    checksum: str
    flip: bool = False
    folder: Optional[str] = None
    source_shape: tuple = field(default=())

    @property
    def image_shape(self) -> tuple:
        """``(C, 32, 32)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def black(self) -> torch.Tensor:
        """Value of a black (0) pixel after normalisation, per channel, float32 ``[C]``:
        the padding value for augmentation crops."""
        return -torch.tensor(self.mean, dtype=torch.float32) / torch.tensor(self.std, dtype=torch.float32)

    def train_batches(self, batch_size, shuffle=True, seed=0, augment=False, drop_last=False):
        """:func:`batches` over the training set with this dataset's flip policy and padding value."""
        return batches(self.train_x, self.train_y, batch_size, shuffle=shuffle, seed=seed,
                       augment=augment, drop_last=drop_last, flip=self.flip, fill=self.black)

    def __repr__(self) -> str:
        return (f"TensorData({self.name}: train {tuple(self.train_x.shape)}, test "
                f"{tuple(self.test_x.shape)}, {self.num_classes} classes, sha256 {self.checksum[:12]})")


def data_checksum(name: str, raw: RawSplits) -> str:
    """sha256 hex over ``name`` and each array's dtype, shape and bytes (C order)."""
    digest = hashlib.sha256(name.encode())
    for array in raw:
        array = np.ascontiguousarray(array)
        digest.update(f"|{array.dtype.str}{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def pad_images(images: np.ndarray, side=IMAGE_SIDE) -> np.ndarray:
    """Zero-pad ``[N, C, H, W]`` symmetrically (extra pixel at the bottom/right) to ``side``x``side``."""
    height, width = images.shape[2:]
    if height > side or width > side:
        raise UserError(f"images of {height}x{width} pixels are larger than {side}x{side}")
    top, left = (side - height) // 2, (side - width) // 2
    if (height, width) == (side, side):
        return images
    out = np.zeros(images.shape[:2] + (side, side), dtype=images.dtype)
    out[:, :, top:top + height, left:left + width] = images
    return out


def _unit_scale(images: np.ndarray) -> float:
    return 255.0 if images.dtype == np.uint8 else 1.0


def channel_stats(images: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean and population std of ``[N, C, H, W]`` images on the [0, 1] scale
    (uint8 is divided by 255). Exact for uint8 (from a 256-bin histogram), float64 otherwise."""
    means, stds = [], []
    for channel in range(images.shape[1]):
        plane = images[:, channel]
        if images.dtype == np.uint8:
            flat = torch.from_numpy(np.ascontiguousarray(plane)).reshape(-1)
            counts = torch.bincount(flat, minlength=256).double().numpy()  # torch's is ~4x numpy's
            levels = np.arange(256, dtype=np.float64) / 255.0
            mean = counts @ levels / counts.sum()
            var = counts @ (levels - mean) ** 2 / counts.sum()
        else:
            values = plane.astype(np.float64)
            mean = values.mean()
            var = ((values - mean) ** 2).mean()
        means.append(float(mean))
        stds.append(float(np.sqrt(var)))
    return tuple(means), tuple(stds)


def normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """float32 ``[N, C, H, W]``: ``(images / scale - mean[c]) / std[c]`` (scale 255 for uint8)."""
    if min(std) <= 0:
        raise UserError("the training images are constant (zero std): the dataset files look wrong")
    scale = _unit_scale(images)
    out = torch.from_numpy(np.asarray(images)).to(torch.float32)
    shift = torch.tensor([m * scale for m in mean], dtype=torch.float64)
    factor = torch.tensor([1.0 / (s * scale) for s in std], dtype=torch.float64)
    out.sub_(shift.to(torch.float32).view(1, -1, 1, 1)).mul_(factor.to(torch.float32).view(1, -1, 1, 1))
    return out


def build_tensor_data(spec, images: RawSplits, checksum: str, folder=None) -> TensorData:
    """Pad to 32x32, compute the training mean/std, normalise, and check labels against ``spec``."""
    for split, x, y in (("train", images.train_x, images.train_y), ("test", images.test_x, images.test_y)):
        if tuple(x.shape[1:]) != tuple(spec.image_shape):
            raise UserError(f"{spec.name} {split} images have shape {tuple(x.shape[1:])}, expected "
                            f"{tuple(spec.image_shape)}: the files are not {spec.name}")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise UserError(f"{spec.name} {split} labels span {y.min()}..{y.max()}, expected "
                            f"0..{spec.num_classes - 1}: the files are not {spec.name}")
    train_x, test_x = pad_images(images.train_x), pad_images(images.test_x)
    mean, std = channel_stats(train_x)
    return TensorData(
        name=spec.name,
        train_x=normalise(train_x, mean, std), train_y=torch.as_tensor(images.train_y, dtype=torch.int64),
        test_x=normalise(test_x, mean, std), test_y=torch.as_tensor(images.test_y, dtype=torch.int64),
        num_classes=spec.num_classes, in_channels=spec.in_channels, mean=mean, std=std,
        checksum=checksum, flip=spec.flip, folder=None if folder is None else str(folder),
        source_shape=tuple(spec.image_shape),
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding=4, flip=False, fill=0.0) -> torch.Tensor:
    """Random crops of ``x`` (``[B, C, H, W]``) padded by ``padding`` pixels of value ``fill``
    (scalar or per channel ``[C]``), each mirrored left-right with probability 1/2 when
    ``flip``; one gather for the whole batch. Offsets come from ``generator`` (CPU)."""
    batch, channels, height, width = x.shape
    padded_width = width + 2 * padding
    padded = x.new_empty(batch, channels, height + 2 * padding, padded_width)
    padded.copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand_as(padded[0]))
    padded[:, :, padding:padding + height, padding:padding + width] = x
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = top[:, None] + torch.arange(height)  # [B, H]
    cols = left[:, None] + torch.arange(width)  # [B, W]
    if flip:
        mirrored = torch.rand(batch, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, height * width)
    flat = flat.to(x.device).expand(batch, channels, height * width)
    return padded.reshape(batch, channels, -1).gather(2, flat).reshape(batch, channels, height, width)


def batches(x, y, batch_size, shuffle=True, seed=0, augment=False, drop_last=False, *, flip=False,
            fill=0.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over ``(x_batch [b, C, H, W], y_batch [b])``, ``b <= batch_size``.

    Order and augmentation come from one ``torch.Generator`` seeded with ``seed``: the same
    seed gives the same batches (use e.g. ``seed + epoch`` for a new order each epoch).
    ``augment``: random 32x32 crops of the 4-pixel padded images (padding value ``fill``;
    pass ``TensorData.black``) and, if ``flip``, horizontal flips (pass ``TensorData.flip``).
    ``drop_last`` skips a final smaller batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise UserError(f"inputs ({len(x)}) and targets ({len(y)}) differ in length")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(x), generator=generator) if shuffle else None
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        if drop_last and stop - start < batch_size:
            break
        if order is None:
            x_batch, y_batch = x[start:stop], y[start:stop]
        else:
            index = order[start:stop]
            x_batch, y_batch = x[index.to(x.device)], y[index.to(y.device)]
        if augment:
            x_batch = augment_batch(x_batch, generator, flip=flip, fill=fill)
        yield x_batch, y_batch
