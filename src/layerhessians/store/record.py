"""The run record: what a run's ``config.json`` holds, one shape for every writer
(``layerhessians train`` and :class:`~layerhessians.tracking.SpectraTracker`).

Shape (``RECORD_VERSION`` 2)::

    {"record": 2,
     "facts":    {"writer": "train" | "SpectraTracker", "model", "dataset",
                  "indices": "consecutive" | "increasing", "num_params", "hessian_examples",
                  "device", "threads", "versions", "host", "start_time", ... (the writer's
                  other facts: dataset checksum, Hessian data checksum, world size, the
                  memory plan's choices, the command line, ``resumed_at``)},
     "spectra":  SpectraSettings.to_dict() (the settings as run),
     "blocks":   {"full": dim, block: dim, ...} (measured blocks, in order),
     "training": TrainConfig.to_dict() less the values held above (trainer; else null),
     "tracker":  {"unit", "block_params", "settings"} (SpectraTracker; else null)}

``indices`` says how a run's update indices advance: ``"consecutive"`` (every epoch once)
or ``"increasing"`` (strictly increasing, possibly skipping: a tracker updated every k steps).
The training section holds every :class:`~layerhessians.training.config.TrainConfig` field
except ``model``, ``dataset`` (facts) and those :data:`~layerhessians.settings.SETTINGS`
maps to a spectra setting (spectra); :meth:`RunRecord.training_settings` puts them back.

Runs written before this shape (a flat dict: the trainer's with ``"hessian"`` nested, the
tracker's with ``"source": "SpectraTracker"``) are converted by :func:`from_legacy`, the one
place that reads them. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.settings import SETTINGS, SpectraSettings
from layerhessians.vocabulary import FULL

__all__ = ["RECORD_VERSION", "RunRecord", "differences", "from_legacy", "read_record"]

#: the version of the shape, config.json's ``"record"``
RECORD_VERSION = 2
#: the writers
TRAINER, TRACKER = "train", "SpectraTracker"
#: how update indices advance (facts ``indices``)
CONSECUTIVE, INCREASING = "consecutive", "increasing"
#: training settings recorded as facts (the run's identity, common to every writer)
SHARED = ("model", "dataset")

# -- the previous release's shapes (frozen: what its writers wrote) --------------------
#: the old trainer's facts (its other top-level keys were TrainConfig fields)
_LEGACY_FACTS = ("num_params", "num_classes", "in_channels", "train_examples",
                 "test_examples", "hessian_examples", "dataset_checksum", "dataset_folder",
                 "device", "device_name", "world_size", "backend", "micro_batch_size",
                 "reuse_graph", "memory_budget_bytes", "threads", "versions", "host",
                 "start_time", "command", "resumed_at")
#: values of trainer settings added after runs were recorded (their layer spectra were SLQ)
LEGACY_HESSIAN = {"layer_method": "slq", "validate_layers": False}
#: the old tracker's keys that were not spectra settings
_LEGACY_TRACKER = ("unit", "block_params", "settings")


@dataclass(frozen=True)
class RunRecord:
    """A run's ``config.json``, read or to be written (sections as in the module docstring).

    Attributes:
        facts: what the run is and where it ran (``writer``, ``model``, ``dataset``,
            ``indices``, versions, device, threads, data checksums, ...).
        spectra: the spectra settings as run (:meth:`SpectraSettings.to_dict`).
        blocks: ``{block: parameters}``, ``"full"`` first, the measured blocks in order.
        training: the trainer's settings (``None`` for other writers).
        tracker: the tracker's own fields (``None`` for other writers).
    """

    facts: dict
    spectra: dict
    blocks: dict
    training: dict | None = None
    tracker: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept as read

    # -- reading -------------------------------------------------------------------------
    @property
    def writer(self) -> str | None:
        """``"train"``, ``"SpectraTracker"`` (``None``: unknown). Recorded, never branched on."""
        return self.facts.get("writer")

    @property
    def model(self):
        """The model's name (``None`` if not recorded)."""
        return self.facts.get("model")

    @property
    def dataset(self):
        """The dataset's name or path (``None`` if not recorded)."""
        return self.facts.get("dataset")

    @property
    def consecutive(self) -> bool:
        """Whether every update index is recorded once in a row (a trainer's epochs), not
        only strictly increasing (a tracker updated every k steps)."""
        return self.facts.get("indices", CONSECUTIVE) == CONSECUTIVE

    @property
    def block_names(self) -> list:
        """The measured blocks, ``"full"`` first."""
        return list(self.blocks)

    @property
    def block_dims(self) -> dict:
        """``{block: number of parameters}`` of the blocks whose size is recorded."""
        return {k: int(v) for k, v in self.blocks.items() if isinstance(v, int)}

    @property
    def num_params(self):
        """Trainable parameters of the model (``None`` if not recorded)."""
        return self.facts.get("num_params", self.block_dims.get(FULL))

    def settings(self) -> SpectraSettings:
        """The spectra settings as :class:`SpectraSettings` (validated)."""
        return SpectraSettings.from_dict(self.spectra)

    def training_settings(self) -> dict:
        """The trainer's settings as ``TrainConfig.to_dict()`` spells them (``model``,
        ``dataset`` and the spectra values put back at their ``TrainConfig`` paths);
        ``{}`` for a run without a training section."""
        if self.training is None:
            return {}
        out = json.loads(json.dumps(self.training))  # a deep copy
        out.update({k: self.facts[k] for k in SHARED if k in self.facts})
        values = {k: v for k, v in self.spectra.items() if k in SETTINGS}
        for path, value in SpectraSettings.config_values(values).items():
            *parents, leaf = path.split(".")
            target = out
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
        return out

    # -- writing -------------------------------------------------------------------------
    @classmethod
    def make(cls, facts: dict, spectra: SpectraSettings, blocks: dict, *, training=None,
             tracker=None) -> RunRecord:
        """A new record: ``training`` is ``TrainConfig.to_dict()`` as given (the values the
        facts and the spectra section hold are taken out of it here)."""
        if training is not None:
            training = json.loads(json.dumps(training, default=str))
            for key in SHARED:
                training.pop(key, None)
            for path in SpectraSettings.config_values(spectra.to_dict()):
                *parents, leaf = path.split(".")
                target = training
                for part in parents:
                    target = target.get(part, {})
                target.pop(leaf, None)
        return cls(facts=dict(facts), spectra=spectra.to_dict(), blocks=dict(blocks),
                   training=training, tracker=None if tracker is None else dict(tracker))

    def to_dict(self) -> dict:
        """The JSON object written to ``config.json``."""
        return {**self.extra, "record": RECORD_VERSION, "facts": self.facts,
                "spectra": self.spectra, "blocks": self.blocks, "training": self.training,
                "tracker": self.tracker}

    def with_facts(self, **facts) -> RunRecord:
        """A copy with ``facts`` set."""
        return replace(self, facts={**self.facts, **facts})

    def resumed_by(self, new: RunRecord, ignore) -> RunRecord:
        """This record continued by ``new``: the keys that may change (``ignore``) from
        ``new``, the start time kept, ``new``'s start time appended to ``resumed_at``."""
        sections = {}
        for name in ("facts", "spectra", "training", "tracker"):
            before, after = getattr(self, name), getattr(new, name)
            sections[name] = before if before is None or after is None else \
                {**before, **{k: v for k, v in after.items() if k in ignore}}
        sections["facts"]["start_time"] = self.facts.get("start_time")
        sections["facts"]["resumed_at"] = [*self.facts.get("resumed_at", []),
                                           new.facts.get("start_time")]
        return replace(self, **sections)

    @classmethod
    def from_dict(cls, data) -> RunRecord:
        """The record of a ``config.json`` object, in this shape or a legacy one.

        Raises:
            UserError: ``data`` is not an object, or a section has the wrong type.
        """
        if not isinstance(data, dict):
            raise UserError(f"the run record is a JSON {type(data).__name__}, not an object")
        if data.get("record") != RECORD_VERSION:
            return from_legacy(data)
        sections = {}
        for name, kind in (("facts", dict), ("spectra", dict), ("blocks", dict),
                           ("training", (dict, type(None))), ("tracker", (dict, type(None)))):
            if not isinstance(data.get(name), kind):
                raise UserError(f"the run record's {name!r} section is not an object")
            sections[name] = data.get(name)
        extra = {k: v for k, v in data.items() if k not in {"record", *sections}}
        return cls(**sections, extra=extra)

    def flat(self) -> dict:
        """``{path: value}`` of every value (nested objects followed; the section name
        left out of the path: ``learning_rate``, ``hessian.every``, ``iterations``)."""
        out = {}

        def walk(prefix, value):
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), item)
            else:
                out[prefix] = value

        for section in ("facts", "spectra", "training", "tracker"):
            walk("", getattr(self, section) or {})
        out["blocks"] = self.blocks
        return out


def from_legacy(data: dict) -> RunRecord:
    """The record of a ``config.json`` written before :data:`RECORD_VERSION` (the one
    reader of the old shapes): the trainer's flat dict (``TrainConfig`` fields with
    ``"hessian"`` nested, then its facts) or the tracker's (``"source": "SpectraTracker"``,
    its settings flat)."""
    dims = data.get("block_dims") if isinstance(data.get("block_dims"), dict) else \
        data.get("dims") if isinstance(data.get("dims"), dict) else {}
    names = data.get("blocks") if isinstance(data.get("blocks"), list) else list(dims)
    blocks = {name: dims.get(name) for name in names}
    if data.get("source") == TRACKER:
        given = {k: v for k, v in data.items() if k in SpectraSettings.field_names()}
        facts = {k: v for k, v in data.items() if k not in given and k not in
                 {"source", "blocks", "block_dims", *_LEGACY_TRACKER}}
        facts.update(writer=TRACKER, indices=INCREASING)
        tracker = {k: data[k] for k in _LEGACY_TRACKER if k in data}
        return RunRecord(facts=facts, spectra=_legacy_spectra(given).to_dict(), blocks=blocks,
                         tracker=tracker)
    facts = {k: data[k] for k in (*SHARED, *_LEGACY_FACTS) if k in data}
    facts.update(writer=TRAINER, indices=CONSECUTIVE)
    training = {k: v for k, v in data.items() if k not in {*SHARED, *_LEGACY_FACTS, "blocks",
                                                           "block_dims", "dims"}}
    for key in ("device", "threads"):  # the old reader took the facts' values
        if key in data:
            training[key] = data[key]
    hessian = training.get("hessian")
    if isinstance(hessian, dict):
        training["hessian"] = {**LEGACY_HESSIAN, **hessian}
    values = {}
    for row in SETTINGS.values():
        value, found = training, row.config is not None
        for part in (row.config or "").split("."):
            found = found and isinstance(value, dict) and part in value
            value = value.get(part) if found else None
        if found:
            values[row.field] = value
    if "micro_batch_size" in values or "hessian_batch_size" in training:
        values["micro_batch_size"] = values.get("micro_batch_size") or "auto"
    values.setdefault("reuse_graph", "auto")
    record = RunRecord.make(facts, _legacy_spectra(values), blocks, training=training)
    return record


def _legacy_spectra(values: dict) -> SpectraSettings:
    try:
        return SpectraSettings(**values)
    except UserError as err:
        raise UserError(f"its spectra settings are not valid ({err})") from None


def read_record(path) -> RunRecord:
    """The :class:`RunRecord` of the ``config.json`` at ``path``.

    Raises:
        UserError: one line naming the file: unreadable, not JSON, or not a run record.
    """
    from layerhessians.store.readers import problem, read_config

    path = Path(path)
    data = read_config(path)
    try:
        return RunRecord.from_dict(data)
    except UserError as err:
        raise problem(path, f"is not a run record: {err}") from None


def differences(old: RunRecord, new: RunRecord, ignore=frozenset()) -> list:
    """``["key: old -> new", ...]`` for the values that differ between two records
    (keys as :meth:`RunRecord.flat` spells them; a key with any part in ``ignore`` is
    skipped)."""
    a, b = old.flat(), new.flat()
    out = []
    for key in dict.fromkeys([*a, *b]):
        if any(part in ignore for part in key.split(".")):
            continue
        if json.dumps(a.get(key), default=str) != json.dumps(b.get(key), default=str):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out
