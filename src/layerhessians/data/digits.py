"""``Digits``: scikit-learn's bundled handwritten digits, the offline default dataset.

How it differs from MNIST: the source images are 8x8 pixels with 17 grey levels (0-16),
upsampled here to 28x28 by bilinear interpolation (so they are blurrier and fill the frame,
whereas MNIST digits sit in a 20x20 box inside 28x28); there are 1,797 images (MNIST has
70,000): the test part of the UCI "Optical Recognition of Handwritten Digits" collection,
written by other people than MNIST's. The train/test split is ours: stratified, 20% of each
class (rounded) to test, chosen by a fixed seed, giving 1,438 train and 359 test images.
"""

import numpy as np
import torch
import torch.nn.functional as F

from layerhessians.data.readers import RawSplits
from layerhessians.data.split import stratified_split

#: Number of images in scikit-learn's digits.
DIGITS_SIZE = 1797
#: Fraction of each class held out for testing, and the seed choosing them.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
#: Side of the upsampled images (MNIST's).
DIGITS_SIDE = 28


def upsample(images8, side=DIGITS_SIDE) -> np.ndarray:
    """Bilinear upsampling ``[N, 8, 8]`` grey levels 0-16 -> float32 ``[N, 1, side, side]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(images8, dtype=np.float32) / 16.0)[:, None]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp_(0, 1).numpy()


def load_digits_raw() -> tuple[RawSplits, RawSplits]:
    """``(source, images)``: the 8x8 split as uint8 grey levels ``[N, 1, 8, 8]`` (what the
    checksum covers) and the same split upsampled, float32 ``[N, 1, 28, 28]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images8 = np.asarray(bunch.images).astype(np.uint8)  # values 0..16, exact in float64
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    source = RawSplits(images8[train][:, None], labels[train], images8[test][:, None], labels[test])
    images = RawSplits(upsample(images8[train]), labels[train], upsample(images8[test]), labels[test])
    return source, images
