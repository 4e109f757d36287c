"""Memory planning for the spectra engine: one budget in bytes shared by the Lanczos bases
and the first-order graphs.

- :func:`parse_budget` / :func:`memory_budget`: ``"8GB"``, ``"512MiB"``, ``"40%"`` (of the
  free memory) or ``None``/``"auto"`` (the default: 80% of a GPU's free memory, 50% of the
  host's, divided among the processes sharing it) -> bytes.
- :func:`basis_bytes` (the one formula for the Lanczos bases: ``min(steps, dim) x dim x 8``
  bytes per concurrent recurrence), :func:`choose_reorthogonalize` (``reorthogonalize="auto"``
  is full re-orthogonalisation when the bases take at most :data:`BASIS_SHARE` of the budget,
  else none, the original method's behaviour, with a logged warning) and
  :func:`check_basis_fits` (a requested basis larger than :data:`BASIS_REFUSE_SHARE` of the
  free memory is refused).
- :func:`measure_graph_cost`: the bytes a kept first-order graph costs, per example and per
  batch, measured by building one small graph with ``saved_tensors_hooks``.
- :func:`plan_micro_batches` / :func:`plan_memory`: the micro-batch size and whether the
  graphs of all micro-batches are kept (``reuse_graph``) or rebuilt for every product
  (same numbers; a Lanczos step then builds each micro-batch's graph once for the full
  operator and all layer blocks together, not once per operator), so that the peak fits
  the budget.

Micro-batching never changes the operator (products are sums over examples), except for a
batch-dependent model (batch norm using batch statistics, or a layer that mixes examples:
:func:`~layerhessians.curvature.coupling.batch_coupling`): then the data are not split
(:func:`splitting_changes_operator`), and an explicit micro-batch size is refused.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerhessians.curvature.batches import as_batches
from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.graph import PER_EXAMPLE_GRADIENTS
from layerhessians.curvature.kinds import curvature_graph
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError

__all__ = [
    "BASIS_REFUSE_SHARE",
    "BASIS_SHARE",
    "GraphCost",
    "MemoryPlan",
    "basis_bytes",
    "available_memory",
    "basis_warning",
    "check_basis_fits",
    "choose_reorthogonalize",
    "default_budget",
    "format_bytes",
    "free_memory",
    "measure_graph_cost",
    "memory_budget",
    "parse_budget",
    "plan_memory",
    "plan_micro_batches",
    "split_batches",
    "splitting_changes_operator",
]

log = logging.getLogger("layerhessians.spectra")

#: default budget: this fraction of the free memory of a GPU / of the host
GPU_FRACTION, HOST_FRACTION = 0.8, 0.5
#: the Lanczos bases may take at most this share of the budget; the graphs get the rest
BASIS_SHARE = 0.5
#: bases asked for explicitly are refused above this share of the free memory
BASIS_REFUSE_SHARE = 0.9
#: examples in the graph built to measure the cost per example
PROBE_EXAMPLES = 8

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def format_bytes(size: float | None) -> str:
    """``1.5 GiB``, ``12.0 MiB``...; ``unlimited`` for ``None``."""
    if size is None:
        return "unlimited"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def parse_budget(value) -> tuple[str, float] | None:
    """``None`` for ``None``/``"auto"``, ``("bytes", n)`` or ``("fraction", f)``.

    Accepted: an integer or float (bytes), ``"NUMBER UNIT"`` with UNIT in B, KB, MB, GB, TB
    (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), and ``"P%"`` (a percentage of
    the free memory, 0 < P <= 100). Anything else raises :class:`UserError`.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise UserError(f"memory budget must be a size such as 8GB, 512MiB or 40%, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), "b"
    else:
        match = _BUDGET.match(str(value))
        if not match:
            raise UserError(f"memory budget {value!r} is not a size: write e.g. 8GB, 512MiB, "
                            "40% (of the free memory) or auto")
        number, unit = float(match.group(1)), match.group(2).lower() or "b"
    if unit == "%":
        if not 0 < number <= 100:
            raise UserError(f"memory budget {value!r}: a percentage must be in (0, 100]")
        return ("fraction", number / 100)
    if unit not in _UNITS:
        raise UserError(f"memory budget {value!r}: unknown unit {unit!r}; use B, KB, MB, GB, "
                        "TB, KiB, MiB, GiB, TiB or %")
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise UserError(f"memory budget {value!r} must be at least 1 byte")
    return ("bytes", float(size))


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


# ----------------------------------------------------------------------------- Lanczos bases
def basis_bytes(dims: Sequence[int], iterations: int) -> int:
    """Bytes of the float64 Lanczos bases of concurrent recurrences on operators of
    dimensions ``dims``: ``sum_d min(iterations, d) * d * 8``."""
    return int(sum(min(int(iterations), int(d)) * int(d) * 8 for d in dims))


def check_basis_fits(operators: Sequence, iterations: int) -> None:
    """Refuse Lanczos bases (:func:`basis_bytes` of the operators on each device) larger than
    :data:`BASIS_REFUSE_SHARE` of that device's free memory (:func:`available_memory`).

    Raises:
        UserError: the bases do not fit; the message says to pass reorthogonalize=False or
            fewer iterations.
    """
    dims_on = {}
    for op in operators:
        device = torch.device(getattr(op, "device", "cpu"))
        dims_on.setdefault(device, []).append(int(op.dim))
    for device, dims in dims_on.items():
        size = basis_bytes(dims, iterations)
        free = available_memory(device)
        if free is not None and size > BASIS_REFUSE_SHARE * free:
            raise UserError(
                f"full re-orthogonalisation needs {size / 2**30:.1f} GiB for the Lanczos "
                f"bases (steps x parameters x 8 bytes) but {device} has {free / 2**30:.1f} "
                "GiB free: pass reorthogonalize=False or fewer iterations"
            )


def _reorthogonalize_value(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise UserError(f"reorthogonalize must be True, False or 'auto'; got {value!r}")


def basis_warning(dims: Sequence[int], iterations: int, budget: int | None) -> str:
    """The message logged when ``"auto"`` turns re-orthogonalisation off."""
    return (f"full re-orthogonalisation would need {format_bytes(basis_bytes(dims, iterations))} "
            f"for the Lanczos bases ({iterations} steps x {sum(int(d) for d in dims):,} "
            f"parameters x 8 bytes), more than {round(100 * BASIS_SHARE)}% of the memory "
            f"budget {format_bytes(budget)}: running without it (the original method; ghost "
            "copies of converged eigenvalues may appear); raise --memory-budget or lower "
            "--hessian-iterations to keep it")


def choose_reorthogonalize(requested, dims: Sequence[int], iterations: int,
                           budget: int | None, warn: bool = True) -> bool:
    """Resolve ``reorthogonalize``: ``True``/``False`` as given; ``"auto"``: ``True`` when
    :func:`basis_bytes` ``<= BASIS_SHARE * budget`` (or the budget is unknown), else
    ``False`` with a logged warning if ``warn`` (the recurrences then keep two vectors each)."""
    requested = _reorthogonalize_value(requested)
    if requested != "auto":
        return requested
    if budget is None or basis_bytes(dims, iterations) <= BASIS_SHARE * budget:
        return True
    if warn:
        log.warning(basis_warning(dims, iterations, budget))
    return False


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


@dataclass(frozen=True)
class MemoryPlan:
    """How one spectra computation uses memory (all sizes in bytes, per process).

    ``budget``: for bases and graphs (``None``: unknown, unlimited); ``reorthogonalize`` and
    ``basis_bytes`` (0 without re-orthogonalisation); ``micro_batch_size`` (examples per
    graph) and ``reuse_graph``; ``graph_bytes``: the expected peak of the graphs;
    ``cost``: the measured :class:`GraphCost`; ``examples``: local examples; ``fits``:
    whether bases + graphs fit the budget (when not, the smallest plan is used anyway).
    """

    budget: int | None
    reorthogonalize: bool
    basis_bytes: int
    micro_batch_size: int
    reuse_graph: bool
    graph_bytes: int
    cost: GraphCost
    examples: int
    fits: bool = True
    notes: tuple = field(default=())

    def summary(self) -> str:
        """One line for the log: the budget, the Lanczos bases, the micro-batches and the graphs."""
        graphs = ("kept for all products" if self.reuse_graph else "rebuilt for every product")
        return (f"memory budget {format_bytes(self.budget)}: Lanczos "
                f"{'full re-orthogonalisation' if self.reorthogonalize else 'without re-orthogonalisation'}"
                f" ({format_bytes(self.basis_bytes)} of bases); {self.examples} Hessian "
                f"examples in micro-batches of {self.micro_batch_size}, graphs {graphs} "
                f"(~{format_bytes(self.graph_bytes)})")


def plan_memory(model: nn.Module, loss_fn, data, *, dims: Sequence[int], iterations: int,
                kind: str = "hessian", bn_mode: str = "eval", reorthogonalize="auto",
                micro_batch_size: int | None = None, reuse_graph="auto", budget=None,
                sharing: int = 1, cost: GraphCost | None = None,
                warn: bool = True) -> MemoryPlan:
    """Plan one spectra computation on ``data`` (this process's part).

    Args:
        model: the network (left unchanged; its device decides the default budget).
        loss_fn: batch mean or sum of per-example losses, as in
            :func:`~layerhessians.curvature.kinds.hessian_operator`.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (this process's part).
        dims: dimensions of the operators run concurrently (full and blocks).
        iterations: Lanczos steps (0: no bases, e.g. for products alone).
        kind: the curvature kind (``"hessian"``, ``"ggn"``, ...) whose graph is measured.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).
        reorthogonalize: ``True``, ``False`` or ``"auto"`` (:func:`choose_reorthogonalize`).
        micro_batch_size: examples per graph, or ``None`` to choose.
        reuse_graph: ``True``, ``False`` or ``"auto"``.
        budget: bytes (int) or a value for :func:`memory_budget` (``None``: the default).
        sharing: processes sharing the device's memory (for the default and percentages).
        cost: a known :class:`GraphCost` (else measured on the first batch).
        warn: log the notes (re-orthogonalisation off, budget exceeded) as warnings.

    Returns:
        The :class:`MemoryPlan` (budget and sizes in bytes; ``fits=False`` when even the
        smallest plan exceeds the budget: it is tried anyway).
    """
    pairs = as_batches(data)
    device = next(model.parameters()).device
    budget = budget if isinstance(budget, int) and not isinstance(budget, bool) \
        else memory_budget(budget, device, sharing)
    notes = []
    reorth = choose_reorthogonalize(reorthogonalize, dims, iterations, budget, warn=False) \
        if iterations else False
    if iterations and _reorthogonalize_value(reorthogonalize) == "auto" and not reorth:
        notes.append(basis_warning(dims, iterations, budget))
    bases = basis_bytes(dims, iterations) if reorth else 0
    if cost is None:
        x, y = pairs[0]
        cost = measure_graph_cost(model, loss_fn, x, y, kind, bn_mode)
    sizes = [int(x.shape[0]) for x, _ in pairs]
    graph_budget = None if budget is None else max(0, budget - bases)
    splittable = not splitting_changes_operator(model, bn_mode, pairs[0][0])
    micro, reuse, peak = plan_micro_batches(sizes, cost, graph_budget, micro_batch_size,
                                            reuse_graph, splittable)
    fits = graph_budget is None or peak <= graph_budget
    if not fits:
        notes.append(f"the smallest plan needs ~{format_bytes(peak + bases)}, more than the "
                     f"memory budget {format_bytes(budget)}; trying anyway")
    if warn:
        for note in notes:
            log.warning("spectra: %s", note)
    return MemoryPlan(budget=budget, reorthogonalize=bool(reorth), basis_bytes=int(bases),
                      micro_batch_size=micro, reuse_graph=reuse, graph_bytes=peak, cost=cost,
                      examples=sum(sizes), fits=fits, notes=tuple(notes))
