"""The fixed, class-balanced subset of the training set on which Hessians are measured."""

import torch

from layerhessians.errors import UserError


def hessian_subset(targets, examples_per_class=10, seed=0, total=None) -> torch.Tensor:
    """Indices (int64) of the fixed Hessian set in the training set, ordered by class, then
    by index; the same on every run and machine.

    Args:
        targets: integer class labels of the training set, ``[N]``.
        examples_per_class: examples drawn per class (``total=None``); each class's are drawn
            without replacement by a ``torch.Generator`` seeded with ``seed`` (classes in
            ascending order, one ``randperm`` each): ``K * examples_per_class`` indices.
        seed: seed of the generator (the original's fixed 0).
        total: instead of ``examples_per_class``, ``n`` examples class-balanced as far as
            possible (classes with fewer than the fair share give all they have; the others
            get equal shares, lower labels taking the remainder), drawn the same way, so
            ``n = K * epc`` gives exactly the ``examples_per_class = epc`` set; or ``"all"``:
            the whole training set.

    Returns:
        int64 tensor of indices into ``targets``.

    Raises:
        UserError: non-integer labels or count, a class with fewer than
            ``examples_per_class`` examples, or ``total`` above ``N``.
    """
    if total is None:
        if isinstance(examples_per_class, bool) or not isinstance(examples_per_class, int) or examples_per_class < 1:
            raise UserError(f"examples per class must be a positive integer, got {examples_per_class!r}")
    targets = torch.as_tensor(targets).reshape(-1).cpu()
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise UserError(f"targets must be integer class labels, got {targets.dtype}")
    classes = torch.unique(targets).tolist()
    members = {c: torch.nonzero(targets == c).flatten() for c in classes}
    if total is None:
        for c in classes:
            if len(members[c]) < examples_per_class:
                raise UserError(f"class {c} has only {len(members[c])} training examples, fewer "
                                f"than examples per class = {examples_per_class}: lower it")
        quota = {c: examples_per_class for c in classes}
    elif total == "all":
        return torch.cat([members[c] for c in classes])
    else:
        quota = _balanced_quota(members, classes, total, len(targets))
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in classes:
        pick = torch.randperm(len(members[c]), generator=generator)[:quota[c]]
        chosen.append(members[c][pick].sort().values)
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)


def _balanced_quota(members: dict, classes: list, total: int, available: int) -> dict:
    """``{class: examples}`` summing to ``total`` by water-filling: classes too small for the
    fair share give all they have (smallest first); the rest share what is left equally,
    lower labels taking the remainder."""
    if total > available:
        raise UserError(f"--hessian-examples {total} exceeds the {available} training "
                        "examples: lower it or pass --hessian-examples all")
    quota, remaining = {}, int(total)
    by_size = sorted(classes, key=lambda c: (len(members[c]), c))
    for i, c in enumerate(by_size):
        left = len(by_size) - i
        if len(members[c]) <= remaining // left:
            quota[c] = len(members[c])
            remaining -= quota[c]
            continue
        share, extra = divmod(remaining, left)
        for j, rest in enumerate(sorted(by_size[i:])):
            quota[rest] = share + (j < extra)
        break
    return quota
