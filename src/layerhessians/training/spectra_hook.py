"""The loop's one interface to the spectra engine: plan the memory of a run's spectra, and
measure them at the current weights without changing training."""

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch

from layerhessians.curvature import plan_memory
from layerhessians.spectra import layer_spectra, operator_dims
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import FULL


def plan_spectra(setup, warn: bool = True):
    """Decide, within ``--memory-budget``, the Hessian micro-batch size, whether the graphs
    are kept, and ``reorthogonalize="auto"`` (see :func:`~layerhessians.curvature.plan_memory`);
    all ranks agree on the smallest choice. Sets ``setup.plan`` and records the resolved
    ``reorthogonalize`` in ``setup.config``; returns ``setup``."""
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


def compute_spectra(setup, epoch: int, disable_progress=None) -> "OrderedDict":
    """``{"full": SpectralMeasure, layer: ...}`` at the current weights, on the Hessian
    subset, with the run's engine settings, seeded from ``(seed, epoch)``. Buffers
    (batch-norm running statistics) and the train/eval mode are left as they were. Uses
    ``setup.plan`` (micro-batches, graph reuse) and ``setup.reduction`` (sharded set)."""
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


def top_eigenvalue(spectra) -> float:
    """The full Hessian's largest Ritz value (NaN without spectra)."""
    if not spectra or FULL not in spectra:
        return float("nan")
    measure = spectra[FULL]
    return float(np.max(np.asarray(measure.nodes)[np.asarray(measure.weights) > 0]))
