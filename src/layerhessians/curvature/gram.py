"""Layer Gram matrices: the exact GGN block of every Conv2d/Linear weight as ``V V^T``.

For a mean loss ``L = (1/N) sum_n l(f_n, y_n)`` over ``N`` examples with ``C`` outputs each,
the GGN block of a weight ``W`` is ``G_WW = sum_n J_n^T H_n J_n`` (``J_n = df_n/dW``,
``H_n = d^2 l / df_n^2``). Write ``H_n / N = S_n S_n^T`` with ``S_n`` [C, K] (cross-entropy:
``S_n = (diag(sqrt p) - p sqrt(p)^T) Q_n / sqrt(N)``, ``Q_n`` [C, C - 1] an orthonormal
basis of ``sqrt(p)``'s complement, ``K = C - 1``, the rank of ``H_n``; any other loss: the
eigendecomposition of the per-example output Hessian by autograd). Then
``G_WW = V V^T`` with ``V = [J_n^T s_{n,k}]``, ``dim x (N K)``, and the nonzero eigenvalues
of ``G_WW`` are those of the ``(N K) x (N K)`` Gram matrix ``V^T V`` (the route of ViViT,
Dangel et al., 2022, "ViViT: Curvature access through the generalized Gauss-Newton's
low-rank structure").

The sensitivities ``g_{n,k}`` (the backpropagated ``s_{n,k}`` at each layer's output) of
ALL layers come from one forward pass and ``K`` backward passes (batched with ``vmap`` where
torch supports it), with forward hooks capturing every layer's input and output. The
column of ``V`` for ``(n, k)`` is then local to the layer: ``g_{n,k} u_n^T`` with ``u_n``
[I, P] the layer's (unfolded) input over its ``P`` output positions and ``g_{n,k}`` [O, P],
so each Gram matrix is computed per layer, either

- *factorised* over positions: ``Gram[(n,k),(m,l)] = sum_{p,q} (g_{n,k,p} . g_{m,l,q})
  (u_{n,p} . u_{m,q})``, per pair of examples ``n >= m`` (the lower triangle):
  ``U = u_n^T u_m`` [P, P], ``S = g_n U`` [K, O, P], then ``<S_k, g_{m,l}>``; cost
  ``N (N + 1) / 2 (P^2 I + K O P^2 + K^2 O P)``, cheap when ``P`` is small (Linear layers,
  ``P = 1``: ``(u_n . u_m) (g_{n,k} . g_{m,l})``); or
- *materialised*: ``V`` built in chunks of output channels and ``Gram += V_c^T V_c`` (one
  triangle, BLAS ``syrk``), cost ``N K O I P + N K (N K + 1) / 2 O I``, cheap when ``O I``
  is small;

the cheaper by that count. When ``dim <= N K`` the ``dim x dim`` matrix ``V V^T`` itself
is formed instead (all its eigenvalues, zeros included; for a Linear layer as the
Kronecker sum ``sum_n (sum_k g_{n,k} g_{n,k}^T) (x) u_n u_n^T``).

The examples must not interact (eval-mode batch norm, dropout off): the per-example
separation of the backward pass relies on it. Whether a layer's GGN block is also its
Hessian block is decided by :mod:`~layerhessians.curvature.certify`, not here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas
from torch import Tensor, nn
from torch.nn import functional as F

from layerhessians.curvature.batches import as_batches
from layerhessians.curvature.blocks import is_transposed_linear
from layerhessians.curvature.loss_reduction import data_loss_reduction
from layerhessians.curvature.modes import call_model, engine_context, engine_forward
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError, check_choice

__all__ = [
    "GRAM_METHODS",
    "LayerFactors",
    "factor_bytes",
    "gram_factors",
    "output_hessian_sqrt",
    "unsupported_reason",
]

GRAM_METHODS = ("factorised", "materialised")
_CHUNK_BYTES = 256 * 2 ** 20  # working memory of one chunk of a Gram computation
_PSD_RTOL = 1e-6  # relative size of a negative output-Hessian eigenvalue treated as rounding


# ----------------------------------------------------------------------------- output Hessian


def _is_plain_cross_entropy(loss_fn, targets: Tensor) -> bool:
    if loss_fn is F.cross_entropy:
        return not targets.is_floating_point()
    if not isinstance(loss_fn, nn.CrossEntropyLoss):
        return False
    return (loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0 and not targets.is_floating_point()
            and not bool((targets == loss_fn.ignore_index).any()))


def _cross_entropy_sqrt(p: Tensor) -> Tensor:
    """``R`` [n, C, C - 1] with ``R_n R_n^T = diag(p_n) - p_n p_n^T`` (softmax ``p`` [n, C]).

    ``S = diag(sqrt p) - p sqrt(p)^T`` is a square root with ``S sqrt(p) = 0``, so
    ``S S^T = S Q Q^T S^T`` for any ``Q`` [C, C - 1] with orthonormal columns orthogonal to
    ``sqrt(p)``: the Householder reflection ``I - w w^T / (1 + sqrt(p_j))``,
    ``w = sqrt(p) + e_j`` (``j = argmax p``, so ``w`` never cancels), maps ``e_j`` to
    ``-sqrt(p)``; its other ``C - 1`` columns are such a ``Q``. One column fewer per example
    than ``S`` (the all-ones direction, the null space of every cross-entropy output Hessian).
    """
    n, classes = p.shape
    root = p.sqrt()
    sqrt_h = torch.diag_embed(root) - p[:, :, None] * root[:, None, :]
    if classes < 2:
        return sqrt_h
    top = p.argmax(dim=1)
    w = root.clone()
    index = torch.arange(n, device=p.device)
    w[index, top] += 1
    reflection = torch.eye(classes, dtype=p.dtype, device=p.device) \
        - w[:, :, None] * w[:, None, :] / (1 + root[index, top])[:, None, None]
    keep = torch.ones(n, classes, dtype=torch.bool, device=p.device)
    keep[index, top] = False
    basis = reflection.transpose(1, 2)[keep].reshape(n, classes - 1, classes).transpose(1, 2)
    return torch.bmm(sqrt_h, basis)


def output_hessian_sqrt(loss_fn, outputs: Tensor, targets, scale: float,
                        loss_reduction: str | None = "mean",
                        examples: int | None = None) -> Tensor:
    """``S`` [n, C, K] with ``S_n S_n^T = scale * d^2 l_n / df_n^2`` per example.

    ``loss_fn(outputs, targets)`` is the batch mean (``loss_reduction="mean"``, default) or
    sum (``"sum"``) of per-example losses ``l_n``, so ``n`` times (mean) or once (sum) its
    Hessian's diagonal blocks are the per-example output Hessians; ``scale`` is usually
    ``1 / N`` for a mean over ``N`` examples. Plain ``nn.CrossEntropyLoss()`` (or
    ``F.cross_entropy``) uses the closed form ``diag(sqrt p) - p sqrt(p)^T`` restricted to
    the complement of its null vector ``sqrt p`` (``K = C - 1``: the output Hessian's rank);
    any other loss the eigendecomposition of its Hessian by ``torch.func`` (``K = C``,
    dims ``C <= 1,000``).

    Args:
        loss_fn: the batch-mean loss.
        outputs: model outputs [n, ...] (flattened to [n, C]); detached here.
        targets: the batch's targets.
        scale: non-negative factor (see above).
        loss_reduction: how ``loss_fn`` reduces over the batch, ``"mean"`` or ``"sum"``
            (:func:`~layerhessians.curvature.loss_reduction.data_loss_reduction`; ``None``:
            undecided, treated as a mean).
        examples: the number of examples the ``n`` loss rows belong to (``R = n / examples``
            consecutive rows each, e.g. token positions); default ``n``. A mean-reduced
            loss weighs each row ``1 / R`` within its example.

    Returns:
        Tensor [n, C, K] in the outputs' dtype (``K = C - 1`` for cross-entropy with
        ``C >= 2``, else ``K = C``).

    Raises:
        UserError: if the loss couples examples (off-diagonal Hessian blocks) or has a
            clearly negative output-Hessian eigenvalue (the GGN is then not ``V V^T``).
    """
    outputs = outputs.detach()
    n = outputs.shape[0]
    flat = outputs.reshape(n, -1)
    examples = n if examples is None else int(examples)
    weight = 1.0 if loss_reduction == "sum" else float(examples)
    if loss_reduction != "sum" and _is_plain_cross_entropy(loss_fn, targets) \
            and outputs.ndim == 2:
        return _cross_entropy_sqrt(torch.softmax(flat, dim=1)) * math.sqrt(scale * examples / n)
    classes = flat.shape[1]
    if n * classes > 4_000:
        raise UserError(f"the output Hessian of a {n} x {classes} batch is too large for "
                        "the general route: use smaller micro-batches")
    hessian = torch.func.hessian(
        lambda z: loss_fn(z.view_as(outputs), targets))(flat).reshape(n, classes, n, classes)
    index = torch.arange(n, device=flat.device)
    blocks = hessian[index, :, index, :] * (weight * scale)
    off = hessian.clone()
    off[index, :, index, :] = 0
    size = float(hessian.abs().max()) if hessian.numel() else 0.0
    if float(off.abs().max()) > 1e3 * torch.finfo(flat.dtype).eps * max(size, 1e-300):
        raise UserError("the loss couples examples (its output Hessian is not block-diagonal):"
                        " the Gram route needs a mean of per-example losses")
    blocks = (blocks + blocks.transpose(1, 2)) / 2
    values, vectors = torch.linalg.eigh(blocks)
    top = float(values.abs().max()) if values.numel() else 0.0
    if float(values.min()) < -_PSD_RTOL * max(top, 1e-300):
        raise UserError("the loss is not convex in the outputs (a negative output-Hessian "
                        "eigenvalue): its GGN is not V V^T; use layer_method='slq'")
    return vectors * values.clamp(min=0).sqrt()[:, None, :]


# ----------------------------------------------------------------------------- the layers


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the Gram route cannot treat ``module``'s weight, or ``None`` if it can."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        return None
    return f"{type(module).__name__} is not a Conv2d or Linear layer"


@dataclass
class LayerFactors:
    """One layer's factors of ``V``: its inputs and its output sensitivities.

    Attributes:
        name: the block's name (e.g. ``"conv1.weight"``).
        module: the ``nn.Linear`` or ``nn.Conv2d``.
        inputs: the layer's inputs over all examples, [N, ...] (detached).
        sensitivities: ``g`` [N, K, O, P]: the backpropagated columns ``s_{n,k}`` at the
            layer's output (``O`` channels or features, ``P`` positions), including the
            ``1/sqrt(N)`` of the mean loss.
    """

    name: str
    module: nn.Module
    inputs: Tensor
    sensitivities: Tensor

    @property
    def weight(self) -> Tensor:
        """The layer's weight parameter (the block)."""
        return self.module.weight

    @property
    def dim(self) -> int:
        """Number of weights ``O * I`` (the block's dimension)."""
        return self.module.weight.numel()

    @property
    def columns(self) -> int:
        """``N K``: the columns of ``V`` (the size of the Gram matrix)."""
        n, k = self.sensitivities.shape[:2]
        return n * k

    @property
    def positions(self) -> int:
        """``P``: output positions per example (``H_out * W_out`` for a Conv2d; for a Linear
        layer the product of its input's middle dimensions, 1 for [N, I] inputs)."""
        return self.sensitivities.shape[-1]

    def unfolded(self, start: int = 0, stop: int | None = None) -> Tensor:
        """``u`` [n, I, P]: the layer's inputs for examples ``start:stop``, unfolded so that
        the layer is ``weight.reshape(O, I) @ u`` at each position."""
        x = self.inputs[start:stop]
        module = self.module
        if isinstance(module, nn.Conv2d):
            return F.unfold(x, module.kernel_size, module.dilation, module.padding,
                            module.stride)
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)

    # -- costs
    def costs(self) -> dict[str, float]:
        """Multiply-add counts of the two Gram routes (``GRAM_METHODS``)."""
        n, k, o, p = self.sensitivities.shape
        i = self.dim // o
        nk = n * k
        if p == 1:
            factorised = nk ** 2 * o + n ** 2 * i + nk ** 2
        else:  # the lower triangle of example pairs
            factorised = n * (n + 1) // 2 * (p * p * i + k * o * p * p + k * k * o * p)
        return {"factorised": factorised,
                "materialised": nk * o * i * p + nk * (nk + 1) // 2 * o * i}

    def method(self) -> str:
        """The cheaper Gram route by :meth:`costs`."""
        costs = self.costs()
        if self.dim <= self.columns:
            return "materialised"
        return min(GRAM_METHODS, key=costs.get)

    def gram_bytes(self) -> int:
        """Bytes of the stored factors plus the Gram (or dense block) matrix."""
        size = self.sensitivities.element_size()
        side = min(self.dim, self.columns)
        return (self.sensitivities.numel() + self.inputs.numel()) * size + side * side * 8

    # -- the matrices
    def columns_matrix(self, out_start: int = 0, out_stop: int | None = None) -> Tensor:
        """``V^T`` rows for output channels ``out_start:out_stop``: [N K, o, I]."""
        g = self.sensitivities[:, :, out_start:out_stop]
        u = self.unfolded()
        n, k, o, p = g.shape
        return torch.bmm(g.reshape(n, k * o, p), u.transpose(1, 2)).reshape(n * k, o, -1)

    def gram(self, method: str | None = None) -> Tensor:
        """``V^T V`` [N K, N K] in the model's dtype, by ``method`` (default :meth:`method`)."""
        method = self.method() if method is None else method
        check_choice(method, GRAM_METHODS, "method")
        g = self.sensitivities
        n, k, o, p = g.shape
        nk = n * k
        item = g.element_size()
        if method == "materialised":
            i = self.dim // o
            chunk = max(1, min(o, _CHUNK_BYTES // max(1, nk * i * item)))
            gram = g.new_zeros(nk, nk)
            for start in range(0, o, chunk):
                v = self.columns_matrix(start, start + chunk).reshape(nk, -1)
                _add_outer(gram, v)
            return _symmetrised(gram)
        u = self.unfolded()  # [N, I, P]
        if p == 1:  # Linear layers: (u_n . u_m) (g_{n,k} . g_{m,l})
            ur = u[:, :, 0]
            gr = g.reshape(nk, o)
            return ((gr @ gr.T).view(n, k, n, k) * (ur @ ur.T)[:, None, :, None]
                    ).reshape(nk, nk)
        # rows of examples a in [start, stop) against examples m < stop (lower triangle):
        # U[a,p,m,q] = u_{a,p} . u_{m,q};  S[a,k,o,m,q] = sum_p g[a,k,o,p] U[a,p,m,q];
        # Gram[(a,k),(m,l)] = sum_{o,q} S[a,k,o,m,q] g[m,l,o,q]
        ut = u.transpose(1, 2)  # [N, P, I]
        um = u.permute(1, 0, 2)  # [I, N, P]
        gram = g.new_zeros(nk, nk)
        rows = max(1, min(n, _CHUNK_BYTES // max(1, 2 * k * o * n * p * item)))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            c = stop - start
            uu = (ut[start:stop].reshape(c * p, -1) @ um[:, :stop].reshape(-1, stop * p))
            s = torch.bmm(g[start:stop].reshape(c, k * o, p), uu.view(c, p, stop * p))
            s = s.view(c, k, o, stop, p).permute(3, 0, 1, 2, 4).reshape(stop, c * k, o * p)
            block = torch.bmm(s, g[:stop].reshape(stop, k, o * p).transpose(1, 2))
            gram[start * k:stop * k, :stop * k] = block.permute(1, 0, 2).reshape(c * k, -1)
        return _symmetrised(gram)

    def dense_block(self) -> Tensor:
        """``V V^T`` [dim, dim]: the GGN block itself (for ``dim`` up to a few thousand), in
        the Linear layout ``[out, in]`` (a transposed Linear's block permuted: the same
        eigenvalues).

        With one position (a Linear layer on [N, I] inputs) as the Kronecker sum
        ``sum_n (sum_k g_{n,k} g_{n,k}^T) (x) (u_n u_n^T)`` (``N O^2 I^2`` multiply-adds),
        else from the materialised ``V``."""
        g = self.sensitivities
        n, k, o, p = g.shape
        if p == 1:
            u = self.unfolded()[:, :, 0]  # [N, I]
            outer_g = torch.einsum("nka,nkb->nab", g[..., 0], g[..., 0]).reshape(n, o * o)
            outer_u = (u[:, :, None] * u[:, None, :]).reshape(n, -1)
            i = u.shape[1]
            return (outer_g.T @ outer_u).view(o, o, i, i).transpose(1, 2).reshape(o * i, o * i)
        v = self.columns_matrix(0, o).reshape(self.columns, -1)
        gram = g.new_zeros(v.shape[1], v.shape[1])
        _add_outer(gram, v.T)
        return _symmetrised(gram)

    def coefficients(self, vector: Tensor) -> Tensor:
        """``V^T v`` [N, K] for a 1-D ``vector`` [dim] (in the factors' dtype)."""
        g = self.sensitivities
        n, k, o, p = g.shape
        w = vector.to(g).view_as(self.weight)
        module, x = self.module, self.inputs
        if is_transposed_linear(module):  # [in, out]: the Linear weight is its transpose
            w = w.T
        if isinstance(module, nn.Conv2d):  # the layer's output change, by the layer itself
            jv = F.conv2d(x, w, None, module.stride, module.padding, module.dilation)
            jv = jv.reshape(n, o, p)
        else:
            jv = (x @ w.T).reshape(n, p, o).transpose(1, 2)
        return torch.bmm(g.reshape(n, k, o * p), jv.reshape(n, o * p, 1))[:, :, 0]

    def combine(self, coefficients: Tensor) -> Tensor:
        """``V c`` [dim] for coefficients ``c`` [N, K] (in the factors' dtype)."""
        g = self.sensitivities
        n, k, o, p = g.shape
        back = torch.bmm(coefficients.to(g)[:, None, :], g.reshape(n, k, o * p))
        module, x = self.module, self.inputs
        if isinstance(module, nn.Conv2d):  # the layer's weight gradient for output grads
            out = torch.nn.grad.conv2d_weight(
                x, self.weight.shape, back.reshape(n, o, *self._out_size()), module.stride,
                module.padding, module.dilation)
            return out.reshape(-1)
        back = back.reshape(n, o, p).transpose(1, 2).reshape(n * p, o)
        grad = back.T @ x.reshape(n * p, -1)  # [out, in]
        return (grad.T if is_transposed_linear(module) else grad).reshape(-1)

    def _out_size(self) -> tuple[int, int]:
        """The conv layer's output height and width."""
        module, (h, w) = self.module, self.inputs.shape[-2:]
        size = []
        for extent, kernel, stride, pad, dil in zip(
                (h, w), module.kernel_size, module.stride, module.padding, module.dilation):
            size.append((extent + 2 * pad - dil * (kernel - 1) - 1) // stride + 1)
        return size[0], size[1]

    def matvec(self, vector: Tensor) -> Tensor:
        """``V V^T v`` for a 1-D ``vector`` [dim] (the GGN block's product from the factors)."""
        return self.combine(self.coefficients(vector)).to(vector.dtype)

    def bias_gram(self) -> Tensor:
        """``V_b^T V_b`` [N K, N K] for the layer's bias (``V_b`` columns ``sum_p g``)."""
        s = self.sensitivities.sum(dim=3).reshape(self.columns, -1)
        return s @ s.T


def _add_outer(gram: Tensor, v: Tensor) -> None:
    """``gram += v v^T`` in its lower triangle at least (the upper one may be stale).

    On the CPU in float32/float64 by BLAS ``syrk`` (half the multiply-adds of a matrix
    product, one triangle), writing into ``gram`` in place; elsewhere by ``addmm_``."""
    syrk = {torch.float32: blas.ssyrk, torch.float64: blas.dsyrk}.get(v.dtype)
    if gram.device.type != "cpu" or syrk is None or not gram.is_contiguous():
        gram.addmm_(v, v.T)
        return
    v = v.contiguous()
    target = gram.numpy().T  # Fortran order: its upper triangle is gram's lower one
    # v^T as a Fortran-ordered [d, n] array: syrk(trans=1) gives (v^T)^T v^T = v v^T
    result = syrk(1.0, v.numpy().T, beta=1.0, c=target, trans=1, lower=0, overwrite_c=1)
    if not np.shares_memory(result, target):
        target[...] = result


def _symmetrised(gram: Tensor) -> Tensor:
    """``gram`` with its upper triangle copied from its lower one (in place)."""
    upper = torch.triu_indices(*gram.shape, offset=1, device=gram.device)
    gram[upper[0], upper[1]] = gram[upper[1], upper[0]]
    return gram


# ----------------------------------------------------------------------------- one pass


def _owner_modules(model: nn.Module, blocks: "OrderedDict[str, Tensor]") -> dict:
    owners = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            owners.setdefault(id(weight), module)
    return {name: owners.get(id(param)) for name, param in blocks.items()}


def _examples_of(outputs: Tensor, x: Tensor) -> int:
    """The number of examples of a batch whose outputs have ``R`` rows per example.

    Raises:
        UserError: the outputs' rows are not whole blocks per input example.
    """
    examples = int(x.shape[0])
    if not torch.is_tensor(outputs) or outputs.ndim == 0 or outputs.shape[0] % examples:
        raise UserError(f"the model's outputs have {outputs.shape[0] if torch.is_tensor(outputs) and outputs.ndim else 'no'} "
                        f"rows for {examples} examples: the exact route needs one row, or R "
                        "consecutive rows (e.g. token positions), per example; return "
                        "outputs [B, T, V] and flatten them in loss_fn")
    return examples


def _per_example_columns(sqrt_h: Tensor, examples: int) -> Tensor:
    """``S`` [n, C, K] of ``n = R * examples`` loss rows as per-example columns [examples,
    R C, R K]: row ``t`` of an example gets its own ``K`` columns (zero on its other rows),
    so that no two rows' columns are summed (rows ``n*R .. n*R + R - 1`` are example ``n``'s)."""
    n, c, k = sqrt_h.shape
    per = n // examples
    if per == 1:
        return sqrt_h
    s = sqrt_h.reshape(examples, per, c, k)
    eye = torch.eye(per, dtype=s.dtype, device=s.device)
    return torch.einsum("brck,rs->brcsk", s, eye).reshape(examples, per * c, per * k)


def _backward_columns(outputs: Tensor, targets_of: list[Tensor], sqrt_h: Tensor) -> list:
    """Gradients of ``outputs . s_k`` w.r.t. ``targets_of`` for every column ``k``:
    per target a tensor [K, *target.shape]; one vmapped backward, or a loop over ``k``."""
    n = outputs.shape[0]
    columns = sqrt_h.permute(2, 0, 1).reshape(sqrt_h.shape[2], *outputs.shape).contiguous()
    try:
        grads = torch.autograd.grad(outputs, targets_of, columns, retain_graph=True,
                                    is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one backward per column
        per_column = [torch.autograd.grad(outputs, targets_of, column, retain_graph=True,
                                          allow_unused=True) for column in columns]
        grads = [None if parts[0] is None else torch.stack(parts)
                 for parts in zip(*per_column)]
    del n
    return list(grads)


def gram_factors(model: nn.Module, loss_fn, data, blocks, micro_batch_size: int | None = None
                 ) -> "OrderedDict[str, LayerFactors]":
    """Every block's :class:`LayerFactors` from one forward and one batched backward pass per
    micro-batch (forward hooks capture each layer's input and output).

    Args:
        model: the network (run in eval mode on cloned buffers; left unchanged).
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)`` of per-example losses.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (the mean over all).
        blocks: ``{name: weight}`` of Conv2d/Linear weights (each module called once).
        micro_batch_size: cut the batches into micro-batches of at most this many examples.

    Returns:
        ``OrderedDict`` ``{name: LayerFactors}`` in the order of ``blocks``.

    Raises:
        UserError: for a block that is not a supported layer's weight, a layer called more
            than once per forward pass, or a layer output changed in place.
    """
    from layerhessians.curvature.memory import split_batches  # memory imports operators

    blocks = block_parameters(model, blocks)
    owners = _owner_modules(model, blocks)
    for name, module in owners.items():
        reason = "not the weight of a module" if module is None else unsupported_reason(module)
        if reason is not None:
            raise UserError(f"block {name!r} cannot use the Gram route: {reason}")
    first = next(iter(blocks.values()))
    dtype, device = first.dtype, first.device
    pairs = split_batches(as_batches(data), micro_batch_size)
    pairs = [(x.to(device=device, dtype=dtype if x.is_floating_point() else None),
              y.to(device=device, dtype=dtype if y.is_floating_point() else None)
              if torch.is_tensor(y) else y) for x, y in pairs]
    total = sum(int(x.shape[0]) for x, _ in pairs)
    inputs = {name: [] for name in blocks}
    sens = {name: [] for name in blocks}
    with engine_context(model, "eval"):
        reduction = data_loss_reduction(loss_fn, model, pairs)
        for x, y in pairs:
            seen = {name: [] for name in blocks}
            hooks = [module.register_forward_hook(
                lambda mod, args, out, name=name, seen=seen: seen[name].append((args[0], out))
                and None)
                for name, module in owners.items()]
            try:
                outputs = call_model(model, x)
            finally:
                for hook in hooks:
                    hook.remove()
            for name, calls in seen.items():
                if len(calls) != 1:
                    raise UserError(f"layer {name!r} ran {len(calls)} times in one forward pass:"
                                    " the Gram route needs each layer used exactly once")
                if calls[0][1]._version != 0:
                    raise UserError(f"the output of layer {name!r} is changed in place: "
                                    "use out-of-place activations (inplace=False)")
            sqrt_h = _per_example_columns(
                output_hessian_sqrt(loss_fn, outputs, y, 1.0 / total, reduction,
                                    _examples_of(outputs, x)), int(x.shape[0]))
            layer_outputs = [seen[name][0][1] for name in blocks]
            grads = _backward_columns(outputs, layer_outputs, sqrt_h)
            for name, grad, out in zip(blocks, grads, layer_outputs):
                n = out.shape[0]
                if grad is None:
                    grad = out.new_zeros(sqrt_h.shape[2], *out.shape)
                module = owners[name]
                o = module.nf if is_transposed_linear(module) else module.weight.shape[0]
                if isinstance(module, nn.Conv2d):
                    g = grad.reshape(grad.shape[0], n, o, -1)
                else:  # Linear: [K, N, *, O] -> positions last
                    g = grad.reshape(grad.shape[0], n, -1, o).transpose(2, 3)
                sens[name].append(g.transpose(0, 1).detach())
                inputs[name].append(seen[name][0][0].detach())
            del outputs, grads, layer_outputs
    return OrderedDict(
        (name, LayerFactors(name, owners[name], torch.cat(inputs[name]),
                            torch.cat(sens[name]).contiguous()))
        for name in blocks)


def factor_bytes(model: nn.Module, data, blocks
                 ) -> "tuple[OrderedDict[str, int], dict[str, int]]":
    """Estimated bytes of every block's :class:`LayerFactors` plus its Gram matrix, and how
    many times each block's layer runs per forward pass, from a forward pass of two
    examples (no gradients)."""
    blocks = block_parameters(model, blocks)
    owners = _owner_modules(model, blocks)
    pairs = as_batches(data)
    total = sum(int(x.shape[0]) for x, _ in pairs)
    first = next(iter(blocks.values()))
    x = pairs[0][0][:2].to(device=first.device, dtype=first.dtype
                           if pairs[0][0].is_floating_point() else None)
    sizes, calls, count = {}, {}, x.shape[0]

    def record(name, args, out) -> None:  # a hook returning a value replaces the output
        sizes.setdefault(name, (args[0].numel() // count, out.numel() // count))
        calls[name] = calls.get(name, 0) + 1

    hooks = [module.register_forward_hook(
        lambda mod, args, out, name=name: record(name, args, out))
        for name, module in owners.items() if module is not None]
    try:
        classes = engine_forward(model, "eval", x).numel() // count
    finally:
        for hook in hooks:
            hook.remove()
    item = first.element_size()
    result = OrderedDict()
    for name, param in blocks.items():
        size_in, size_out = sizes.get(name, (0, 0))
        side = min(param.numel(), total * classes)
        result[name] = total * (size_in + classes * size_out) * item + side * side * 8
    return result, {name: calls.get(name, 0) for name in blocks}


def block_parameters(model: nn.Module, blocks) -> "OrderedDict[str, nn.Parameter]":
    """``{name: weight}``: ``blocks`` (``{name: parameter or [parameter]}``, e.g. from
    :func:`~layerhessians.curvature.blocks.layer_blocks`) with every block a single trainable
    parameter of ``model``; :class:`UserError` otherwise."""
    result = OrderedDict()
    for name, params in blocks.items():
        chosen, _ = resolve_params(model, params)
        if len(chosen) != 1:
            raise UserError(f"block {name!r} has {len(chosen)} parameters: the Gram route "
                            "treats one Conv2d/Linear weight per block")
        result[name] = chosen[0]
    return result
