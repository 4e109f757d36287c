"""Spectra of your own model in your own training loop: :class:`SpectraTracker`.

Three lines in a loop::

    tracker = SpectraTracker(model, loss_fn, (x_hessian, y_hessian), run_dir="runs/mine")
    for epoch in range(1, epochs + 1):
        ...                              # train one epoch, as before
        tracker.update(epoch)            # full + per-block spectra, appended to the run

The run directory has the layout :class:`~layerhessians.store.writer.RunStore` writes for
``layerhessians train`` (config.json, metrics.csv, spectra.csv), so ``load_run``,
``layerhessians plot`` and ``layerhessians match`` read it unchanged. A tracker keeps no
copy of the model: its commit point is the store's checkpoint file holding only the
tracker's state (the last recorded epoch), written after the spectra and metrics rows
(atomic files). A loop killed at any moment leaves the rows of whole updates only; opened
again with ``resume=True`` the record continues after its last committed update.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerhessians import __version__
from layerhessians.curvature.batches import BatchLoss, as_batches
from layerhessians.curvature.blocks import layer_blocks, select_blocks
from layerhessians.errors import UserError, check_choice
from layerhessians.settings import SpectraSettings
from layerhessians.spectra import measure_layer_spectra
from layerhessians.spectra.layers import log as _engine_log
from layerhessians.store.checkpoints import save_torch
from layerhessians.store.consistency import VOLATILE_KEYS
from layerhessians.store.names import CHECKPOINTS, CONFIG, METRICS, run_path
from layerhessians.store.oserrors import os_errors
from layerhessians.store.readers import check_row, read_metrics
from layerhessians.store.record import INCREASING, TRACKER, RunRecord, differences, read_record
from layerhessians.store.writer import RunStore
from layerhessians.tracking.scalars import full_scalars, spectra_scalars
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import (
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
    FULL,
)

__all__ = ["SpectraTracker", "UNITS"]

log = logging.getLogger(__name__)

#: the engine's logger, whose notes (an exact-route fallback, a re-orthogonalisation
#: choice) repeat at every update with the same text: a tracker passes each text on once
_REPEATING_LOGGERS = (_engine_log.name,)


class _LogOnce(logging.Filter):
    """A context in which each message of :data:`_REPEATING_LOGGERS` passes once (per
    instance: the first update logs why a block falls back to SLQ, later ones do not;
    details in brackets are ignored when comparing)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # the same note with other numbers in its brackets ("relative residual 0.8") is
        # the same note
        message = re.sub(r"\([^()]*\)", "(...)", record.getMessage())
        if message in self.seen:
            return False
        self.seen.add(message)
        return True

    def __enter__(self):
        for name in _REPEATING_LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in _REPEATING_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        return False

#: what the index of an update counts (recorded as config.json's ``unit``; the run's
#: ``epoch`` column holds it)
UNITS = ("epoch", "step")
#: config.json keys that may change when a tracker run is resumed
RESUME_IGNORES = VOLATILE_KEYS | {"threads", "reuse_graph", "micro_batch_size", "memory_budget"}
#: the tracker's state of an earlier update, written to rewind the record to it
#: (``RUN/checkpoints/``; removed once the store's rewind has finished)
REWIND_SOURCE = "rewind.pt"
#: layer_spectra arguments that are objects of the run, not settings (not recorded)
_RUNTIME = ("reduction", "certificates")
#: the keyword options: every SpectraSettings field the signature does not name, and those
_OPTIONS = (set(SpectraSettings.field_names()) - {"iterations", "vectors", "seed",
                                                   "distribution", "kind", "bn_mode"}) \
    | set(_RUNTIME)


# ----------------------------------------------------------------------------- adapters
def _select_blocks(model: nn.Module, blocks) -> "OrderedDict[str, list]":
    """``{block name: [leaf parameters]}`` from ``True`` (:func:`layer_blocks`), ``False``/
    ``None`` (no blocks: the full spectrum only) or a ``{name: parameter(s) or module}``
    mapping (checked by :func:`select_blocks`)."""
    if blocks is True:
        return layer_blocks(model)
    if blocks is False or blocks is None:
        return OrderedDict()
    if not isinstance(blocks, Mapping):
        raise UserError("blocks must be True (every Conv2d/Linear weight), False (the full "
                        "spectrum only) or a {name: parameter(s)} mapping (see "
                        "layerhessians.select_blocks)")
    # a tied weight listed under both of its names (embedding and head) is one parameter
    unique = OrderedDict()
    for name, params in blocks.items():
        if isinstance(params, (nn.Module, torch.Tensor)):
            params = [params]
        unique[name] = list({id(p): p for p in params}.values())
    return select_blocks(model, mapping=unique)


# ----------------------------------------------------------------------------- helpers
def _to_device(data, device):
    """``data`` (tensors in tuples, lists and dicts) with every tensor on ``device``."""
    if torch.is_tensor(data):
        return data.to(device)
    if isinstance(data, Mapping):
        return type(data)((k, _to_device(v, device)) for k, v in data.items())
    if isinstance(data, (tuple, list)):
        return type(data)(_to_device(v, device) for v in data)
    return data


def _examples(data) -> int | None:
    """Number of examples of ``(inputs, targets)`` pairs (first dimension of the inputs);
    ``None`` where the data has another form."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        data = [data]
    try:
        return int(sum(int(x.shape[0]) for x, _ in data))
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


def _fixed_data(data, batch_loss: bool):
    """The Hessian data, fixed once: a pair or a list of pairs as given (a map-style dataset
    as one batch); any other iterable (a ``DataLoader``, which may shuffle or augment, a
    generator) is read ONCE into a list of batches, so every update measures the same data.

    Raises:
        UserError: empty or malformed data (as the engine's ``as_batches``).
    """
    if isinstance(data, list) or (isinstance(data, tuple) and len(data) == 2
                                  and torch.is_tensor(data[0])):
        return data
    if batch_loss:
        return as_batches(data, pairs=False)
    fixed = as_batches(data)
    return fixed[0] if len(fixed) == 1 else fixed


def _checksum(data) -> str:
    """SHA-256 (hex) of every tensor of ``data`` (dtype, shape and bytes, in order), so a
    resumed record is refused if its Hessian data changed."""
    digest = hashlib.sha256()
    stack = [data]
    while stack:
        item = stack.pop(0)
        if torch.is_tensor(item):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(item, Mapping):
            stack[:0] = [item[k] for k in item]
        elif isinstance(item, (tuple, list)):
            stack[:0] = list(item)
    return digest.hexdigest()


def _parameter_names(model: nn.Module, blocks) -> "OrderedDict[str, list[str]]":
    """The selection as parameter names (a tied parameter under its first name); refuses
    a block that is empty or holds a tensor that is not a trainable parameter of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    result = OrderedDict()
    for block, params in _select_blocks(model, blocks).items():
        if not params:
            raise UserError(f"block {block!r} has no parameters; give it at least one")
        chosen = []
        for p in params:
            if id(p) not in names or not p.requires_grad:
                raise UserError(f"block {block!r} holds a tensor that is not a trainable "
                                "parameter of the model; pass the model's own parameters")
            if names[id(p)] not in chosen:
                chosen.append(names[id(p)])
        result[block] = chosen
    return result


# ----------------------------------------------------------------------------- tracker
class SpectraTracker:
    """Full and per-block Hessian spectra of ``model`` through training, recorded as a run.

    Each :meth:`update` runs :func:`~layerhessians.spectra.layer_spectra` (stochastic
    Lanczos quadrature, one shared first-order graph) on the fixed Hessian data at the
    model's current weights, with start vectors seeded from ``(seed, index)``, appends the
    spectra to the run directory, and sends scalars to the loggers. The model's parameters,
    buffers, gradients and train/eval modes are left as they were, and no random number
    generator of the loop is drawn from, so tracking never changes training.

    Args:
        model: the network (any ``nn.Module``); parameters are looked up by name at every
            update, so the model may move between devices.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar tensor, the MEAN loss of a
            batch (e.g. ``nn.CrossEntropyLoss()``). The spectra are those of the mean loss
            over all examples of ``data``. For a language model whose loss is the mean over
            tokens, an "example" is one token position: pass targets of shape ``[B, T]``
            and a loss that flattens ``[B, T, V]`` outputs to ``[B*T, V]``.
        data: the fixed Hessian data: one ``(inputs, targets)`` pair, a list of pairs, a
            map-style dataset (one batch) or a ``DataLoader``/iterable of pairs, which is
            read ONCE (an augmenting or shuffling loader would otherwise give other data at
            every update); its SHA-256 is recorded and checked at every update.
        run_dir: the run directory, or ``None`` to record nothing (spectra are returned and
            logged only).
        blocks: ``True`` (every Conv2d/Linear weight, as ``layerhessians train``), ``False``
            (the full spectrum only) or a ``{block name: parameter or [parameters]}``
            mapping (e.g. attention vs MLP vs embedding weights).
        loggers: callables ``hook(index, scalars, spectra)`` called after each update with
            the update's index, :func:`~layerhessians.tracking.scalars.spectra_scalars`
            (``{"top_eigenvalue/<block>": float, "trace/<block>": float}``) and the spectra.
            :class:`~layerhessians.integrations.tensorboard.TensorBoardLogger` is one.
        iterations: Lanczos steps per start vector (default 128, the paper's).
        vectors: random start vectors per block (default 1).
        seed: base seed; update ``i`` uses ``derive_seed(seed, i, "spectra")``, as
            ``layerhessians train`` does at epoch ``i``.
        distribution: start vectors, ``"gaussian"`` (default) or ``"rademacher"``.
        kind: curvature, ``"hessian"`` (default), ``"ggn"``, ``"residual"`` or ``"ef"``.
        bn_mode: batch norm in ``"eval"`` (running statistics, default) or ``"train"`` mode.
        unit: what the update index counts, ``"epoch"`` (default) or ``"step"``; recorded
            in config.json, the run's ``epoch`` column holds the index either way.
        resume: continue the record in ``run_dir`` if it holds one (same settings, blocks
            and Hessian data, by SHA-256 checksum, required; updates after the last
            committed one are appended), else start it there: the same code serves a loop's
            first start and every restart (:attr:`completed` says where to continue).
        overwrite: replace whatever run is in ``run_dir``.
        model_name, dataset: recorded in config.json (titles of ``plot``, labels of
            ``match``); default the model's class name and ``None``.
        settings: more facts to record in config.json (JSON-serialisable; must be equal on
            resume), e.g. the optimizer's settings.
        progress: show progress over the Lanczos steps.
        **options: further :func:`~layerhessians.spectra.layer_spectra` arguments
            (``reorthogonalize``, ``micro_batch_size``, ``reuse_graph``,
            ``memory_budget``, ...), recorded in config.json.

    Raises:
        UserError: an unknown setting or option, a bad block selection, or a run directory
            that holds another run (or this one, without ``resume=True``) or is in use.
    """

    def __init__(self, model: nn.Module, loss_fn, data, run_dir=None, *, blocks=True,
                 loggers=(), iterations: int = DEFAULT_ITERATIONS,
                 vectors: int = DEFAULT_VECTORS, seed: int = 0,
                 distribution: str = DEFAULT_DISTRIBUTION, kind: str = "hessian",
                 bn_mode: str = "eval", unit: str = "epoch", resume: bool = False,
                 overwrite: bool = False, model_name: str | None = None,
                 dataset: str | None = None, settings: dict | None = None,
                 progress: bool = False, **options):
        if not isinstance(model, nn.Module):
            raise UserError("model must be a torch.nn.Module")
        check_choice(unit, UNITS, "unit")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise UserError(f"unknown spectra option(s) {', '.join(unknown)}; accepted: "
                            f"{', '.join(sorted(_OPTIONS))}")
        runtime = {k: options[k] for k in _RUNTIME if k in options}
        self.spectra = SpectraSettings(
            iterations=iterations, vectors=vectors, seed=seed, distribution=distribution,
            kind=kind, bn_mode=bn_mode,
            **{k: v for k, v in options.items() if k not in _RUNTIME})
        if not callable(loss_fn):
            raise UserError("loss_fn must be callable: loss_fn(model(inputs), targets)")
        loggers = [loggers] if callable(loggers) else list(loggers)
        for logger in loggers:
            if not callable(logger):
                raise UserError("every logger must be callable: hook(index, scalars, spectra)")
        self.model, self.loss_fn = model, loss_fn
        self.data = _fixed_data(data, isinstance(loss_fn, BatchLoss))
        self._checksum = _checksum(self.data)
        self.loggers = loggers
        self.unit, self.seed, self.progress = unit, self.spectra.seed, progress
        self._runtime = runtime
        self.block_names = _parameter_names(model, blocks)
        self._dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._device_data = (None, None)
        self._once = _LogOnce()  # the engine's fallback notes: once per tracker
        self.store = None
        if run_dir is not None:
            self._config = self._describe(model_name, dataset, settings)
            self.store = self._open(run_path(run_dir), self._config, resume, overwrite)

    # -- the record --------------------------------------------------------------------
    def _describe(self, model_name, dataset, settings) -> RunRecord:
        params = dict(self.model.named_parameters())
        dims = OrderedDict({FULL: sum(p.numel() for p in params.values() if p.requires_grad)})
        for block, names in self.block_names.items():
            dims[block] = sum(params[n].numel() for n in names)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        facts = {
            "writer": TRACKER,
            "model": model_name or type(self.model).__name__,
            "dataset": dataset,
            "indices": INCREASING,
            "num_params": dims[FULL],
            "hessian_examples": _examples(self.data),
            "hessian_checksum": self._checksum,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "versions": {"layerhessians": __version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tracker = {"unit": self.unit, "block_params": dict(self.block_names),
                   "settings": settings or {}}
        return RunRecord.make(facts, self.spectra, dims, tracker=tracker)

    @staticmethod
    def _open(path: Path, config: RunRecord, resume: bool, overwrite: bool) -> RunStore:
        # tracker-worded refusals first; the store then recovers an interrupted operation
        # and verifies the files (load_run would refuse a directory with a journal)
        if (path / CONFIG).is_file() and not overwrite:
            diffs = differences(read_record(path / CONFIG), config, RESUME_IGNORES)
            if diffs:
                raise UserError(f"{path} holds a run with different settings "
                                f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); "
                                "pass overwrite=True to replace it, or another run_dir")
            if len(read_metrics(path / METRICS)) and not resume:
                raise UserError(f"{path} already holds this run; pass resume=True to continue "
                                "its record, or overwrite=True to start over")
        return RunStore.create(path, config, resume="allow" if resume else False,
                               overwrite=overwrite, ignore=RESUME_IGNORES, spelling="api")

    @property
    def run_dir(self) -> Path | None:
        """The run directory (``None`` without one)."""
        return None if self.store is None else self.store.path

    @property
    def completed(self) -> int | None:
        """Index of the last committed update (``None``: none yet, or no run directory)."""
        return None if self.store is None else self.store.completed_epoch

    def seed_for(self, index: int) -> int:
        """The SLQ seed of update ``index``: ``derive_seed(seed, index, "spectra")``."""
        return derive_seed(self.seed, index, "spectra")

    def blocks(self) -> "OrderedDict[str, list[nn.Parameter]]":
        """``{block name: [parameters]}`` of the model as it is now (looked up by name).

        Raises:
            UserError: a block's parameter is gone (the model was pruned or rebuilt).
        """
        params = dict(self.model.named_parameters())
        missing = [n for names in self.block_names.values() for n in names if n not in params]
        if missing:
            raise UserError(f"the model no longer has the parameter(s) {', '.join(missing)} "
                            "the tracker's blocks were built on (pruned, grown or rebuilt "
                            "model): start a new tracker (a new run_dir) for the new model")
        return OrderedDict((block, [params[n] for n in names])
                           for block, names in self.block_names.items())

    def _data(self):
        params = list(self.model.parameters())
        device = params[0].device if params else torch.device("cpu")
        if self._device_data[0] != device:
            self._device_data = (device, _to_device(self.data, device))
        return self._device_data[1]

    # -- measuring ---------------------------------------------------------------------
    def compute(self, index: int) -> "OrderedDict":
        """The spectra of update ``index`` at the current weights, without recording or
        logging them.

        Args:
            index: the update's index (it seeds the start vectors, :meth:`seed_for`).

        Returns:
            ``OrderedDict`` ``{"full": SpectralMeasure, block: SpectralMeasure, ...}``.
        """
        with self._once:
            return measure_layer_spectra(self.model, self.loss_fn, self._data(),
                                         self.spectra.with_seed(self.seed_for(index)),
                                         layers=self.blocks() or False, progress=self.progress,
                                         **self._runtime)

    def update(self, epoch: int | None = None, *, step: int | None = None,
               metrics: dict | None = None) -> "OrderedDict":
        """Measure the spectra now, record them as update ``epoch`` (or ``step``), log them.

        Args:
            epoch: the index of this update for a tracker with ``unit="epoch"``.
            step: the index for a tracker with ``unit="step"`` (give one of the two).
            metrics: more numbers for this row of metrics.csv, e.g. ``{"train_loss": ...,
                "test_loss": ..., "test_acc": ...}`` (``layerhessians plot`` draws the
                training curves from the ``train_``/``test_`` loss and accuracy columns).

        Returns:
            ``OrderedDict`` ``{"full": SpectralMeasure, block name: SpectralMeasure, ...}``.

        Raises:
            UserError: no index, the wrong one for ``unit``, a negative index, or metrics
                that are not numbers.

        An index at or below the last committed one first rewinds the record to the update
        before it, through the store's journalled rewind (:meth:`RunStore.rewind`; a
        record that starts at that index is started over), then records the update (a loop
        resumed from an older model checkpoint records again from there). An update
        interrupted before the rewind leaves the record as it was; one interrupted later
        leaves the record as rewound (the next open finishes an interrupted rewind).
        """
        index = self._index(epoch, step)
        row = self._metrics_row(metrics)
        if _checksum(self.data) != self._checksum:
            raise UserError("the tracker's Hessian data changed in place since it was built: "
                            "the spectra of different updates would not be comparable; pass "
                            "a copy of the data (or start a new tracker)")
        dim = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        recorded = self._config.num_params if self.store is not None else self._dim
        if dim != recorded:
            log.warning("tracker: the full operator has %d trainable parameters at %s %d, "
                        "not %d as when the tracker was built (parameters frozen, unfrozen "
                        "or added); recorded in metrics.csv as full_dim", dim, self.unit,
                        index, recorded)
        row["full_dim"] = float(dim)
        start = time.perf_counter()
        spectra = self.compute(index)
        seconds = time.perf_counter() - start
        scalars = spectra_scalars(spectra)
        if self.store is not None:
            previous = self.completed
            if previous is not None and index <= previous:
                log.warning("tracker: %s %d was already recorded (up to %d); its rows and "
                            "later ones are dropped and recorded again", self.unit, index,
                            previous)
                self._rewind_before(index)
            self.store.commit_epoch(index, {**row, "spectra_seconds": seconds,
                                            **full_scalars(scalars)},
                                    spectra, checkpoint={"unit": self.unit})
        for logger in self.loggers:
            logger(index, scalars, spectra)
        return spectra

    def _rewind_before(self, index: int):
        """Drop the rows of ``index`` and later ones, keeping the store's invariants (the
        CSVs' digests in the checkpoint): the store's journalled rewind to the tracker's
        state of the last update before ``index``, or, when the record starts at
        ``index``, the store's journalled overwrite of the run."""
        earlier = [int(e) for e in self.store.metrics["epoch"] if e < index]
        if not earlier:  # nothing recorded before index: start the record over
            self.store.close()
            self.store = RunStore.create(self.store.path, self._config, overwrite=True,
                                         ignore=RESUME_IGNORES)
            return
        source = self.store.path / CHECKPOINTS / REWIND_SOURCE
        save_torch(source, {"unit": self.unit, "epoch": max(earlier)})
        self.store.rewind(source, state_keys=("unit",))
        with os_errors("remove", source):
            source.unlink(missing_ok=True)

    def _index(self, epoch, step) -> int:
        given = {"epoch": epoch, "step": step}
        named = [k for k, v in given.items() if v is not None]
        if len(named) != 1:
            raise UserError(f"update needs one index: update({self.unit}=...)")
        if named[0] != self.unit:
            raise UserError(f"this tracker counts {self.unit}s (unit={self.unit!r}); call "
                            f"update({self.unit}=...) or build it with unit={named[0]!r}")
        index = given[named[0]]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise UserError(f"{self.unit} must be a non-negative integer; got {index!r}")
        return int(index)

    @staticmethod
    def _metrics_row(metrics) -> dict:
        if isinstance(metrics, Mapping) and "epoch" in metrics:
            raise UserError("metrics must not hold 'epoch': it is the update's index")
        row = check_row(dict(metrics) if isinstance(metrics, Mapping) else
                        ({} if metrics is None else metrics))  # what the record can hold
        missing = [k for k, v in row.items() if v != v]  # NaN: not a measurement
        if missing:
            raise UserError(f"metric {missing[0]!r} is NaN (the model may have diverged); "
                            "pass finite numbers, or leave the metric out of this update")
        return row

    # -- closing -----------------------------------------------------------------------
    def close(self):
        """Release the run directory's lock (the record is complete after every update)."""
        if self.store is not None:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        where = f"run_dir={str(self.run_dir)!r}" if self.store is not None else "no run_dir"
        return (f"SpectraTracker({type(self.model).__name__}, blocks={list(self.block_names)}, "
                f"{where}, completed={self.completed})")
