"""The seeded stratified train/test split of the bundled datasets (Digits, MNIST5k)."""

import numpy as np
import torch


def stratified_split(labels, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test, class by class.

    Per class (in ascending label order), ``round(test_fraction * n_class)`` of its examples,
    chosen by ``torch.randperm`` from one ``torch.Generator`` seeded with ``seed``, go to test;
    the rest go to train. The same labels and seed always give the same split.

    Args:
        labels: integer class labels, shape ``[N]``.
        test_fraction: share of each class held out, in [0, 1].
        seed: seed of the generator choosing the held-out examples.

    Returns:
        ``(train, test)``: int64 numpy index arrays, ascending, disjoint, covering ``0..N-1``.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    test = [torch.zeros(0, dtype=torch.int64)]
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        count = int(round(test_fraction * len(members)))
        test.append(members[torch.randperm(len(members), generator=generator)[:count]])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return (torch.nonzero(~is_test).flatten().numpy(), torch.nonzero(is_test).flatten().numpy())
