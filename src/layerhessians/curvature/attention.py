"""Attention that second-order autograd can differentiate: the math path of
scaled-dot-product attention, for the engine's own forward passes.

PyTorch's fused attention kernels (CPU flash attention, CUDA flash / memory-efficient /
cuDNN attention) have a first derivative but no derivative of it, so any Hessian-vector
product through ``nn.MultiheadAttention`` or ``nn.TransformerEncoderLayer`` fails with
``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``. The math backend is plain matmul/softmax, twice differentiable.

``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` also have a fused inference
"fast path" (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``). PyTorch
takes it only in eval mode when grad is disabled or nothing it uses requires grad, so it never
sits on a path autograd differentiates; :func:`math_attention` still turns it off (through
``torch.backends.mha.set_fastpath_enabled``), so that forwards with and without grad compute
the same arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["math_attention"]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Within the block, attention runs on twice-differentiable code; afterwards the user's
    settings are restored, also on an exception.

    Selects scaled-dot-product attention's math backend
    (``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``, which restores the previously
    enabled backends on exit) and disables the fused multi-head-attention inference fast path
    (``torch.backends.mha``; its previous value is restored). Both are process-wide flags, as
    in PyTorch: do not toggle them from another thread meanwhile.

    Yields:
        None.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
