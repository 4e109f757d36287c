"""The fixed, class-balanced subset of the training set on which Hessians are measured."""

import torch

from layerhessians.errors import UserError


def hessian_subset(targets, examples_per_class, seed=0) -> torch.Tensor:
    """Indices (int64 ``[K * examples_per_class]``, K = number of distinct classes in
    ``targets``) of ``examples_per_class`` training examples per class, drawn without
    replacement by a ``torch.Generator`` seeded with ``seed`` (classes in ascending order,
    one ``randperm`` each), so the same on every run and machine; ordered by class, then by
    index. A class with fewer examples raises :class:`UserError`.
    """
    if isinstance(examples_per_class, bool) or not isinstance(examples_per_class, int) or examples_per_class < 1:
        raise UserError(f"examples per class must be a positive integer, got {examples_per_class!r}")
    targets = torch.as_tensor(targets).reshape(-1).cpu()
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise UserError(f"targets must be integer class labels, got {targets.dtype}")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for cls in torch.unique(targets).tolist():
        members = torch.nonzero(targets == cls).flatten()
        if len(members) < examples_per_class:
            raise UserError(f"class {cls} has only {len(members)} training examples, fewer than "
                            f"examples per class = {examples_per_class}: lower it")
        pick = torch.randperm(len(members), generator=generator)[:examples_per_class]
        chosen.append(members[pick].sort().values)
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
