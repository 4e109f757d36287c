"""The settings of one spectra computation, spelled once: :class:`SpectraSettings`.

Frozen and free of torch (``layerhessians --help`` reads it). Making one validates every
value and canonicalises it (``"GGN"`` -> ``"ggn"``, ``"none"`` -> ``False``); a bad value is
a :class:`~layerhessians.errors.SettingError` whose message names the setting as the caller
spells it: ``iterations`` in the Python API, ``--hessian-iterations`` on the command line
(``str(err)`` is the API's; ``err.spelled("cli")`` the CLI's).

:data:`SETTINGS` is the one table from the other spellings onto the fields:

==================  ===========================  ===============================
field               ``layerhessians train`` flag  ``TrainConfig`` field
==================  ===========================  ===============================
iterations          --hessian-iterations         hessian.iterations
vectors             --hessian-vectors            hessian.vectors
seed                --seed                       seed (per epoch: derive_seed)
distribution        --hessian-distribution       hessian.distribution
reorthogonalize     --hessian-reorthogonalize    hessian.reorthogonalize
kind                --hessian-kind               hessian.kind
bn_mode             --hessian-bn-mode            hessian.bn_mode
layer_method        --layer-spectra              hessian.layer_method
micro_batch_size    --hessian-batch-size         hessian_batch_size (None: "auto")
memory_budget       --memory-budget              memory_budget
==================  ===========================  ===============================

``layer_spectra``'s keywords and ``SpectraTracker``'s settings are the field names
themselves; ``reuse_graph``, ``loss_reduction`` and ``check_symmetry`` have no flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from numbers import Integral

from layerhessians.errors import SettingError, suggest
from layerhessians.vocabulary import (
    BN_MODES,
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
    DISTRIBUTIONS,
    KINDS,
    LAYER_METHODS,
    LOSS_REDUCTIONS,
    REORTHOGONALIZE,
)

__all__ = ["MIN_ITERATIONS", "SETTINGS", "Setting", "SpectraSettings", "parse_budget"]

#: the fewest Lanczos steps of a spectrum (one step gives one Ritz value, not a spectrum)
MIN_ITERATIONS = 2


@dataclass(frozen=True)
class Setting:
    """One row of :data:`SETTINGS`: a field's CLI flag and its ``TrainConfig`` path
    (``None``: not on that interface)."""

    field: str
    flag: str | None
    config: str | None


#: the one table: SpectraSettings field -> CLI flag, TrainConfig path
SETTINGS = {row.field: row for row in (
    Setting("iterations", "--hessian-iterations", "hessian.iterations"),
    Setting("vectors", "--hessian-vectors", "hessian.vectors"),
    Setting("seed", "--seed", "seed"),
    Setting("distribution", "--hessian-distribution", "hessian.distribution"),
    Setting("reorthogonalize", "--hessian-reorthogonalize", "hessian.reorthogonalize"),
    Setting("kind", "--hessian-kind", "hessian.kind"),
    Setting("bn_mode", "--hessian-bn-mode", "hessian.bn_mode"),
    Setting("layer_method", "--layer-spectra", "hessian.layer_method"),
    Setting("micro_batch_size", "--hessian-batch-size", "hessian_batch_size"),
    Setting("reuse_graph", None, None),
    Setting("memory_budget", "--memory-budget", "memory_budget"),
    Setting("loss_reduction", None, None),
    Setting("check_symmetry", None, None),
)}

# ----------------------------------------------------------------------------- budgets
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_budget(value) -> tuple[str, float] | None:
    """``None`` for ``None``/``"auto"``, ``("bytes", n)`` or ``("fraction", f)``.

    Accepted: an integer or float (bytes), ``"NUMBER UNIT"`` with UNIT in B, KB, MB, GB, TB
    (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), and ``"P%"`` (a percentage of
    the free memory, 0 < P <= 100).

    Raises:
        UserError: anything else.
    """
    from layerhessians.errors import UserError

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


# ----------------------------------------------------------------------------- checks
def _refuse(api: str, cli: str) -> SettingError:
    """A refusal worded for each interface (the API's and the CLI's conventions differ)."""
    return SettingError("{message}", {"message": (api, cli)})


def _flag(name: str) -> str:
    return SETTINGS[name].flag or name


#: the largest count a setting takes (steps, vectors, micro-batch size): a bound checked
#: before any work, so a mistyped size is refused rather than run; seeds go up to 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1


def _count(name: str, value, minimum: int, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if minimum > 1 and isinstance(value, Integral) and not isinstance(value, bool) \
                and value < 1:
            what = f"a positive integer (at least {minimum})"
        raise _refuse(f"{name} must be {what}; got {value!r}",
                      f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise _refuse(f"{name} must be at most {maximum}; got {value!r}",
                      f"{_flag(name)} must be an integer <= {maximum}, got {value!r}")
    return int(value)


def _choice(name: str, value, choices) -> str:
    by_lower = {c.lower(): c for c in choices}
    key = value.strip().lower() if isinstance(value, str) else None
    if key in by_lower:
        return by_lower[key]
    close = suggest(value, choices) if isinstance(value, str) else []
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise _refuse(f"{name} must be one of {', '.join(choices)}; got {value!r}{hint}",
                  f"unknown {_flag(name)} {value!r}; choose one of {', '.join(choices)}{hint}")


def _reorthogonalize(value):
    if isinstance(value, bool):
        return value
    words = {**REORTHOGONALIZE, "true": True, "false": False}
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in words:
        raise _refuse(f"reorthogonalize must be True, False or 'auto'; got {value!r}",
                      f"{_flag('reorthogonalize')} must be {', '.join(REORTHOGONALIZE)}, "
                      f"got {value!r}")
    return words[key]


def _auto_or(name: str, value, check):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return check(value)


def _flag_value(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _refuse(f"{name} must be True or False; got {value!r}",
                      f"{_flag(name)} must be true or false, got {value!r}")
    return value


def _reuse(value):
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() == "auto"):
        return value if isinstance(value, bool) else "auto"
    raise _refuse(f"reuse_graph must be True, False or 'auto'; got {value!r}",
                  f"reuse_graph must be True, False or 'auto'; got {value!r}")


def _budget(value):
    try:
        parse_budget(value)
    except ValueError as err:  # UserError
        raise _refuse(str(err), f"{_flag('memory_budget')}: {err}") from None
    return value if value is None or isinstance(value, (int, float)) else str(value).strip()


def _micro(value):
    if value is None:
        return None
    return _auto_or("micro_batch_size", value, lambda v: _count("micro_batch_size", v, 1))


# ----------------------------------------------------------------------------- the type
@dataclass(frozen=True)
class SpectraSettings:
    """How one spectra computation runs (validated and canonicalised when made).

    Attributes:
        iterations: Lanczos steps per start vector (at least :data:`MIN_ITERATIONS`;
            default 128, the paper's).
        vectors: random start vectors per operator (default 1).
        seed: base seed of the start vectors (``>= 0``).
        distribution: ``"gaussian"`` (the paper's) or ``"rademacher"``.
        reorthogonalize: ``True`` (full, float64), ``False`` (none, the original's) or
            ``"auto"`` (full when the bases fit the memory budget's share; the
            :class:`~layerhessians.spectra.plan.MemoryPlan` records the choice).
        kind: the curvature, one of :data:`~layerhessians.vocabulary.KINDS`.
        bn_mode: batch norm with running (``"eval"``) or batch (``"train"``) statistics.
        layer_method: layer blocks by ``"auto"``, ``"exact"`` (Gram route) or ``"slq"``.
        micro_batch_size: examples per first-order graph: ``None`` (the batches as given),
            an integer ``>= 1`` or ``"auto"`` (the largest that fits the budget).
        reuse_graph: keep the graphs for all products (``True``), rebuild them
            (``False``) or ``"auto"``.
        memory_budget: bytes, ``"8GB"``, ``"40%"`` or ``None`` (the default budget).
        loss_reduction: ``"mean"`` or ``"sum"`` (how ``loss_fn`` reduces a batch).
        check_symmetry: probe every operator's symmetry before Lanczos.

    Raises:
        SettingError: a value of the wrong type, out of range or not a choice.
    """

    iterations: int = DEFAULT_ITERATIONS
    vectors: int = DEFAULT_VECTORS
    seed: int = 0
    distribution: str = DEFAULT_DISTRIBUTION
    reorthogonalize: object = True
    kind: str = "hessian"
    bn_mode: str = "eval"
    layer_method: str = "auto"
    micro_batch_size: object = None
    reuse_graph: object = True
    memory_budget: object = None
    loss_reduction: str = "mean"
    check_symmetry: bool = True

    def __post_init__(self):
        canonical = {
            "iterations": _count("iterations", self.iterations, MIN_ITERATIONS),
            "vectors": _count("vectors", self.vectors, 1),
            "seed": _count("seed", self.seed, 0, MAX_SEED),
            "distribution": _choice("distribution", self.distribution, DISTRIBUTIONS),
            "reorthogonalize": _reorthogonalize(self.reorthogonalize),
            "kind": _choice("kind", self.kind, KINDS),
            "bn_mode": _choice("bn_mode", self.bn_mode, BN_MODES),
            "layer_method": _choice("layer_method", self.layer_method, LAYER_METHODS),
            "micro_batch_size": _micro(self.micro_batch_size),
            "reuse_graph": _reuse(self.reuse_graph),
            "memory_budget": _budget(self.memory_budget),
            "loss_reduction": _choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS),
            "check_symmetry": _flag_value("check_symmetry", self.check_symmetry),
        }
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

    def with_seed(self, seed: int) -> SpectraSettings:
        """These settings with another base seed (e.g. one epoch's)."""
        return replace(self, seed=seed)

    def to_dict(self) -> dict:
        """The settings as a plain ``dict`` (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> SpectraSettings:
        """The settings of :meth:`to_dict`'s ``dict`` (e.g. a run record's ``spectra``
        section); keys that are not fields are ignored, missing ones take the defaults.

        Raises:
            SettingError: a bad value.
        """
        return cls(**{k: v for k, v in data.items() if k in SETTINGS})

    @staticmethod
    def config_values(values: dict) -> dict:
        """``{TrainConfig path: value}`` of the settings in ``values`` (a field -> value
        ``dict``) that :data:`SETTINGS` maps to a ``TrainConfig`` path, the inverse of
        :meth:`from_config` (``micro_batch_size="auto"`` is an unset ``hessian_batch_size``)."""
        out = {}
        for name, value in values.items():
            row = SETTINGS.get(name)
            if row is None or row.config is None:
                continue
            out[row.config] = None if name == "micro_batch_size" and value == "auto" else value
        return out

    @classmethod
    def field_names(cls) -> tuple:
        """The fields, in order (also ``layer_spectra``'s and the tracker's keywords)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_config(cls, config, check=None) -> SpectraSettings:
        """The settings of a ``TrainConfig`` (or any object with its attributes), read
        through :data:`SETTINGS`; an unset ``hessian_batch_size`` means ``"auto"`` and
        graphs are kept or rebuilt as the memory plan decides.

        ``check(values)``, when given, makes the settings from the ``dict`` of values
        (e.g. to re-word a refusal); without it they are made here.

        Raises:
            SettingError: a bad value (print ``spelled("cli")`` for the flag's name).
        """
        values = {}
        for row in SETTINGS.values():
            if row.config is None:
                continue
            value = config
            for part in row.config.split("."):
                value = getattr(value, part)
            values[row.field] = value
        if values["micro_batch_size"] is None:
            values["micro_batch_size"] = "auto"
        values["reuse_graph"] = "auto"
        return cls(**values) if check is None else check(values)
