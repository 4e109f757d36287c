"""The main job: train a network and, after every epoch, measure the spectra of the full
loss Hessian and of every layer's diagonal Hessian block.

:func:`train` ``(config, run_dir, resume=False, overwrite=False, ...) -> Path`` runs it. The
stages live one per module and are reused (a distributed run threads rank/world size
through them): :mod:`~layerhessians.training.setup` (model, optimizer, schedule, Hessian
set), :func:`train_epoch`, :func:`evaluate`, :mod:`~layerhessians.training.spectra_hook`
(the engine), :func:`commit` (the store), :mod:`~layerhessians.training.checkpoint`.

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
5. commits spectra -> metrics -> checkpoint through :class:`~layerhessians.store.writer.RunStore`
   (the checkpoint is the commit point), so a run killed at any moment resumes from the
   last completed epoch and, on the CPU, reproduces an uninterrupted run exactly.

A non-finite loss stops the run with :class:`TrainingDiverged` (a ``UserError``); the
epochs committed so far are kept.

Several processes (``torchrun --nproc_per_node N -m layerhessians train ...``; see
:mod:`layerhessians.training.distributed`, which holds every distributed branch):

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
import math
import os
import signal
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from layerhessians.analysis.figures import save_training_curves
from layerhessians.data import load_dataset
from layerhessians.errors import UserError
from layerhessians.store.legacy import export_legacy
from layerhessians.store.manifest import register_output, write_csv
from layerhessians.store.names import CONFIG
from layerhessians.store.record import RunRecord, read_record
from layerhessians.store.writer import RunStore
from layerhessians.training.checkpoint import (
    RESUME_IGNORES,
    checkpoint_state,
    restore_state,
)
from layerhessians.training.config import TrainConfig
from layerhessians.training.devices import resolve_device
from layerhessians.training.distributed import SINGLE, Context, PeerError, process_group
from layerhessians.training.logs import Silent, format_row, progress_bar, run_logging
from layerhessians.training.penalty_hook import (
    CERTIFICATES_KEY,
    certificate_line,
    epoch_regularizer,
    penalty_certificates,
    top5_accuracy,
)
from layerhessians.training.seeding import derive_seed, seed_everything
from layerhessians.training.setup import Setup, build, describe
from layerhessians.training.spectra_hook import (
    FIDELITY_COLUMNS,
    compute_spectra,
    layer_metrics,
    plan_spectra,
    slq_fidelity_rows,
    top_eigenvalue,
)
from layerhessians.training.threads import THREADS_KEY, resume_threads, thread_limits

#: Environment hook for crash tests: ``"E:stage"`` SIGKILLs the process at that point of
#: epoch E; stages: ``trained``, ``spectra`` (computed, nothing committed), ``committed``.
CRASH_ENV = "LAYERHESSIANS_CRASH_AT"
#: ``--validate-layer-spectra``: SLQ's error against the exact layer spectra, per epoch
FIDELITY = "slq_fidelity.csv"


#: a loss this many times that of a uniform guess (log C nats) marks a diverged run: its
#: epoch is not committed and no spectra of that model are measured
DIVERGED = 1e4


class TrainingDiverged(UserError):
    """The loss became NaN or infinite, or :data:`DIVERGED` times that of a uniform guess;
    nothing of that epoch is committed."""

    def __init__(self, epoch: int, loss: float, where: str = "training", message=None):
        self.epoch, self.loss, self.where = epoch, loss, where
        super().__init__(message or f"{where} diverged at epoch {epoch} (loss={loss})")


# ----------------------------------------------------------------------------- stages
def train_epoch(setup: Setup, epoch: int, disable_progress=None) -> dict:
    """One epoch in train mode; ``{"train_loss", "train_acc"}``: the averages over the
    epoch's batches (loss per example in nats, accuracy a fraction). Raises
    :class:`TrainingDiverged` at the first non-finite batch loss (before stepping).

    With several processes each global batch is split across the ranks and trained through
    DDP (:meth:`~layerhessians.training.distributed.Context.batch_loss`); afterwards rank 0's
    parameters and buffers are broadcast, so every rank ends the epoch with the same network."""
    config, data, model, dist = setup.config, setup.data, setup.model, setup.dist
    network = setup.ddp if setup.ddp is not None else model
    torch.manual_seed(derive_seed(config.seed, epoch, "train"))  # dropout & co.
    model.train()
    regularizer = epoch_regularizer(setup, epoch)  # None without --htr-gamma
    loss_sum, correct, seen = 0.0, 0, 0
    num_batches = math.ceil(len(data.train_y) / config.batch_size)
    batches = data.train_batches(config.batch_size, shuffle=True, augment=config.augment,
                                 seed=derive_seed(config.seed, epoch, "batches"))
    with progress_bar(disable_progress, total=num_batches, desc=f"epoch {epoch}", unit="step",
                      leave=False) as bar:  # a bar on a terminal, else a log line every 30 s
        for step, (x, y) in enumerate(batches):
            setup.optimizer.zero_grad(set_to_none=True)
            if regularizer is None:
                loss, value, hits = dist.batch_loss(network, setup.loss_fn, x, y)
            else:  # one process; the penalty reuses the step's forward where it can
                loss, data_loss, outputs = regularizer.loss((x, y), epoch=epoch, step=step)
                value, hits = data_loss.item(), int((outputs.argmax(1) == y).sum())
            if not math.isfinite(value):
                raise TrainingDiverged(epoch, value)
            loss.backward()
            setup.optimizer.step()
            loss_sum += value * len(y)
            correct += hits
            seen += len(y)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
    dist.broadcast_module(model)
    row = {"train_loss": loss_sum / seen, "train_acc": correct / seen}
    return row if regularizer is None else {**row, **regularizer.epoch_summary()}


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
    x, y = dist.shard(x), dist.shard(y)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(output, target, reduction="sum").double()
        correct += (output.argmax(1) == target).sum()
    model.train(was_training)
    loss_sum, correct = dist.sum_totals(loss_sum, correct)
    return loss_sum / total, correct / total


def write_fidelity(store: RunStore, epoch: int, rows) -> None:
    """Put epoch ``epoch``'s rows of ``--validate-layer-spectra`` into ``RUN/slq_fidelity.csv``
    (replacing that epoch's and later rows: a resumed epoch is measured again). Written
    before the epoch is committed, so a committed epoch always has its rows."""
    path = store.path / FIDELITY
    kept = pd.read_csv(path) if path.is_file() and path.stat().st_size else \
        pd.DataFrame(columns=FIDELITY_COLUMNS)
    kept = kept[kept["epoch"] < epoch]
    register_output(path, store.path)
    write_csv(path, pd.concat([kept, rows], ignore_index=True) if len(kept) else rows)


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
    test_top5 = top5_accuracy(setup.model, data.test_x, data.test_y, config.batch_size,
                              setup.dist)
    for name, value in (("test", test_loss), ("training", row["train_loss"])):
        if not math.isfinite(value) or value > DIVERGED * max(math.log(data.num_classes), 1.0):
            raise TrainingDiverged(epoch, value, where=name)  # before any spectra are taken
    _sync(device)
    eval_seconds = time.perf_counter() - start - train_seconds
    spectra, spectra_start, fidelity = None, time.perf_counter(), None
    if config.hessian.due(epoch, config.num_epochs):
        spectra = compute_spectra(setup, epoch, disable_progress)
    _sync(device)
    spectra_seconds = time.perf_counter() - spectra_start
    if spectra is not None and config.hessian.validate_layers:
        fidelity = slq_fidelity_rows(setup, epoch, spectra)
    validate_seconds = time.perf_counter() - spectra_start - spectra_seconds
    _crash_point(epoch, "spectra")
    row = {"lr": lr, **row, "test_loss": test_loss, "test_acc": test_acc, "test_top5": test_top5,
           "train_seconds": train_seconds, "spectra_seconds": spectra_seconds,
           "eval_seconds": eval_seconds, "top_eigenvalue": top_eigenvalue(spectra),
           **layer_metrics(spectra)}
    if fidelity is not None:
        row["validate_seconds"] = validate_seconds
    if store is not None:  # rank 0 (or the only process)
        if fidelity is not None:
            write_fidelity(store, epoch, fidelity)
        commit(store, setup, epoch, row, spectra)
    _crash_point(epoch, "committed")
    return row


def _after_commit(store: RunStore, setup: Setup, record: RunRecord, epochs):
    """Derived outputs (cheap, idempotent): training curves and the legacy files."""
    title = f"{record.model} on {record.dataset}"
    save_training_curves(store.metrics, store.images, title=title)
    if setup.config.export_legacy:
        export_legacy(store.path, epochs=epochs)


def _open_run(run_dir, run_config, config, resume, overwrite):
    """Rank 0's part of opening a run: ``(store, checkpoint state or None)``."""
    done = RunStore(run_dir).completed_epoch if Path(run_dir).is_dir() else None
    if resume and done is not None and done > config.num_epochs:
        raise UserError(f"{run_dir} already has {done} epochs; -n {config.num_epochs} would "
                        f"shorten it: pass -n {done} or more, or --overwrite")
    try:
        store = RunStore.create(run_dir, run_config, resume=resume, overwrite=overwrite,
                                ignore=RESUME_IGNORES)
    except OSError as err:  # not writable, not creatable (/proc/...), a file in the way
        raise UserError(f"cannot open the run directory {run_dir}: "
                        f"{err.strerror or type(err).__name__}"
                        + (f" ({err.filename})" if err.filename else "")
                        + "; choose a run directory in a folder you may write to") from None
    try:
        return store, store.load_checkpoint()
    except BaseException:
        store.close()
        raise


def train(config: TrainConfig, run_dir, *, resume=False, overwrite=False, command=None,
          progress=None, console=True) -> Path:
    """Run (or resume) the training run ``config`` in ``run_dir``; returns its path.

    Args:
        config: the run's settings (validated here).
        run_dir: the run directory (created; see ``layerhessians train --help``).
        resume: continue a run with the same settings (``num_epochs`` may grow).
        overwrite: replace whatever run is there.
        command: the command line, recorded in config.json.
        progress: ``None`` shows bars on a terminal only, ``False`` never.
        console: also log to stdout.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; they form one run
    (module docstring) and only rank 0 writes ``run_dir``.

    Returns:
        The run directory's path.

    Raises:
        UserError: bad settings, busy or conflicting directory, divergence
            (:class:`TrainingDiverged`).
    """
    config = config.validated()
    device = resolve_device(config.device)
    stored = _stored_config(run_dir) if resume and not overwrite else None
    recorded = None if stored is None else _threads_of(stored)
    threads, note = (config.threads, None) if stored is None else \
        resume_threads(recorded, config.threads)
    with thread_limits(threads), process_group(config.dist_backend, device) as dist:
        return _train(config, run_dir, dist, resume=resume, overwrite=overwrite,
                      command=command, progress=progress, console=console,
                      threads=(recorded, note), stored=stored)


def _stored_config(run_dir):
    """The record of the run in ``run_dir`` (``None``: no run there, or a damaged file,
    which opening the run reports)."""
    path = Path(run_dir) / CONFIG
    try:
        return read_record(path) if path.is_file() else None
    except UserError:
        return None


def _threads_of(stored: RunRecord):
    """The thread count a run's record holds (``None``: not recorded)."""
    value = stored.facts.get(THREADS_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def _log_layer_methods(logger, setup) -> None:
    methods = setup.layer_methods or {}
    exact = [name for name, method in methods.items() if method == "exact"]
    if not methods:
        return
    text = (f"layer spectra ({setup.config.hessian.layer_method}): exact for {len(exact)} of "
            f"{len(methods)} blocks")
    if setup.fallbacks:
        text += "; SLQ for " + "; ".join(f"{n} ({r})" for n, r in setup.fallbacks.items())
    logger.info(text)


def _train(config, run_dir, dist: Context, *, resume, overwrite, command, progress, console,
           threads=(None, None), stored=None):
    device = dist.device
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    seed_everything(config.seed)
    data = dist.in_turn(lambda: load_dataset(config.dataset, root=config.dataset_root,
                                             download=config.download))
    setup = plan_spectra(build(config, data, device, dist), warn=False)
    run_config = describe(setup, command)
    # None without a ggn/exact regulariser; a resumed run keeps those it recorded
    certificates = (stored.facts.get(CERTIFICATES_KEY) if stored is not None else None) \
        or penalty_certificates(setup)
    if certificates is not None:
        run_config = run_config.with_facts(**{CERTIFICATES_KEY: certificates})
    recorded, threads_note = threads
    if recorded is not None:  # a resumed run keeps the count it started with
        run_config = run_config.with_facts(**{THREADS_KEY: recorded})
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
            contextlib.nullcontext(Silent()) as logger:
        run_config = store.record if store is not None else run_config
        done = None if state is None else restore_state(setup, state)
        if done is None:
            where = (f"{dist.world_size} processes ({dist.backend}), rank 0 on "
                     if dist.active else "device ")
            blocks = (f"{len(setup.blocks)} layer blocks" if config.hessian.layers
                      else "no layer spectra (--no-layers)")
            logger.info(f"run {run_dir}: {config.model} on {config.dataset}, "
                        f"{setup.num_params:,} parameters, {blocks}, "
                        f"{where}{run_config.facts['device_name']}")
            used = config.to_dict()  # "auto" re-orthogonalisation as resolved
            used["hessian"]["reorthogonalize"] = run_config.spectra["reorthogonalize"]
            logger.info("settings: " + ", ".join(f"{k}={v}" for k, v in used.items()))
        else:
            logger.info(f"run {run_dir}: resuming after epoch {done} of {config.num_epochs}"
                        + (f" on {dist.world_size} processes" if dist.active else "")
                        + f", {torch.get_num_threads()} torch thread(s)")
        logger.info(f"spectra: {setup.hessian_examples} Hessian examples"
                    + (f" sharded over {dist.world_size} processes" if setup.reduction else "")
                    + f"; {setup.plan.summary()}")
        _log_layer_methods(logger, setup)
        for note in config.regularizer.notes(config.num_epochs):
            logger.warning(f"warning: {note}")
        if certificates is not None:
            line = certificate_line(certificates)
            (logger.info if all(c["certified"] for c in certificates.values())
             else logger.warning)(line)
        for note in setup.plan.notes:
            logger.warning(f"warning: {note}")
        if threads_note:
            logger.warning(f"warning: {threads_note}")
        if config.export_legacy and done is not None and store is not None:
            export_legacy(store.path)
        first = 0 if (done is None and config.hessian.init) else (1 if done is None else done + 1)
        if first > config.num_epochs:
            logger.info(f"run {run_dir} is complete ({done} epochs); raise -n to extend it")
            return Path(run_dir)
        epochs = range(first, config.num_epochs + 1)
        with progress_bar(disable, total=config.num_epochs, initial=first - 1 if first else 0,
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
                logger.info(format_row(epoch, config.num_epochs, row))
                if store is not None:
                    _after_commit(store, setup, run_config, [epoch])
                if epoch > 0:
                    bar.update()
        if store is not None:
            logger.info(f"done: {store.path} (epochs {store.metrics['epoch'].min()}.."
                        f"{config.num_epochs}; load with layerhessians.load_run)")
    return Path(run_dir) if store is None else store.path
