"""The square root ``S_n`` of a loss's Hessian with respect to one example's outputs,
``S_n S_n^T = d^2 l_n / df_n^2``, applied to probes, differentiable in the outputs.

- cross-entropy (``nn.CrossEntropyLoss`` or ``F.cross_entropy``, logits ``[N, C]``):
  ``diag(p) - p p^T = S S^T`` with ``S = diag(sqrt p) - p sqrt(p)^T`` (``sqrt p`` computed as
  ``exp(log_softmax / 2)``, finite gradients where ``p`` underflows). Label smoothing keeps
  this Hessian (the smoothed targets sum to 1); class weights do not (refused).
- squared error (``nn.MSELoss`` or ``F.mse_loss``): ``S = sqrt(c) I`` with ``c = 2 / D``
  for the mean over the ``D`` outputs of an example (``reduction="mean"``, the default) and
  ``c = 2`` for ``reduction="sum"``.

Any other loss is refused: its output Hessian is unknown here (``estimator="hutchinson"``
needs no output Hessian).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from layerhessians.errors import UserError

__all__ = ["OutputCurvature", "output_curvature"]


class OutputCurvature:
    """``S_n`` of one loss: :meth:`apply` ``(outputs, z) -> S z`` per example.

    Attributes:
        name: ``"cross-entropy"`` or ``"squared error"``.
    """

    def __init__(self, name: str, scale: float | None = None, ignore_index: int = -100):
        self.name, self.scale, self.ignore_index = name, scale, ignore_index

    def check(self, outputs, targets) -> Tensor:
        """The outputs as one tensor with one row per example.

        Raises:
            UserError: a structured output, logits not shaped ``[N, C]``, or a target equal to
                ``ignore_index``.
        """
        if not torch.is_tensor(outputs) or not outputs.is_floating_point():
            raise UserError("the ggn and exact estimators need a model returning one floating "
                            "tensor; use estimator='hutchinson' for structured outputs")
        if self.name == "cross-entropy":
            if outputs.ndim != 2:
                raise UserError(f"the ggn estimator takes cross-entropy logits shaped [N, C]; "
                                f"got {list(outputs.shape)}: use estimator='hutchinson'")
            if torch.is_tensor(targets) and not targets.is_floating_point() and \
                    bool((targets == self.ignore_index).any()):
                raise UserError("a target equals the loss's ignore_index: the mean loss then "
                                "depends on the batch; drop those examples")
        return outputs

    def apply(self, outputs: Tensor, z: Tensor) -> Tensor:
        """``S_n z_n`` for every example: ``outputs`` ``[N, ...]``, ``z`` ``[P, N, ...]``
        (or ``[N, ...]``) -> the same shape as ``z``, in the graph of ``outputs``."""
        if self.name == "cross-entropy":
            root = torch.exp(0.5 * F.log_softmax(outputs, dim=-1))
            rz = root * z
            return rz - (root * root) * rz.sum(-1, keepdim=True)
        scale = self.scale if self.scale is not None else 2.0 / outputs[0].numel()
        return math.sqrt(scale) * z


def output_curvature(loss_fn) -> OutputCurvature:
    """The :class:`OutputCurvature` of ``loss_fn``.

    Raises:
        UserError: a loss whose output Hessian is not known here, or cross-entropy with class
            weights, or a loss with ``reduction="none"``.
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise UserError(f"loss_fn has reduction={reduction!r}: pass a mean- or sum-reduced "
                        "loss")
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if getattr(loss_fn, "weight", None) is not None:
            raise UserError("cross-entropy with class weights has another output Hessian: use "
                            "estimator='hutchinson' or drop the weights")
        return OutputCurvature("cross-entropy",
                               ignore_index=getattr(loss_fn, "ignore_index", -100))
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return OutputCurvature("squared error", 2.0 if reduction == "sum" else None)
    raise UserError(f"the ggn and exact estimators know the output Hessian of cross-entropy "
                    f"and squared error only, not {type(loss_fn).__name__}: use "
                    "estimator='hutchinson'")
