"""What one run trains and measures: :class:`Setup` (model, optimizer, schedule, loss, the
fixed Hessian set, distributed wrappers) built from a :class:`TrainConfig` by :func:`build`,
and :func:`describe`, the run's ``config.json``."""

import platform
import socket
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cached_property

import numpy as np
import torch
from torch import nn

from layerhessians import __version__
from layerhessians.curvature.memory import splitting_changes_operator
from layerhessians.data.subset import hessian_subset
from layerhessians.errors import UserError
from layerhessians.models import build_model, layer_blocks
from layerhessians.store.record import CONSECUTIVE, TRAINER, RunRecord
from layerhessians.training.config import TrainConfig
from layerhessians.training.devices import device_name
from layerhessians.training.distributed import SINGLE, Context
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import FULL


@dataclass(frozen=True)
class Setup:
    """What one run trains and measures, on ``device``.

    ``hessian_batch``: ``(x [n, C, 32, 32], y [n])``, this rank's part of the fixed
    Hessian set (all of it on one process); ``blocks``: ``layer_blocks(model)`` (name ->
    weight). Distributed runs add ``dist`` (the :class:`~layerhessians.training.distributed.Context`),
    ``ddp`` (the DistributedDataParallel wrapper that trains ``model``), ``reduction`` (the
    engine's all-reduce hook, ``None`` when the set is not sharded) and ``hessian_examples``
    (the whole set's size). Frozen: the spectra's plans are added by
    :func:`~layerhessians.training.spectra_hook.plan_spectra`, which returns a new Setup with
    ``plan`` (the :class:`~layerhessians.spectra.plan.MemoryPlan`; ``None``: the engine's
    defaults) and ``layers`` (the :class:`~layerhessians.training.spectra_hook.LayerPlan`:
    how each layer block is computed, decided once before epoch 1). ``settings`` are the
    run's :class:`~layerhessians.settings.SpectraSettings` (from ``config``).
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
    layers: object = None

    @cached_property
    def settings(self):
        """The run's :class:`~layerhessians.settings.SpectraSettings` (base seed)."""
        return self.config.spectra_settings()

    @property
    def layer_methods(self) -> dict:
        """``{block: "exact" | "slq"}`` once planned (else ``None``)."""
        return None if self.layers is None else self.layers.methods

    @property
    def fallbacks(self) -> dict:
        """``{block: reason}`` of the blocks left to SLQ once planned (else ``None``)."""
        return None if self.layers is None else self.layers.fallbacks

    @property
    def certificates(self) -> dict:
        """``{block: Certificate}`` of the probed blocks once planned (else ``None``)."""
        return None if self.layers is None else self.layers.certificates

    @property
    def num_params(self) -> int:
        """Number of trainable parameters of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum ``config.momentum``) or Adam, at ``config.learning_rate`` with
    ``weight_decay = config.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def build(config: TrainConfig, data, device: torch.device, dist: Context = SINGLE) -> Setup:
    """Model (initialised from ``config.seed``), optimizer, MultiStepLR schedule, loss and
    the Hessian set (:func:`~layerhessians.data.hessian_subset`), all on ``device``; ``data``
    (a ``TensorData``) is moved there too. With several processes (``dist``), the model is
    wrapped in DistributedDataParallel (SyncBatchNorm with ``config.sync_bn``) and the
    Hessian set is sharded.

    Raises:
        UserError: ``--sync-bn`` on the CPU or with batch-norm mode ``train``; a Hessian set
            smaller than the number of processes, or larger than the training set.
    """
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
    index = hessian_subset(data.train_y.cpu(), config.examples_per_class,
                           seed=config.hessian.subset_seed, total=config.hessian_total)
    reduction, local = None, index
    if dist.active and not splitting_changes_operator(model, config.hessian.bn_mode,
                                                      data.train_x[index[:8].to(device)]):
        if len(index) < dist.world_size:
            raise UserError(f"the Hessian set has {len(index)} examples for {dist.world_size} "
                            "processes: use more examples (--hessian-examples) or fewer "
                            "processes")
        reduction, local = dist.reduction(), dist.shard(index)
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


def describe(setup: Setup, command=None) -> RunRecord:
    """The run's record (``config.json``): the settings (training section:
    ``TrainConfig.to_dict()``; spectra section: the :class:`SpectraSettings` with
    ``"auto"`` re-orthogonalisation resolved by the memory plan) and the facts needed to
    interpret them."""
    config, data = setup.config, setup.data
    spectra = setup.settings
    if setup.plan is not None:  # what the run uses: "auto" resolved by the memory plan
        spectra = replace(spectra, reorthogonalize=setup.plan.reorthogonalize)
    blocks = [FULL, *setup.blocks] if config.hessian.layers else [FULL]
    dims = {FULL: setup.num_params, **{k: sum(p.numel() for p in ps) for k, ps in setup.blocks.items()}}
    facts = {
        "writer": TRAINER,
        "model": config.model,
        "dataset": config.dataset,
        "indices": CONSECUTIVE,
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
    return RunRecord.make(facts, spectra, {k: dims[k] for k in blocks},
                          training=config.to_dict())
