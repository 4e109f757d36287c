"""The batch-coupling probe: whether an example's output depends on the other examples of
its batch in the engine's forward (:func:`batch_coupling`), so that splitting the data
changes the operator."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from layerhessians.curvature.batches import PROBE_ROWS, output_tensors
from layerhessians.curvature.modes import engine_forward
from layerhessians.errors import UserError

__all__ = ["OUTPUT_ROWS", "RANDOM_FORWARD", "batch_coupling"]

#: the reason given for outputs whose rows are not whole blocks per example
OUTPUT_ROWS = ("the model's outputs do not have the same number of rows for every example "
               "(rows = examples, or R consecutive rows per example such as token "
               "positions), so the engine cannot tell which example a loss row belongs to")

#: the reason given for a forward that draws random numbers in the engine's (eval) modes
RANDOM_FORWARD = ("the model's forward draws random numbers even in eval mode (two passes over "
                  "the same examples differ, e.g. a VAE's sampling), so the operator depends "
                  "on the draws and on how the data are split")


def _probe_tolerance(dtype: torch.dtype) -> float:
    # relative: roundoff of different batch shapes is far below, batch statistics far above
    return float(torch.finfo(dtype).eps) ** 0.5


def _close(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = max(float(a.abs().max()), 1.0) if a.numel() else 1.0
    return torch.allclose(a, b, rtol=0.0, atol=_probe_tolerance(dtype) * scale, equal_nan=True)


def batch_coupling(model: nn.Module, bn_mode: str, inputs: Tensor | None = None) -> str | None:
    """Why an example's output depends on the other examples of its batch in the engine's
    forward (so splitting the data changes the operator), or ``None`` when it does not.

    Batch norm counts in ``bn_mode="train"`` and, in any mode, with
    ``track_running_stats=False`` (it then always uses batch statistics). Other modules are
    probed when ``inputs`` [n, ...] (n >= 2) are given: no-grad forward passes on the first
    ``min(n, 8)`` rows, twice with different seeds of the random number generators (outputs
    that differ: the forward draws random numbers, :data:`RANDOM_FORWARD`), and on the first
    half of them; the half's outputs must equal the same rows of the whole's to ``sqrt(eps)``
    of the dtype, relative. Layer, group and instance norm pass; a model whose forward fails
    on a sub-batch counts as coupled. Each reason names the cause detected.

    Returns:
        A short description of the coupling (for error messages), or ``None``.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_mode == "train":
                return f"batch norm {name!r} in bn_mode 'train' (batch statistics)"
            if m.running_mean is None or m.running_var is None:
                return (f"batch norm {name!r} with track_running_stats=False (batch "
                        "statistics in every mode)")
    if inputs is None or not torch.is_tensor(inputs) or inputs.ndim == 0 or inputs.shape[0] < 2:
        return None
    first = next(model.parameters(), None)
    if first is not None:
        inputs = inputs.to(device=first.device,
                           dtype=first.dtype if inputs.is_floating_point() else None)
    whole = min(int(inputs.shape[0]), PROBE_ROWS)
    half = whole // 2
    with torch.no_grad():
        full = output_tensors(engine_forward(model, bn_mode, inputs[:whole]))
        again = output_tensors(engine_forward(model, bn_mode, inputs[:whole], seed=1))
        if not all(_close(a, b, full[0].dtype) for a, b in zip(full, again)):
            return RANDOM_FORWARD
        try:
            part = output_tensors(engine_forward(model, bn_mode, inputs[:half]))
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure means it is not per-example
            return f"a forward pass on {half} of {whole} examples fails ({error})"
    for a, b in zip(full, part):
        if a.ndim == 0 or a.shape[0] % whole or b.shape != (a.shape[0] // whole * half,
                                                              *a.shape[1:]):
            return OUTPUT_ROWS
        if not _close(a[:b.shape[0]], b, full[0].dtype):
            return (f"a layer that mixes the examples of a batch (the outputs of {half} "
                    f"examples change when they are evaluated among {whole})")
    return None
