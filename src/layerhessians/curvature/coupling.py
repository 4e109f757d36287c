"""The batch-coupling probe: whether an example's output depends on the other examples of
its batch in the engine's forward (:func:`batch_coupling`), so that splitting the data
changes the operator."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from layerhessians.curvature.batches import PROBE_ROWS, output_tensors
from layerhessians.curvature.modes import engine_forward

__all__ = ["batch_coupling"]


def _probe_tolerance(dtype: torch.dtype) -> float:
    # relative: roundoff of different batch shapes is far below, batch statistics far above
    return float(torch.finfo(dtype).eps) ** 0.5


def batch_coupling(model: nn.Module, bn_mode: str, inputs: Tensor | None = None) -> str | None:
    """Why an example's output depends on the other examples of its batch in the engine's
    forward (so splitting the data changes the operator), or ``None`` when it does not.

    Batch norm counts in ``bn_mode="train"`` and, in any mode, with
    ``track_running_stats=False`` (it then always uses batch statistics). Other modules are
    probed when ``inputs`` [n, ...] (n >= 2) are given: two no-grad forward passes, on the
    first ``min(n, 8)`` rows and on the first half of them; the half's outputs must equal the
    same rows of the whole's to ``sqrt(eps)`` of the dtype, relative. Layer, group and
    instance norm pass; a model whose forward fails on a sub-batch counts as coupled.

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
        try:
            part = output_tensors(engine_forward(model, bn_mode, inputs[:half]))
        except Exception as error:  # noqa: BLE001 - any failure means it is not per-example
            return f"a forward pass on {half} of {whole} examples fails ({error})"
    for a, b in zip(full, part):
        if a.ndim == 0 or a.shape[0] != whole or b.shape != (half, *a.shape[1:]):
            return "an output without one row per example"
        a, b = a[:half].to(torch.float64), b.to(torch.float64)
        scale = max(float(a.abs().max()), 1.0) if a.numel() else 1.0
        if not torch.allclose(a, b, rtol=0.0, atol=_probe_tolerance(full[0].dtype) * scale,
                              equal_nan=True):
            return (f"a layer that mixes the examples of a batch (the outputs of {half} "
                    f"examples change when they are evaluated among {whole})")
    return None
