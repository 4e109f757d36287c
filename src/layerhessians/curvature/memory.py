"""Memory of the curvature engine: budgets in bytes and the first-order graphs' share.

- :func:`~layerhessians.settings.parse_budget` (re-exported) / :func:`memory_budget`:
  ``"8GB"``, ``"512MiB"``, ``"40%"`` (of the free memory) or ``None``/``"auto"`` (the
  default: 80% of a GPU's free memory, 50% of the host's, divided among the processes
  sharing it) -> bytes.
- :func:`measure_graph_cost`: the bytes a kept first-order graph costs, per example and per
  batch, measured by building one small graph with ``saved_tensors_hooks``.
- :func:`plan_micro_batches`: the micro-batch size and whether the graphs of all
  micro-batches are kept (``reuse_graph``) or rebuilt for every product (same numbers; a
  Lanczos step then builds each micro-batch's graph once for the full operator and all layer
  blocks together, not once per operator), so that the peak fits the budget.

The Lanczos bases and the plan of a whole spectra computation are spectra concepts:
:mod:`layerhessians.spectra.plan`.

Micro-batching never changes the operator (products are sums over examples), except for a
batch-dependent model (batch norm using batch statistics, or a layer that mixes examples:
:func:`~layerhessians.curvature.coupling.batch_coupling`): then the data are not split
(:func:`splitting_changes_operator`), and an explicit micro-batch size is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.graph import PER_EXAMPLE_GRADIENTS
from layerhessians.curvature.kinds import curvature_graph
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError
from layerhessians.settings import parse_budget

__all__ = [
    "GraphCost",
    "available_memory",
    "default_budget",
    "format_bytes",
    "free_memory",
    "measure_graph_cost",
    "memory_budget",
    "parse_budget",
    "plan_micro_batches",
    "split_batches",
    "splitting_changes_operator",
]

#: default budget: this fraction of the free memory of a GPU / of the host
GPU_FRACTION, HOST_FRACTION = 0.8, 0.5
#: examples in the graph built to measure the cost per example
PROBE_EXAMPLES = 8


def format_bytes(size: float | None) -> str:
    """``1.5 GiB``, ``12.0 MiB``...; ``unlimited`` for ``None``."""
    if size is None:
        return "unlimited"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), or None."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def free_memory(device) -> int | None:
    """Free bytes on ``device``: the GPU's free memory, or the host's ``MemAvailable`` capped
    by a container's cgroup limit; ``None`` when unknown."""
    device = torch.device(device)
    free = available_memory(device)
    if device.type != "cuda":
        capped = _cgroup_free()
        if capped is not None:
            free = capped if free is None else min(free, capped)
    return free


def default_budget(device, sharing: int = 1) -> int | None:
    """The default budget on ``device``: 80% (GPU) or 50% (host) of its free memory
    (:func:`free_memory`), divided by ``sharing`` (processes on the same memory); ``None``
    when the free memory is unknown."""
    device = torch.device(device)
    free = free_memory(device)
    if free is None:
        return None
    fraction = GPU_FRACTION if device.type == "cuda" else HOST_FRACTION
    return int(fraction * free / max(1, int(sharing)))


def memory_budget(budget=None, device="cpu", sharing: int = 1) -> int | None:
    """The budget in bytes (``None``: unknown, treated as unlimited) for a budget given as in
    :func:`parse_budget`; a percentage and the default divide the free memory of ``device``
    among ``sharing`` processes."""
    parsed = parse_budget(budget)
    if parsed is None:
        return default_budget(device, sharing)
    kind, amount = parsed
    if kind == "bytes":
        return int(amount)
    free = free_memory(device)
    return None if free is None else int(amount * free / max(1, int(sharing)))


# ----------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class GraphCost:
    """Memory of a kept first-order graph: ``per_batch + per_example * n`` bytes for a
    batch of ``n`` examples (``per_batch``: the gradients kept per batch, ``dim`` numbers
    for the Hessian, twice for the residual; ``per_example``: saved activations)."""

    per_example: int
    per_batch: int

    def of(self, examples: int) -> int:
        """Bytes of the graph for a batch of ``examples`` examples: ``per_batch + per_example * n``."""
        return self.per_batch + self.per_example * int(examples)


def _storage_key(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr()), storage.nbytes()


def measure_graph_cost(model: nn.Module, loss_fn, inputs: torch.Tensor, targets,
                       kind: str = "hessian", bn_mode: str = "eval",
                       probe: int = PROBE_EXAMPLES) -> GraphCost:
    """Build the first-order graph of ``model`` on the first ``probe`` examples of
    ``inputs``/``targets`` and count the bytes it keeps: the tensors autograd saves (distinct
    storages other than the parameters and the inputs, divided by the examples) and the
    gradients kept per batch (on a GPU: the allocator's growth while building). The model is
    left unchanged; the graph is freed."""
    count = max(1, min(int(probe), int(inputs.shape[0])))
    params, _ = resolve_params(model)
    graph = curvature_graph(model, loss_fn, (inputs[:count], targets[:count]), params, kind,
                            bn_mode)
    shared = {_storage_key(p)[0] for p in params}
    shared |= {_storage_key(t)[0] for t in (graph.inputs[0], inputs) if torch.is_tensor(t)}
    saved = {}

    def pack(tensor):
        key, size = _storage_key(tensor)
        if key not in shared:
            saved[key] = size
        return tensor

    cuda = graph.device.type == "cuda"
    if cuda:  # the allocator knows exactly (hooks may miss saves made on backward threads)
        torch.cuda.synchronize(graph.device)
        before = torch.cuda.memory_allocated(graph.device)
        graph.build()
        torch.cuda.synchronize(graph.device)
        allocated = torch.cuda.memory_allocated(graph.device) - before
    elif PER_EXAMPLE_GRADIENTS in graph.needs:
        # torch.func refuses saved-tensor hooks; its activations are freed once the
        # per-example gradients (counted below) are computed
        graph.build()
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            graph.build()
    (batch,) = graph.built
    per_batch, kept_per_example = batch.kept_bytes()
    if cuda:
        activations = max(0, allocated - per_batch)
    else:
        activations = sum(saved.values()) + kept_per_example
    graph.release()
    return GraphCost(per_example=int(math.ceil(activations / count)), per_batch=int(per_batch))


def splitting_changes_operator(model: nn.Module, bn_mode: str, inputs=None) -> bool:
    """Whether splitting the data changes the operator: the one decision of
    :func:`~layerhessians.curvature.coupling.batch_coupling` (batch norm using batch
    statistics; other layers probed on ``inputs`` [n, ...] when given)."""
    return batch_coupling(model, bn_mode, inputs) is not None


def split_batches(pairs, micro_batch_size: int | None, model: nn.Module | None = None,
                  bn_mode: str = "eval") -> list:
    """``[(x, y), ...]`` with every batch cut into consecutive micro-batches of at most
    ``micro_batch_size`` examples (views, no copies); ``None`` leaves them as they are.

    With ``model`` given, a cut that would change the operator (:func:`splitting_changes_operator`,
    probed on the first batch to cut) is refused.

    Raises:
        UserError: targets without one row per example, or a batch-dependent ``model``.
    """
    if micro_batch_size is None:
        return list(pairs)
    if model is not None:
        cut = [x for x, _ in pairs if x.shape[0] > int(micro_batch_size)]
        if cut and splitting_changes_operator(model, bn_mode, cut[0]):
            raise UserError(f"micro_batch_size={micro_batch_size} would cut a batch, but the "
                            "model's outputs depend on the other examples of the batch "
                            f"({batch_coupling(model, bn_mode, cut[0])}), so micro-batches "
                            "would change the operator: drop micro_batch_size or use "
                            "bn_mode 'eval'")
    size = int(micro_batch_size)
    out = []
    for x, y in pairs:
        if x.shape[0] <= size:
            out.append((x, y))
            continue
        ys = y.split(size) if torch.is_tensor(y) and y.ndim and y.shape[0] == x.shape[0] \
            else None
        if ys is None:
            raise UserError("micro-batching needs targets with one row per example; pass "
                            "micro_batch_size=None to keep the batches as given")
        out.extend(zip(x.split(size), ys))
    return out


def _count_batches(sizes: Sequence[int], micro: int) -> int:
    return sum(-(-int(n) // micro) for n in sizes)


def _reuse_peak(sizes, micro, cost: GraphCost) -> int:
    # every micro-batch's graph kept, plus the transient of one product (~ one micro-batch)
    largest = min(max(sizes), micro)
    return _count_batches(sizes, micro) * cost.per_batch + cost.per_example * \
        (sum(sizes) + largest)


def _recompute_peak(sizes, micro, cost: GraphCost) -> int:
    # one graph alive at a time, plus the transient of its product
    largest = min(max(sizes), micro)
    return cost.per_batch + 2 * cost.per_example * largest


def plan_micro_batches(sizes: Sequence[int], cost: GraphCost, budget: int | None,
                       micro_batch_size: int | None = None, reuse_graph="auto",
                       splittable: bool = True) -> tuple[int, bool, int]:
    """``(micro_batch_size, reuse_graph, peak_bytes)`` for batches of ``sizes`` examples.

    ``micro_batch_size=None`` chooses the largest size whose graphs, all kept, fit the
    budget (the fastest choice); if none does, the largest whose single graph fits, rebuilt
    for every product. ``reuse_graph="auto"`` keeps the graphs when they fit. An unknown
    budget (``None``) keeps one batch and its graph. ``splittable=False`` (see
    :func:`splitting_changes_operator`) forbids cutting a batch.
    """
    sizes = [int(n) for n in sizes]
    largest = max(sizes)
    if micro_batch_size is not None:
        micro_batch_size = int(micro_batch_size)
        if micro_batch_size < 1:
            raise UserError(f"the Hessian micro-batch size must be >= 1, got {micro_batch_size}")
        if not splittable and micro_batch_size < largest:
            raise UserError("the model's outputs depend on the other examples of the batch "
                            "(batch norm using batch statistics, or a layer that mixes "
                            "examples), so micro-batches would change the operator: drop "
                            "the micro-batch size or use bn_mode 'eval'")
        micro_batch_size = min(micro_batch_size, largest)
    if reuse_graph != "auto" and not isinstance(reuse_graph, bool):
        raise UserError(f"reuse_graph must be True, False or 'auto'; got {reuse_graph!r}")
    if budget is None:
        micro = micro_batch_size or largest
        reuse = True if reuse_graph == "auto" else reuse_graph
    elif micro_batch_size is not None or not splittable:
        micro = micro_batch_size or largest
        reuse = _reuse_peak(sizes, micro, cost) <= budget if reuse_graph == "auto" \
            else reuse_graph
    else:
        micro, reuse = None, reuse_graph
        if reuse_graph in ("auto", True):
            micro = next((m for m in range(largest, 0, -1)
                          if _reuse_peak(sizes, m, cost) <= budget), None)
            reuse = True if micro is not None else reuse_graph
        if micro is None:  # recompute: the peak grows with m
            spare = budget - cost.per_batch
            micro = max(1, min(largest, spare // max(1, 2 * cost.per_example)))
            reuse = False if reuse_graph == "auto" else reuse_graph
    peak = _reuse_peak(sizes, micro, cost) if reuse else _recompute_peak(sizes, micro, cost)
    return int(micro), bool(reuse), int(peak)
