"""Batches of data for the curvature engine: ``(inputs, targets)`` pairs or a
:class:`BatchLoss`'s batches (:func:`as_batches`), the structure of a model's outputs
(:func:`output_tensors`, :func:`rows`) and the :class:`Reduction` hook that combines the
per-batch (per-process) terms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from layerhessians.errors import UserError

__all__ = ["LOCAL", "PROBE_ROWS", "BatchLoss", "Reduction", "as_batches", "dataset_batch",
           "output_tensors", "rows"]

#: examples the probes use (loss reduction, batch coupling)
PROBE_ROWS = 8


class BatchLoss:
    """A loss computed from the model and a whole batch: ``fn(model, batch) -> (loss,
    count)`` with ``loss`` the MEAN over the batch's ``count`` terms (examples, or tokens for
    a language model) as a scalar tensor and ``count`` a positive int.

    Use it when the loss needs more than ``loss_fn(model(x), y)``: dict or tuple batches, a
    language model's shifted next-token loss, masks. Data is then any iterable of batches (a
    single batch must be put in a list). The operator is the Hessian of the mean over all
    terms of all batches, ``sum_b count_b * loss_b / sum_b count_b``. Only ``kind="hessian"``
    (the GGN and empirical Fisher need the model outputs and per-example losses of the
    ``loss_fn(outputs, targets)`` form); no micro-batching (the engine cannot cut a batch it
    does not know).

    Args:
        fn: ``fn(model, batch) -> (loss, count)``; it calls ``model`` itself (the engine's
            modes apply: eval, batch norm per ``bn_mode``; buffers are restored afterwards).
    """

    def __init__(self, fn):
        if not callable(fn):
            raise UserError("BatchLoss needs a callable fn(model, batch) -> (loss, count)")
        self.fn = fn

    def __call__(self, model, batch) -> tuple[Tensor, int]:
        """The batch's mean loss and its number of terms, checked.

        Args:
            model: the network ``fn`` calls.
            batch: one batch, in whatever form ``fn`` takes.

        Returns:
            ``(loss, count)``: the mean loss as a 0-d tensor and the number of terms (int >= 1).

        Raises:
            UserError: ``fn`` returned something other than ``(scalar tensor, count >= 1)``.
        """
        result = self.fn(model, batch)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise UserError("a BatchLoss function must return (mean loss, number of terms)")
        loss, count = result
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("a BatchLoss function must return a scalar tensor (the batch's "
                            "mean loss) and a count")
        count = int(count)
        if count < 1:
            raise UserError(f"a BatchLoss function returned count {count}: it must be >= 1")
        return loss.reshape(()), count


class Reduction:
    """Combines per-process partial results; the identity for a single process.

    A distributed subclass all-reduces: ``total_examples`` returns the global example count
    and ``sum`` returns the global sum of a product (both called with local values).
    """

    def total_examples(self, count: int) -> int:
        """Global number of examples given the local ``count``."""
        return count

    def sum(self, tensor: Tensor) -> Tensor:
        """Global sum of a 1-D product ``tensor`` (may work in place); returns the result."""
        return tensor


LOCAL = Reduction()


def dataset_batch(data):
    """A map-style ``Dataset`` (``__getitem__`` and ``__len__``, not a tuple/list/tensor) as
    one ``(inputs, targets)`` batch of all its examples; anything else unchanged.

    Raises:
        UserError: a dataset whose examples are not ``(input, target)`` pairs that stack.
    """
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return tuple(data.tensors)
    if not isinstance(data, Dataset) or isinstance(data, DataLoader) or \
            not hasattr(data, "__len__"):
        return data
    from torch.utils.data import default_collate

    try:
        batch = default_collate([data[i] for i in range(len(data))])
    except Exception as error:  # noqa: BLE001 - reported as the user's problem
        raise UserError(f"a {type(data).__name__} was passed as data, but its examples do not "
                        f"stack into one batch ({error}): pass (inputs, targets) tensors or "
                        "a DataLoader of such batches") from None
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not torch.is_tensor(batch[0]):
        raise UserError(f"a {type(data).__name__} was passed as data, but its examples are not "
                        "(input, target) pairs: pass (inputs, targets) tensors or a "
                        "DataLoader of such batches")
    return tuple(batch)


def as_batches(data, pairs: bool = True) -> list:
    """``data`` as a list of ``(inputs, targets)`` pairs (``pairs=False``: a list of batches
    of any form, for a :class:`BatchLoss`).

    ``data`` is one pair (a tuple/list whose first item is a tensor), an iterable of pairs
    (a list, a ``DataLoader``; an iterator is consumed once) or a map-style
    ``torch.utils.data.Dataset`` of ``(input, target)`` examples (a ``TensorDataset``, ...),
    which is taken as ONE batch of all its examples (stacked by ``default_collate``). Raises
    :class:`UserError` if it is empty or malformed.
    """
    if not pairs:
        if isinstance(data, (Tensor, Mapping)):
            raise UserError("with a BatchLoss, data must be a list (or iterable) of batches")
        batches = list(data)
        if not batches:
            raise UserError("data is empty: pass a non-empty list of batches")
        return batches
    data = dataset_batch(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        pairs = [tuple(data)]
    else:
        try:
            pairs = [tuple(item) for item in data]
        except TypeError:
            raise UserError(
                "data must be an (inputs, targets) pair or an iterable of such pairs"
            ) from None
    if not pairs:
        raise UserError("data is empty: pass an (inputs, targets) pair or a non-empty list "
                        "of pairs")
    for pair in pairs:
        if len(pair) != 2 or not torch.is_tensor(pair[0]):
            raise UserError("each batch of data must be an (inputs, targets) pair of tensors")
        if pair[0].ndim == 0 or pair[0].shape[0] == 0:
            raise UserError("a batch of data has no examples: drop empty batches")
    return pairs


def output_tensors(outputs) -> list[Tensor]:
    """The floating tensors of a model's outputs (a tensor or a tuple/list/dict of them).

    Raises:
        UserError: the outputs hold no floating tensor.
    """
    leaves = [t for t in tree_flatten(outputs)[0]
              if torch.is_tensor(t) and t.is_floating_point()]
    if not leaves:
        raise UserError("the model's outputs must be a floating tensor or a tuple/list/dict "
                        f"of tensors; got {type(outputs).__name__}")
    return leaves


def rows(tree, index, count: int):
    """``tree`` (a tensor, or a tuple/list/dict of them) with the rows of examples ``index``
    (a slice or index tensor over ``count`` examples) of every tensor whose first dimension
    is ``count``, or a multiple ``R * count`` (``R`` consecutive loss rows per example, e.g.
    the token positions of a language model's outputs ``[B, T, V]`` flattened to
    ``[B*T, V]``: example ``n`` owns rows ``n*R .. n*R + R - 1``); other leaves unchanged."""
    def pick(t):
        if not torch.is_tensor(t) or not t.ndim or count < 1 or t.shape[0] % count:
            return t
        per = t.shape[0] // count
        if per == 1:
            return t[index]
        return t.reshape(count, per, *t.shape[1:])[index].reshape(-1, *t.shape[1:])

    return tree_map(pick, tree)
