"""One run across processes with ``torch.distributed``: the process group, the spectra
engine's reduction hook, and deterministic sharding.

``torchrun --nproc_per_node N -m layerhessians train ...`` starts N processes with the
``env://`` variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`process_group` initialises the group when
``WORLD_SIZE > 1`` (backend ``nccl`` on CUDA, ``gloo`` on the CPU, unless told otherwise;
rank r of a node uses ``cuda:LOCAL_RANK``) and destroys it at the end; with one process it
returns :data:`SINGLE` and never touches ``torch.distributed``.

- :class:`Context`: rank, world size, device; collectives that are identities on one process
  (:meth:`~Context.all_reduce_sum`, :meth:`~Context.broadcast_object`,
  :meth:`~Context.broadcast_module`, :meth:`~Context.agree_min`), error propagation
  (:meth:`~Context.share`, :meth:`~Context.in_turn`) and batch splitting
  (:meth:`~Context.split_batch`).
- :class:`AllReduce`: the :class:`~layerhessians.spectra.Reduction` that sums products and
  example counts over the ranks. Every rank then holds the same reduced products, and, with
  the same seeds, runs the same Lanczos recurrences: every rank gets the same spectrum.
- :func:`shard_indices`: rank ``r`` takes the items ``r, r + W, r + 2W, ...``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn

from layerhessians.curvature.batches import Reduction
from layerhessians.errors import UserError
from layerhessians.vocabulary import BACKENDS

__all__ = ["BACKENDS", "Context", "SINGLE", "AllReduce", "PeerError", "env_layout",
           "process_group", "shard_indices"]

#: how long a collective waits for the other ranks before failing
TIMEOUT = timedelta(minutes=30)


class PeerError(UserError):
    """Raised on the ranks whose peer failed; the peer reports the cause (the CLI does not
    repeat this message)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in a run: ``rank`` of ``world_size`` (``local_rank`` of
    ``local_world_size`` on its node), the ``backend`` (``None`` for one process) and the
    ``device`` it computes on. On one process every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """Several processes (a process group is initialised)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory and logs."""
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------
    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors live: the GPU for nccl, else the CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (in place when contiguous); returns it."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        target = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(target, op=dist.ReduceOp.SUM)
        return target

    def agree_min(self, values) -> list[int]:
        """The element-wise minimum of integer ``values`` over the ranks."""
        if not self.active:
            return [int(v) for v in values]
        import torch.distributed as dist

        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64,
                              device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return [int(v) for v in tensor.tolist()]

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank (pickled; tensors come back on the CPU if
        they were there)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers into ``module`` on every rank."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                dist.broadcast(tensor.data, src=src)

    def barrier(self) -> None:
        """Wait until every rank reaches this point (nothing in a single process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # -- errors ----------------------------------------------------------------------------
    def _raise_if_any(self, error: BaseException | None) -> None:
        """Raise ``error`` here, and :class:`PeerError` on the ranks without one, if any
        rank failed (every rank must call this at the same point)."""
        failed = self.all_reduce_sum(torch.tensor([0 if error is None else 1],
                                                  device=self.comm_device))
        if error is not None:
            raise error
        if int(failed.item()):
            raise PeerError("another process of this run failed (it printed why); stopping")

    def share(self, value, error: BaseException | None = None, src: int = 0):
        """Rank ``src``'s ``value`` on every rank; if ``src`` failed with ``error``, raise it
        there and :class:`PeerError` elsewhere."""
        if not self.active:
            if error is not None:
                raise error
            return value
        message = None if error is None else f"{type(error).__name__}: {error}"
        ok, payload = self.broadcast_object((error is None, value if error is None else message),
                                            src=src)
        if error is not None:
            raise error
        if not ok:
            raise PeerError(f"rank {src} failed ({payload}); stopping")
        return payload

    def in_turn(self, fn):
        """``fn()`` on each node's local rank 0 first (e.g. a download), then on the other
        ranks; a failure anywhere raises on every rank."""
        if not self.active:
            return fn()
        result, error = None, None
        for first in (True, False):
            if (self.local_rank == 0) == first:
                try:
                    result = fn()
                except Exception as err:  # reported on every rank below
                    error = err
            self._raise_if_any(error)
        return result

    # -- data ------------------------------------------------------------------------------
    def split_batch(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's part of a global batch: ``(x[r::W], y[r::W], weight)``.

        ``weight = W * n_r / n`` makes DDP's gradient (the mean over ranks) the gradient of
        the mean loss over the whole batch when each rank's loss is its own mean times
        ``weight``. A rank left without examples gets the first one with weight 0.
        """
        if not self.active:
            return x, y, 1.0
        xs, ys = x[self.rank::self.world_size], y[self.rank::self.world_size]
        if len(ys) == 0:
            return x[:1], y[:1], 0.0
        return xs, ys, self.world_size * len(ys) / len(y)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's positions ``r, r + W, ...`` of ``tensor`` (all of it alone)."""
        return tensor[self.rank::self.world_size] if self.active else tensor

    def batch_loss(self, network: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor):
        """One training batch's forward pass: ``(loss to backpropagate, mean loss of the
        whole batch in nats, correct predictions in the whole batch)``.

        Alone: ``loss_fn(network(x), y)`` itself. With several processes, this rank's part
        (:meth:`split_batch`) weighted so that DDP's averaged gradient is the whole batch's,
        and the batch's loss sum and hits all-reduced (every rank gets them).
        """
        if not self.active:
            output = network(x)
            loss = loss_fn(output, y)
            return loss, loss.item(), int((output.argmax(1) == y).sum())
        x_local, y_local, weight = self.split_batch(x, y)
        output = network(x_local)
        loss = loss_fn(output, y_local)
        if weight > 0:
            hits = (output.argmax(1) == y_local).sum()
            stats = torch.stack([loss.detach().double() * len(y_local), hits.double()])
        else:  # a placeholder example: counts nothing
            stats = torch.zeros(2, dtype=torch.float64)
        stats = self.all_reduce_sum(stats.to(self.comm_device)).cpu()
        return loss * weight, float(stats[0]) / len(y), int(round(float(stats[1])))

    def sum_totals(self, loss_sum: torch.Tensor, correct: torch.Tensor) -> tuple:
        """``(loss sum, correct count)`` summed over the ranks, as ``(float, int)``."""
        if not self.active:
            return float(loss_sum), int(correct)
        sums = self.all_reduce_sum(torch.stack([loss_sum, correct.double()])
                                   .to(self.comm_device)).cpu()
        return float(sums[0]), int(round(float(sums[1])))

    def reduction(self) -> "AllReduce | None":
        """The engine's reduction hook for data sharded across the ranks (``None`` alone)."""
        return AllReduce(self.comm_device) if self.active else None


SINGLE = Context()


class AllReduce(Reduction):
    """Sums over the process group: the global example count and the global product.

    Products are all-reduced in place (float64 or the model's dtype, on the model's device;
    nccl needs them on the GPU, gloo on the CPU)."""

    def __init__(self, count_device=None):
        self.count_device = torch.device("cpu") if count_device is None else count_device
        self.calls = 0  # number of product reductions (for tests and benchmarks)

    def total_examples(self, count: int) -> int:
        """The example count summed over the ranks.

        Args:
            count: this rank's number of examples.

        Returns:
            The global number of examples.
        """
        import torch.distributed as dist

        tensor = torch.tensor([int(count)], dtype=torch.int64, device=self.count_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return int(tensor.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (all-reduce, in place when it is contiguous).

        Args:
            tensor: this rank's term, on the process group's device (GPU for nccl, CPU for gloo).

        Returns:
            The sum, same shape, dtype and device (``tensor`` itself when contiguous).
        """
        import torch.distributed as dist

        self.calls += 1
        target = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(target, op=dist.ReduceOp.SUM)
        return target


def shard_indices(count: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions ``rank, rank + world_size, ...`` below ``count`` (int64): disjoint shards
    whose union is ``range(count)``, sizes differing by at most one."""
    return torch.arange(int(rank), int(count), int(world_size), dtype=torch.int64)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer; "
                        "start distributed runs with torchrun") from None


def env_layout() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from the ``env://`` variables
    (``(0, 1, 0, 1)`` when absent)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(1, local_world):
        raise UserError(f"inconsistent distributed environment (RANK={rank}, "
                        f"WORLD_SIZE={world}, LOCAL_RANK={local_rank}): start with torchrun")
    return rank, world, local_rank, local_world


def _backend_for(requested: str | None, device: torch.device) -> str:
    import torch.distributed as dist

    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise UserError(f"unknown --dist-backend {requested!r}; choose one of "
                        f"{', '.join(BACKENDS)}")
    backend = requested if requested != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise UserError("--dist-backend nccl needs CUDA devices and a CUDA build of torch; "
                        "use --dist-backend gloo (or auto) on the CPU")
    if backend == "gloo" and not dist.is_gloo_available():
        raise UserError("this torch build has no gloo backend; use --dist-backend nccl on GPUs")
    return backend


@contextlib.contextmanager
def process_group(backend: str | None = "auto", device="cpu"):
    """Yield the :class:`Context` of this process.

    One process (``WORLD_SIZE`` unset or 1): :data:`SINGLE`-like, on ``device``, with no
    process group. Several: initialise the group (``env://``, ``backend`` ``"auto"``:
    nccl for a CUDA ``device``, gloo otherwise), put this rank on ``cuda:LOCAL_RANK`` when
    ``device`` is a GPU, and destroy the group on exit (unless it was already initialised).
    """
    device = torch.device(device)
    rank, world, local_rank, local_world = env_layout()
    if world <= 1:
        yield Context(device=device)
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run one process")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU (this node has "
                            f"{torch.cuda.device_count()}): lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        name = _backend_for(backend, device)
        dist.init_process_group(name, init_method="env://", rank=rank, world_size=world,
                                timeout=TIMEOUT)
    try:
        yield Context(rank=rank, world_size=world, local_rank=local_rank,
                      local_world_size=local_world, backend=dist.get_backend(), device=device)
        if owner:  # a normal end: no rank tears down while another still talks to it
            dist.barrier()  # (without it, gloo aborted rank 1 at exit in ~40% of runs)
    finally:
        if owner and dist.is_initialized():
            dist.destroy_process_group()
