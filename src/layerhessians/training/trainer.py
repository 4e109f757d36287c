"""The main job: train a network and, after every epoch, measure the spectra of the full
loss Hessian and of every layer's diagonal Hessian block.

:func:`train` ``(config, run_dir, resume=False, overwrite=False, ...) -> Path`` runs it; the
stages are separate functions so that they can be reused (and a distributed trainer can
thread rank/world size through them): :func:`build` (model, optimizer, scheduler, Hessian
batch), :func:`train_epoch`, :func:`evaluate`, :func:`compute_spectra`, :func:`commit`.

An epoch ``E`` (1..n; 0 = the spectra at initialisation with ``--init-spectra``):

1. trains in train mode over shuffled batches (order and augmentation seeded from
   ``(seed, E)``); ``train_loss``/``train_acc`` are the running averages over the epoch's
   batches (weights change during the epoch, as in most training logs);
2. steps the learning-rate schedule (``lr`` in metrics.csv is the rate used in epoch E);
3. evaluates ``test_loss``/``test_acc`` in eval mode over the whole test set;
4. if due, computes the spectra on the fixed class-balanced Hessian subset (one batch,
   mean cross-entropy) in the recorded batch-norm mode, seeded from ``(seed, E)``; the
   model's buffers (batch-norm running statistics) are restored afterwards, so measuring
   never changes training;
5. commits spectra -> metrics -> checkpoint through :class:`~layerhessians.store.runs.RunStore`
   (the checkpoint is the commit point), so a run killed at any moment resumes from the
   last completed epoch and, on the CPU, reproduces an uninterrupted run exactly.

A non-finite loss stops the run with :class:`TrainingDiverged` (a ``UserError``); the
epochs committed so far are kept.

Several processes (``torchrun --nproc_per_node N -m layerhessians train ...``; see
:mod:`layerhessians.training.distributed`):

- training is DistributedDataParallel over the same global batches as one process: ``-b``
  is the global batch size; every rank draws the same seeded epoch order (and
  augmentation) and takes positions ``r, r + N, ...`` of each global batch, so the ranks'
  shards of an epoch are disjoint and reproducible; each rank's mean loss is weighted by
  ``N * n_r / n`` so that the averaged gradient is that of the global batch mean. Without
  batch norm the trajectory equals one process's up to float reduction order; batch norm
  uses each rank's own batch statistics (the running statistics are rank 0's) unless
  ``--sync-bn`` (GPUs). Dropout masks differ from one process's.
- the Hessian set is sharded (rank r takes positions ``r, r + N, ...``); the engine's
  reduction hook all-reduces every product and the example count (weights ``n_b / N``
  over ALL examples), so every rank holds the same products and the same spectra. With
  batch norm in ``--hessian-bn-mode train`` the set is not sharded (each rank computes
  the whole operator), since splitting would change its batch statistics.
- test (and epoch-0 train) metrics are sums over shards, all-reduced.
- only rank 0 writes the run directory (lock, config.json, CSVs, checkpoints, logs,
  images); ``--resume``: rank 0 reads the checkpoint and broadcasts it. After every epoch
  the model's parameters and buffers are broadcast from rank 0, so all ranks measure the
  same network.
"""

import contextlib
import logging
import math
import os
import platform
import random
import signal
import socket
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from layerhessians import __version__
from layerhessians.errors import UserError
from layerhessians.store.runs import VOLATILE_KEYS, RunStore
from layerhessians.training.config import TrainConfig
from layerhessians.training.devices import device_name, resolve_device
from layerhessians.training.distributed import SINGLE, Context, PeerError, process_group

log = logging.getLogger("layerhessians.training.trainer")

#: config.json keys that may change when a run is resumed (besides runs.VOLATILE_KEYS).
#: The scale-out settings are among them: like the world size (runs.VOLATILE_KEYS), they
#: change numbers only by rounding (micro-batches, budget, backend) or batch-norm statistics
#: across GPUs (--sync-bn), and runs written before they existed lack them.
RESUME_IGNORES = VOLATILE_KEYS | {"command", "device_name", "threads", "dataset_folder",
                                  "hessian_batch_size", "memory_budget", "dist_backend",
                                  "backend", "reuse_graph", "memory_budget_bytes", "sync_bn"}
#: Environment hook for crash tests: ``"E:stage"`` SIGKILLs the process at that point of
#: epoch E; stages: ``trained``, ``spectra`` (computed, nothing committed), ``committed``.
CRASH_ENV = "LAYERHESSIANS_CRASH_AT"
_STREAMS = {"init": 0, "batches": 1, "train": 2, "spectra": 3}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing of that epoch is committed."""

    def __init__(self, epoch: int, loss: float, where: str = "training", message=None):
        self.epoch, self.loss, self.where = epoch, loss, where
        super().__init__(message or f"{where} diverged at epoch {epoch} (loss={loss})")


# ----------------------------------------------------------------------------- seeding
def derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` (batches, train, spectra) of ``epoch``, from ``seed``:
    independent of what ran before, so a resumed epoch sees the same randomness."""
    words = np.random.SeedSequence([int(seed), int(epoch), _STREAMS[stream]]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- build
@dataclass
class Setup:
    """What one run trains and measures, on ``device``.

    ``hessian_batch``: ``(x [n, C, 32, 32], y [n])``, this rank's part of the fixed
    Hessian set (all of it on one process); ``blocks``: ``layer_blocks(model)`` (name ->
    [leaf parameters]). Distributed runs add ``dist`` (the :class:`~layerhessians.training.distributed.Context`),
    ``ddp`` (the DistributedDataParallel wrapper that trains ``model``), ``reduction`` (the
    engine's all-reduce hook, ``None`` when the set is not sharded) and ``hessian_examples``
    (the whole set's size); ``plan`` is the spectra's
    :class:`~layerhessians.spectra.MemoryPlan` (``None``: the engine's defaults).
    """

    config: TrainConfig
    device: torch.device
    data: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    hessian_batch: tuple
    blocks: "OrderedDict[str, list[nn.Parameter]]"
    dist: Context = SINGLE
    ddp: nn.Module = None
    reduction: object = None
    hessian_examples: int = None
    plan: object = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or Adam with ``weight_decay = -l2``, at ``-lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def hessian_indices(targets, examples_per_class=10, total=None, seed=0) -> torch.Tensor:
    """The fixed Hessian set: indices (int64) into the training set, ordered by class, then
    by index.

    ``total=None``: ``examples_per_class`` per class (:func:`~layerhessians.data.hessian_subset`).
    ``total=n``: ``n`` examples, class-balanced as far as possible (classes with fewer
    examples than the fair share give all they have; the others get equal shares, lower
    labels taking the remainder), drawn with the same seeded generator as
    ``hessian_subset``, so ``n = K * epc`` gives exactly ``hessian_subset(targets, epc, seed)``.
    ``total="all"``: the whole training set. Raises :class:`UserError` when ``n`` exceeds it.
    """
    from layerhessians.data import hessian_subset

    targets = torch.as_tensor(targets).reshape(-1).cpu()
    if total is None:
        return hessian_subset(targets, examples_per_class, seed=seed)
    classes = torch.unique(targets).tolist()
    members = {c: torch.nonzero(targets == c).flatten() for c in classes}
    if total == "all":
        return torch.cat([members[c] for c in classes])
    if total > len(targets):
        raise UserError(f"--hessian-examples {total} exceeds the {len(targets)} training "
                        "examples: lower it or pass --hessian-examples all")
    # water-filling: classes too small for the fair share give all they have (smallest
    # first); the rest share what is left equally, lower labels taking the remainder
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
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in classes:
        pick = torch.randperm(len(members[c]), generator=generator)[:quota[c]]
        chosen.append(members[c][pick].sort().values)
    return torch.cat(chosen)


def build(config: TrainConfig, data, device: torch.device, dist: Context = SINGLE) -> Setup:
    """Model (initialised from ``config.seed``), optimizer, MultiStepLR schedule, loss and
    the Hessian set, all on ``device``; ``data`` (a ``TensorData``) is moved there too.
    With several processes (``dist``), the model is wrapped in DistributedDataParallel
    (SyncBatchNorm with ``config.sync_bn``) and the Hessian set is sharded."""
    from layerhessians.curvature.memory import splitting_changes_operator
    from layerhessians.models import build_model, layer_blocks

    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    torch.manual_seed(derive_seed(config.seed, 0, "init"))
    model = build_model(config.model, in_channels=data.in_channels,
                        num_classes=data.num_classes).to(device)
    if config.sync_bn and dist.active:
        if device.type != "cuda":
            raise UserError("--sync-bn needs GPUs (SyncBatchNorm has no CPU kernels); drop it "
                            "on the CPU, where each rank normalises by its own batch")
        if config.hessian.bn_mode == "train":
            raise UserError("--sync-bn with --hessian-bn-mode train is not supported "
                            "(SyncBatchNorm has no second derivative): use --hessian-bn-mode "
                            "eval, or drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestones,
                                                     gamma=config.step_gamma)
    index = hessian_indices(data.train_y.cpu(), config.examples_per_class, config.hessian_total,
                            seed=config.hessian.subset_seed)
    reduction, local = None, index
    if dist.active and not splitting_changes_operator(model, config.hessian.bn_mode):
        if len(index) < dist.world_size:
            raise UserError(f"the Hessian set has {len(index)} examples for {dist.world_size} "
                            "processes: use more examples (--hessian-examples) or fewer "
                            "processes")
        reduction, local = dist.reduction(), index[dist.rank::dist.world_size]
    local = local.to(device)
    ddp = None
    if dist.active:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return Setup(config=config, device=device, data=data, model=model, optimizer=optimizer,
                 scheduler=scheduler, loss_fn=nn.CrossEntropyLoss(),
                 hessian_batch=(data.train_x[local], data.train_y[local]),
                 blocks=layer_blocks(model), dist=dist, ddp=ddp, reduction=reduction,
                 hessian_examples=int(len(index)))


def plan_spectra(setup: Setup, warn: bool = True) -> Setup:
    """Decide, within ``--memory-budget``, the Hessian micro-batch size, whether the graphs
    are kept, and ``reorthogonalize="auto"`` (see :func:`~layerhessians.spectra.plan_memory`);
    all ranks agree on the smallest choice. Sets ``setup.plan`` and records the resolved
    ``reorthogonalize`` in ``setup.config``; returns ``setup``."""
    from dataclasses import replace

    from layerhessians.curvature import plan_memory
    from layerhessians.spectra import operator_dims

    config, dist = setup.config, setup.dist
    hcfg = config.hessian
    dims = operator_dims(setup.model, hcfg.layers)
    sharing = dist.local_world_size if setup.device.type != "cuda" else 1
    plan = plan_memory(setup.model, setup.loss_fn, setup.hessian_batch, dims=list(dims.values()),
                       iterations=hcfg.iterations, kind=hcfg.kind, bn_mode=hcfg.bn_mode,
                       reorthogonalize=hcfg.reorthogonalize,
                       micro_batch_size=config.hessian_batch_size, reuse_graph="auto",
                       budget=config.memory_budget, sharing=sharing, warn=warn)
    if dist.active:
        micro, reuse, reorth = dist.agree_min([plan.micro_batch_size, plan.reuse_graph,
                                               plan.reorthogonalize])
        plan = replace(plan, micro_batch_size=micro, reuse_graph=bool(reuse),
                       reorthogonalize=bool(reorth))
    setup.plan = plan
    setup.config = replace(config, hessian=replace(hcfg, reorthogonalize=plan.reorthogonalize))
    return setup


def describe(setup: Setup, command=None) -> dict:
    """The run's ``config.json``: every setting plus the facts needed to interpret it."""
    config, data = setup.config, setup.data
    blocks = ["full", *setup.blocks] if config.hessian.layers else ["full"]
    dims = {"full": setup.num_params, **{k: sum(p.numel() for p in ps) for k, ps in setup.blocks.items()}}
    return {
        **config.to_dict(),
        "blocks": blocks,
        "block_dims": {k: dims[k] for k in blocks},
        "num_params": setup.num_params,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "train_examples": int(len(data.train_y)),
        "test_examples": int(len(data.test_y)),
        "hessian_examples": int(setup.hessian_examples or len(setup.hessian_batch[1])),
        "dataset_checksum": data.checksum,
        "dataset_folder": data.folder,
        "device": str(setup.device),
        "device_name": device_name(setup.device),
        "world_size": setup.dist.world_size,
        "backend": setup.dist.backend,
        **({} if setup.plan is None else {
            "micro_batch_size": setup.plan.micro_batch_size,
            "reuse_graph": setup.plan.reuse_graph,
            "memory_budget_bytes": setup.plan.budget}),
        "threads": torch.get_num_threads(),
        "versions": {"layerhessians": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "host": socket.gethostname(),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


# ----------------------------------------------------------------------------- state
def checkpoint_state(setup: Setup) -> dict:
    """Model, optimizer, scheduler and RNG states (tensors and plain containers only, so
    ``torch.load(weights_only=True)`` reads it back)."""
    rng = {"torch": torch.get_rng_state()}
    if setup.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(setup.device)
    scheduler = setup.scheduler.state_dict()
    scheduler["milestones"] = {int(k): int(v) for k, v in scheduler["milestones"].items()}
    return {"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
            "scheduler": scheduler, "rng": rng}


def restore_state(setup: Setup, state: dict) -> int:
    """Load a checkpoint written by :func:`checkpoint_state`; returns its epoch."""
    from collections import Counter

    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    scheduler = dict(state["scheduler"])
    scheduler["milestones"] = Counter({int(k): int(v) for k, v in scheduler["milestones"].items()})
    setup.scheduler.load_state_dict(scheduler)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and setup.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), setup.device)
    return int(state["epoch"])


# ----------------------------------------------------------------------------- stages
def _bar(disable, **kwargs):
    return tqdm(disable=disable, dynamic_ncols=True, file=sys.stderr, **kwargs)


def train_epoch(setup: Setup, epoch: int, disable_progress=None) -> dict:
    """One epoch in train mode; ``{"train_loss", "train_acc"}``: the averages over the
    epoch's batches (loss per example in nats, accuracy a fraction). Raises
    :class:`TrainingDiverged` at the first non-finite batch loss (before stepping).

    With several processes each global batch is split across the ranks
    (:meth:`~layerhessians.training.distributed.Context.split_batch`), trained through DDP, and the
    batch's loss and accuracy are all-reduced; afterwards rank 0's parameters and buffers
    are broadcast, so every rank ends the epoch with the same network."""
    config, data, model, dist = setup.config, setup.data, setup.model, setup.dist
    network = setup.ddp if setup.ddp is not None else model
    torch.manual_seed(derive_seed(config.seed, epoch, "train"))  # dropout & co.
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    num_batches = math.ceil(len(data.train_y) / config.batch_size)
    batches = data.train_batches(config.batch_size, shuffle=True, augment=config.augment,
                                 seed=derive_seed(config.seed, epoch, "batches"))
    with _bar(disable_progress, total=num_batches, desc=f"epoch {epoch}", unit="batch",
              leave=False) as bar:
        for x, y in batches:
            setup.optimizer.zero_grad(set_to_none=True)
            if dist.active:
                x_local, y_local, weight = dist.split_batch(x, y)
                output = network(x_local)
                loss = setup.loss_fn(output, y_local)
                if weight > 0:
                    hits = (output.argmax(1) == y_local).sum()
                    stats = torch.stack([loss.detach().double() * len(y_local), hits.double()])
                else:  # a placeholder example: counts nothing
                    stats = torch.zeros(2, dtype=torch.float64)
                stats = dist.all_reduce_sum(stats.to(dist.comm_device)).cpu()
                value, hits = float(stats[0]) / len(y), int(round(float(stats[1])))
                if not math.isfinite(value):
                    raise TrainingDiverged(epoch, value)
                (loss * weight).backward()
            else:
                output = network(x)
                loss = setup.loss_fn(output, y)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(epoch, value)
                loss.backward()
                hits = int((output.argmax(1) == y).sum())
            setup.optimizer.step()
            loss_sum += value * len(y)
            correct += hits
            seen += len(y)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
    dist.broadcast_module(model)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             dist: Context = SINGLE) -> tuple:
    """``(mean cross-entropy in nats, accuracy fraction)`` of ``model`` in eval mode over
    ``x [N, C, H, W]``, ``y [N]``, in batches; the model's mode is restored. With several
    processes (``dist``) each rank evaluates positions ``r, r + W, ...`` and the sums are
    all-reduced (every rank gets the result)."""
    was_training = model.training
    model.eval()
    total = len(y)
    if dist.active:
        x, y = x[dist.rank::dist.world_size], y[dist.rank::dist.world_size]
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(output, target, reduction="sum").double()
        correct += (output.argmax(1) == target).sum()
    model.train(was_training)
    if dist.active:
        sums = dist.all_reduce_sum(torch.stack([loss_sum, correct.double()])
                                   .to(dist.comm_device)).cpu()
        loss_sum, correct = sums[0], int(round(float(sums[1])))
    return float(loss_sum) / total, int(correct) / total


def compute_spectra(setup: Setup, epoch: int, disable_progress=None) -> "OrderedDict":
    """``{"full": SpectralMeasure, layer: ...}`` at the current weights, on the Hessian
    subset, with the run's engine settings, seeded from ``(seed, epoch)``. Buffers
    (batch-norm running statistics) and the train/eval mode are left as they were. Uses
    ``setup.plan`` (micro-batches, graph reuse) and ``setup.reduction`` (sharded set)."""
    from layerhessians.spectra import layer_spectra

    hcfg, model, plan = setup.config.hessian, setup.model, setup.plan
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        spectra = layer_spectra(
            model, setup.loss_fn, setup.hessian_batch, iterations=hcfg.iterations,
            vectors=hcfg.vectors, seed=derive_seed(setup.config.seed, epoch, "spectra"),
            kind=hcfg.kind, bn_mode=hcfg.bn_mode, layers=hcfg.layers,
            distribution=hcfg.distribution, reorthogonalize=hcfg.reorthogonalize,
            progress=disable_progress is not True and setup.dist.is_main,
            reduction=setup.reduction,
            micro_batch_size=None if plan is None else plan.micro_batch_size,
            reuse_graph=True if plan is None else plan.reuse_graph,
            memory_budget=setup.config.memory_budget)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])
        model.train(was_training)
    return spectra


def commit(store: RunStore, setup: Setup, epoch: int, row: dict, spectra):
    """Keep epoch ``epoch``: weights every ``--save_freq`` epochs, then (atomically, the
    checkpoint last) its spectra, metrics row and full training state."""
    freq = setup.config.save_freq
    if freq and epoch % freq == 0:
        store.save_weights(epoch, setup.model.state_dict())
    store.commit_epoch(epoch, row, spectra, checkpoint_state(setup))


# ----------------------------------------------------------------------------- the loop
def _crash_point(epoch: int, stage: str):
    """Test hook: SIGKILL this process at ``stage`` of ``epoch`` if ``$CRASH_ENV`` says so."""
    if os.environ.get(CRASH_ENV) == f"{epoch}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _top_eigenvalue(spectra):
    if not spectra or "full" not in spectra:
        return float("nan")
    measure = spectra["full"]
    return float(np.max(np.asarray(measure.nodes)[np.asarray(measure.weights) > 0]))


def run_epoch(setup: Setup, store: RunStore, epoch: int, disable_progress=None) -> dict:
    """Train (unless ``epoch == 0``), evaluate, measure if due, commit (``store``; ``None`` on
    the ranks that do not write); returns the row."""
    config, data, device = setup.config, setup.data, setup.device
    lr = setup.optimizer.param_groups[0]["lr"]
    _sync(device)
    start = time.perf_counter()
    if epoch == 0:  # initialisation: the whole training set in eval mode
        train_loss, train_acc = evaluate(setup.model, data.train_x, data.train_y,
                                         config.batch_size, setup.dist)
        row = {"train_loss": train_loss, "train_acc": train_acc}
        train_seconds = 0.0
    else:
        row = train_epoch(setup, epoch, disable_progress)
        setup.scheduler.step()
        _sync(device)
        train_seconds = time.perf_counter() - start
    _crash_point(epoch, "trained")
    test_loss, test_acc = evaluate(setup.model, data.test_x, data.test_y, config.batch_size,
                                   setup.dist)
    for name, value in (("test", test_loss), ("training", row["train_loss"])):
        if not math.isfinite(value):
            raise TrainingDiverged(epoch, value, where=name)
    _sync(device)
    eval_seconds = time.perf_counter() - start - train_seconds
    spectra, spectra_start = None, time.perf_counter()
    if config.hessian.due(epoch, config.num_epochs):
        spectra = compute_spectra(setup, epoch, disable_progress)
    _sync(device)
    spectra_seconds = time.perf_counter() - spectra_start
    _crash_point(epoch, "spectra")
    row = {"lr": lr, **row, "test_loss": test_loss, "test_acc": test_acc,
           "train_seconds": train_seconds, "spectra_seconds": spectra_seconds,
           "eval_seconds": eval_seconds, "top_eigenvalue": _top_eigenvalue(spectra)}
    if store is not None:  # rank 0 (or the only process)
        commit(store, setup, epoch, row, spectra)
    _crash_point(epoch, "committed")
    return row


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextmanager
def run_logging(log_path, console=True):
    """Log to ``log_path`` (appended, timestamped) and, if ``console``, to stdout."""
    log.setLevel(logging.INFO)
    log.propagate = False
    handlers = [logging.FileHandler(log_path, encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if console:
        handlers.append(_TqdmHandler(sys.stdout))
        handlers[-1].setFormatter(logging.Formatter("%(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def _format_row(epoch, num_epochs, row):
    text = (f"epoch {epoch}/{num_epochs}  lr {row['lr']:.3g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"[train {row['train_seconds']:.1f}s, spectra {row['spectra_seconds']:.1f}s]")
    if math.isfinite(row["top_eigenvalue"]):
        text += f"  top eigenvalue {row['top_eigenvalue']:.4g}"
    return text


def save_training_curves(store: RunStore, config: dict):
    """``RUN/images/loss.png`` and ``acc.png`` (train and test, per epoch) from metrics.csv,
    drawn by :func:`layerhessians.analysis.figures.plot_training_curves`."""
    from layerhessians.analysis import figures as plots

    metrics = store.metrics
    if not len(metrics):
        return
    title = f"{config.get('model')} on {config.get('dataset')}"
    for kind in ("loss", "acc"):
        columns = ["epoch", f"train_{kind}", f"test_{kind}"]
        plots.save_figure(plots.plot_training_curves(metrics[columns], title=title),
                          store.images / f"{kind}.png", dpi=100)


def _after_commit(store, setup, run_config, epochs):
    """Derived outputs (cheap, idempotent): training curves and the legacy files."""
    save_training_curves(store, run_config)
    if setup.config.export_legacy:
        from layerhessians.store.legacy import export_legacy

        export_legacy(store.path, epochs=epochs)


class _Silent:
    """The logger of the ranks that do not write."""

    def info(self, *args, **kwargs):
        pass

    warning = info


def _open_run(run_dir, run_config, config, resume, overwrite):
    """Rank 0's part of opening a run: ``(store, checkpoint state or None)``."""
    done = RunStore(run_dir).completed_epoch if Path(run_dir).is_dir() else None
    if resume and done is not None and done > config.num_epochs:
        raise UserError(f"{run_dir} already has {done} epochs; -n {config.num_epochs} would "
                        f"shorten it: pass -n {done} or more, or --overwrite")
    store = RunStore.create(run_dir, run_config, resume=resume, overwrite=overwrite,
                            ignore=RESUME_IGNORES)
    try:
        return store, store.load_checkpoint()
    except BaseException:
        store.close()
        raise


def train(config: TrainConfig, run_dir, *, resume=False, overwrite=False, command=None,
          progress=None, console=True) -> Path:
    """Run (or resume) the training run ``config`` in ``run_dir``; returns its path.

    ``resume``: continue a run with the same settings (``num_epochs`` may grow);
    ``overwrite``: replace whatever run is there. ``progress``: ``None`` shows bars on a
    terminal only, ``False`` never. ``command``: the command line, recorded in config.json.
    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; they form one run
    (module docstring) and only rank 0 writes ``run_dir``.
    Raises :class:`UserError` (bad settings, busy or conflicting directory, divergence).
    """
    config = config.validated()
    device = resolve_device(config.device)
    with process_group(config.dist_backend, device) as dist:
        return _train(config, run_dir, dist, resume=resume, overwrite=overwrite,
                      command=command, progress=progress, console=console)


def _train(config, run_dir, dist: Context, *, resume, overwrite, command, progress, console):
    from layerhessians.data import load_dataset

    device = dist.device
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    seed_everything(config.seed)
    data = dist.in_turn(lambda: load_dataset(config.dataset, root=config.dataset_root,
                                             download=config.download))
    setup = plan_spectra(build(config, data, device, dist), warn=False)
    config = setup.config  # reorthogonalize resolved
    run_config = describe(setup, command)
    disable = True if (progress is False or not dist.is_main) else None
    store, state, error = None, None, None
    if dist.is_main:
        try:
            store, state = _open_run(run_dir, run_config, config, resume, overwrite)
        except Exception as err:  # told to the other ranks, raised below
            error = err
    state = dist.share(state, error)
    with store if store is not None else contextlib.nullcontext(), \
            run_logging(store.log_path, console) if store is not None else \
            contextlib.nullcontext(_Silent()) as logger:
        run_config = store.config if store is not None else run_config
        done = None if state is None else restore_state(setup, state)
        if done is None:
            where = (f"{dist.world_size} processes ({dist.backend}), rank 0 on "
                     if dist.active else "device ")
            logger.info(f"run {run_dir}: {config.model} on {config.dataset}, "
                        f"{setup.num_params:,} parameters, {len(setup.blocks)} layer blocks, "
                        f"{where}{run_config['device_name']}")
            logger.info("settings: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
        else:
            logger.info(f"run {run_dir}: resuming after epoch {done} of {config.num_epochs}"
                        + (f" on {dist.world_size} processes" if dist.active else ""))
        logger.info(f"spectra: {setup.hessian_examples} Hessian examples"
                    + (f" sharded over {dist.world_size} processes" if setup.reduction else "")
                    + f"; {setup.plan.summary()}")
        for note in setup.plan.notes:
            logger.warning(f"warning: {note}")
        if config.export_legacy and done is not None and store is not None:
            from layerhessians.store.legacy import export_legacy

            export_legacy(store.path)
        first = 0 if (done is None and config.hessian.init) else (1 if done is None else done + 1)
        if first > config.num_epochs:
            logger.info(f"run {run_dir} is complete ({done} epochs); raise -n to extend it")
            return Path(run_dir)
        epochs = range(first, config.num_epochs + 1)
        with _bar(disable, total=config.num_epochs, initial=first - 1 if first else 0,
                  desc="epochs", unit="epoch") as bar:
            for epoch in epochs:
                try:
                    row = run_epoch(setup, store, epoch, disable)
                except TrainingDiverged as err:
                    if store is None:  # rank 0 reports it
                        raise PeerError(str(err)) from None
                    kept = (f"epochs {store.metrics['epoch'].min()}..{epoch - 1} are kept in "
                            f"{store.path}" if len(store.metrics) else
                            f"no epoch was completed ({store.path})")
                    message = f"{err}; {kept}; try a smaller --learning_rate"
                    logger.info(message)
                    raise TrainingDiverged(err.epoch, err.loss, err.where, message) from None
                logger.info(_format_row(epoch, config.num_epochs, row))
                if store is not None:
                    _after_commit(store, setup, run_config, [epoch])
                if epoch > 0:
                    bar.update()
        if store is not None:
            logger.info(f"done: {store.path} (epochs {store.metrics['epoch'].min()}.."
                        f"{config.num_epochs}; load with layerhessians.load_run)")
    return Path(run_dir) if store is None else store.path
