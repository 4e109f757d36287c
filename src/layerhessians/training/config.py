"""The settings of a training run: :class:`TrainConfig` (training, data, run) holding a
:class:`HessianConfig` (the spectra engine), with the seed's defaults and validation.

``TrainConfig(...).validated()`` canonicalises names (``"lenet"`` -> ``"LeNet"``) and checks
values, raising :class:`UserError` with a one-line fix; ``to_dict()`` (flat, with
``"hessian"`` nested) is the training section of a run's ``config.json``
(:mod:`layerhessians.store.record`); ``TrainConfig.from_dict`` reads it back (unknown keys
are ignored; settings added later take the values of :data:`LEGACY_HESSIAN`).

Defaults are the seed's (``training_eigenspectrum.py``), except: dataset ``Digits`` (bundled,
offline; the seed's was CIFAR10), model ``LeNet``, optimizer ``sgd`` (the seed required
``-o``), dataset root ``datasets``. The Hessian defaults reproduce the paper's setting:
128 Lanczos steps from 1 Gaussian random vector, the full Hessian (not the Gauss-Newton
part), batch norm in eval mode, spectra after every epoch, every layer block.
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real

from layerhessians.errors import SettingError, UserError, unknown_name
from layerhessians.regularization.settings import FLAGS as REGULARIZER_FLAGS
from layerhessians.regularization.settings import RegularizerSettings
from layerhessians.settings import MAX_COUNT, MAX_SEED, SETTINGS, SpectraSettings
from layerhessians.store.record import LEGACY_HESSIAN
from layerhessians.vocabulary import (
    BACKENDS,
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
)

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("ce",)
SGD_MOMENTUM = 0.9  # the seed's SGD momentum (fixed, recorded in config.json)


# ----------------------------------------------------------------------------- checks
#: the largest learning rate a schedule may reach (float32 parameters overflow far above)
MAX_LR = 1e30


def _int(label, value, minimum=1, allow_none=False, maximum=MAX_COUNT):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or \
            not minimum <= value <= maximum:
        raise UserError(f"{label} must be an integer >= {minimum} and <= {maximum}, got "
                        f"{value!r}")
    return int(value)


def _check_schedule(config):
    """Refuse a learning rate that the schedule lifts past :data:`MAX_LR` (``--step_gamma``
    above 1 at each of the ``--milestones``)."""
    gamma, steps = max(1.0, config.step_gamma), len(config.milestones)
    if math.log10(config.learning_rate) + steps * math.log10(gamma) > math.log10(MAX_LR):
        raise UserError(f"--learning_rate {config.learning_rate:g} times --step_gamma "
                        f"{config.step_gamma:g} at {steps} milestone(s) exceeds {MAX_LR:g} "
                        "(the parameters' float32 overflows); use a smaller --step_gamma")
    return config


def _real(label, value, minimum=0.0, strict=False):
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise UserError(f"{label} must be a finite number {bound} {minimum:g}, got {value!r}")
    return float(value)


def _choice(label, value, choices):
    by_lower = {c.lower(): c for c in choices}
    key = str(value).strip().lower() if isinstance(value, str) else None
    if key not in by_lower:
        raise unknown_name(label, value, choices)
    return by_lower[key]


def _hessian_total(value):
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise UserError(f"--hessian-examples takes a number of examples >= 1 or 'all', "
                        f"got {value!r}")
    return int(value)


def _bool(label, value):
    if not isinstance(value, bool):
        raise UserError(f"{label} must be true or false, got {value!r}")
    return value


def _spectra(values: dict) -> SpectraSettings:
    """The :class:`SpectraSettings` of ``values``; a refusal names the CLI flag (the
    trainer's settings are spelled as ``layerhessians train``'s)."""
    try:
        return SpectraSettings(**values)
    except SettingError as err:
        raise UserError(err.spelled("cli")) from None


#: :class:`HessianConfig` fields that are :class:`SpectraSettings` fields (from the table)
SPECTRA_FIELDS = tuple(row.field for row in SETTINGS.values()
                       if row.config == f"hessian.{row.field}")


# ----------------------------------------------------------------------------- settings
@dataclass
class HessianConfig:
    """How the spectra are computed at the end of an epoch (``layer_spectra`` arguments).

    ``iterations``: Lanczos steps per random vector (Ritz values per vector); ``vectors``:
    random start vectors (SLQ samples); ``kind``: ``hessian | ggn | residual | ef``;
    ``bn_mode``: the batch-norm mode the Hessian is taken in (``eval``: running statistics;
    ``train``: batch statistics of the Hessian subset); ``every``: spectra every N epochs
    (the last epoch always); ``layers``: also every layer block, not only the full Hessian;
    ``init``: also at initialisation (epoch 0); ``distribution`` of the random vectors;
    ``reorthogonalize``: full re-orthogonalisation in Lanczos (the original had none):
    ``True``, ``False`` or ``"auto"`` (the default: full when the Lanczos bases fit half the
    memory budget, else none with a warning; a run records what it used in config.json);
    ``subset_seed``: seed of the class-balanced Hessian subset (the original's fixed 0);
    ``layer_method``: how the layer blocks' spectra are computed (``auto``: exactly by the
    Gram route where certified and within the memory budget, else SLQ; ``exact``: refused
    before training where a block is not certified; ``slq``: Lanczos as the full spectrum;
    see :func:`~layerhessians.spectra.layer_spectra`); ``validate_layers``: also run SLQ on
    the exact blocks and record its error (``slq_fidelity.csv``).
    """

    iterations: int = DEFAULT_ITERATIONS
    vectors: int = DEFAULT_VECTORS
    kind: str = "hessian"
    bn_mode: str = "eval"
    every: int = 1
    layers: bool = True
    init: bool = False
    distribution: str = DEFAULT_DISTRIBUTION
    reorthogonalize: object = "auto"  # True, False or "auto"
    subset_seed: int = 0  # the original's fixed seed of the Hessian subset (not --seed)
    layer_method: str = "auto"
    validate_layers: bool = False

    def validated(self, settings: SpectraSettings | None = None) -> "HessianConfig":
        """A copy with every value checked and canonicalised (``"GGN"`` -> ``"ggn"``,
        ``"none"`` -> ``False``): the spectra's by :class:`SpectraSettings` (``settings``
        when the caller made them already), the schedule's here.

        Raises:
            UserError: a value of the wrong type or out of range, or an unknown choice (named by
                its ``layerhessians train`` option where it has one).
        """
        if settings is None:
            settings = _spectra({name: getattr(self, name) for name in SPECTRA_FIELDS})
        checked = replace(
            self,
            **{name: getattr(settings, name) for name in SPECTRA_FIELDS},
            every=_int("--hessian-every", self.every),
            layers=_bool("layers", self.layers),
            init=_bool("--init-spectra", self.init),
            subset_seed=_int("hessian subset seed", self.subset_seed, minimum=0),
            validate_layers=_bool("--validate-layer-spectra", self.validate_layers),
        )
        if not checked.layers:  # settings of the layer blocks without layer blocks
            given = [flag for flag, wanted in (
                ("--validate-layer-spectra", checked.validate_layers),
                ("--layer-spectra exact", checked.layer_method == "exact")) if wanted]
            if given:
                raise UserError(f"--no-layers contradicts {' and '.join(given)} (no layer "
                                "block is measured): drop one of them")
        return checked

    def due(self, epoch: int, num_epochs: int) -> bool:
        """Whether the spectra are computed after ``epoch`` (0 = initialisation)."""
        if epoch == 0:
            return self.init
        return epoch % self.every == 0 or epoch == num_epochs

    def to_dict(self) -> dict:
        """The settings as a plain ``dict`` (for config.json)."""
        return asdict(self)


@dataclass
class TrainConfig:
    """Everything that defines a training run (the ``layerhessians train`` flags).

    Units: ``learning_rate`` and ``weight_decay`` as passed to the optimizer (``-l2``:
    decoupled from the loss, torch's ``weight_decay``); ``milestones`` in epochs;
    ``examples_per_class``: training examples per class in the fixed Hessian subset.
    ``device`` is a request (``cpu``, ``cuda:N``, ``auto``...) resolved by
    :func:`layerhessians.training.devices.resolve_device`.

    Scaling (see :mod:`layerhessians.training.distributed`): ``hessian_total``: the Hessian set's size
    (class-balanced as far as possible) or ``"all"`` (the training set), instead of
    ``examples_per_class``; ``hessian_batch_size``: examples per first-order graph
    (``None``: the largest that fits ``memory_budget``); ``memory_budget``: ``"8GB"``,
    ``"40%"`` of the free memory, or ``None`` (80% of a GPU's, 50% of the host's shared by
    its processes); ``dist_backend``: ``auto`` (nccl on GPUs, gloo on CPUs), ``gloo`` or
    ``nccl`` (used under torchrun); ``sync_bn``: SyncBatchNorm when training on several
    GPUs (otherwise batch norm uses each rank's own batch statistics); ``threads``:
    torch's CPU threads (:mod:`~layerhessians.training.threads`; ``None``: torch's default;
    config.json records the count in effect).
    """

    model: str = "LeNet"
    dataset: str = "Digits"
    optimizer: str = "sgd"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = SGD_MOMENTUM
    num_epochs: int = 100
    batch_size: int = 256
    milestones: list = field(default_factory=lambda: [10000])
    step_gamma: float = 0.1
    augment: bool = False
    seed: int = 0
    examples_per_class: int = 10
    loss: str = "ce"
    dataset_root: str = "datasets"
    download: bool = True
    device: str = "cpu"
    save_freq: int = None
    export_legacy: bool = False
    workers: int = 4  # accepted for the seed's -j; data are in memory, no loader workers
    hessian_total: object = None  # None (per class), an int, or "all"
    hessian_batch_size: int = None
    memory_budget: object = None
    dist_backend: str = "auto"
    sync_bn: bool = False
    threads: int = None  # torch's intra-op threads; None: torch's default (one per core)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    #: the Hessian-trace regulariser (``--htr-*``; gamma 0: none, and config.json unchanged)
    regularizer: RegularizerSettings = field(default_factory=RegularizerSettings)

    def validated(self) -> "TrainConfig":
        """A copy with names canonicalised and every value checked (:class:`UserError`); the
        spectra's settings are made (and so checked) once, kept for :meth:`spectra_settings`."""
        from layerhessians.data.own import check_dataset_path, is_dataset_path
        from layerhessians.data.registry import get_spec
        from layerhessians.models import canonical_model_name

        milestones = self.milestones
        if isinstance(milestones, Integral) and not isinstance(milestones, bool):
            milestones = [milestones]
        if not isinstance(milestones, (list, tuple)) or not milestones:
            raise UserError(f"--milestones takes one or more epochs, got {milestones!r}")
        hessian = self.hessian
        if isinstance(hessian, dict):
            hessian = HessianConfig(**{k: v for k, v in hessian.items() if k in _names(HessianConfig)})
        seed = _int("--seed", self.seed, minimum=0, maximum=MAX_SEED)
        spectra = _settings_of(replace(self, seed=seed, hessian=hessian),
                               self.__dict__.get("_spectra"))
        config = replace(
            self,
            model=canonical_model_name(self.model),
            dataset=(check_dataset_path(self.dataset) if is_dataset_path(self.dataset)
                     else get_spec(self.dataset).name),
            optimizer=_choice("optimizer", self.optimizer, OPTIMIZERS),
            learning_rate=_real("--learning_rate", self.learning_rate, strict=True),
            weight_decay=_real("--weight_decay", self.weight_decay),
            momentum=_real("momentum", self.momentum),
            num_epochs=_int("--num_epochs", self.num_epochs),
            batch_size=_int("--batch_size", self.batch_size),
            milestones=sorted(_int("--milestones", m) for m in milestones),
            step_gamma=_real("--step_gamma", self.step_gamma, strict=True),
            augment=_bool("--augment", self.augment),
            seed=seed,
            examples_per_class=_int("--examples_per_class", self.examples_per_class),
            loss=_choice("loss", self.loss, LOSSES),
            dataset_root=str(self.dataset_root),
            download=_bool("download", self.download),
            device=str(self.device),
            save_freq=_int("--save_freq", self.save_freq, allow_none=True),
            export_legacy=_bool("--export-legacy", self.export_legacy),
            workers=_int("--workers", self.workers, minimum=0),
            hessian_total=_hessian_total(self.hessian_total),
            hessian_batch_size=None if spectra.micro_batch_size == "auto"
            else spectra.micro_batch_size,
            memory_budget=spectra.memory_budget,
            dist_backend=_choice("--dist-backend", self.dist_backend, BACKENDS),
            sync_bn=_bool("--sync-bn", self.sync_bn),
            threads=_int("--threads", self.threads, allow_none=True, maximum=4096),
            hessian=hessian.validated(spectra),
            regularizer=_regularizer(self.regularizer).validated(),
        )
        object.__setattr__(config, "_spectra", spectra)  # not a field: made from the fields
        return _check_schedule(config)

    def spectra_settings(self) -> SpectraSettings:
        """The run's :class:`SpectraSettings` (through :data:`~layerhessians.settings.SETTINGS`;
        the seed is the run's base seed, each epoch derives its own). Those made by
        :meth:`validated` are returned as they are.

        Raises:
            UserError: a bad setting (named by its ``layerhessians train`` option).
        """
        return _settings_of(self, self.__dict__.get("_spectra"))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict: the fields, with ``"hessian"`` as a nested dict."""
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        if not _regularizer(self.regularizer).active:
            del out["regularizer"]  # runs without it record what they always did
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The settings stored in ``data`` (e.g. a run's ``config.json``); other keys ignored.

        Raises:
            UserError: ``data`` is not a JSON object (a dict).
        """
        if not isinstance(data, dict):
            raise UserError(f"the stored settings are a JSON {type(data).__name__}, not an "
                            "object; restore the run's config.json or use --overwrite")
        kwargs = {k: v for k, v in data.items() if k in _names(cls)}
        if isinstance(kwargs.get("hessian"), dict):
            hessian = {**LEGACY_HESSIAN, **kwargs["hessian"]}
            kwargs["hessian"] = HessianConfig(
                **{k: v for k, v in hessian.items() if k in _names(HessianConfig)})
        if "regularizer" in kwargs:
            kwargs["regularizer"] = _regularizer(kwargs["regularizer"])
        return cls(**kwargs)

    def run_name(self) -> str:
        """The default run directory name (under ``runs/``): ``model=M,dataset=D,...``."""
        from layerhessians.data.own import dataset_label

        return (f"model={self.model},dataset={dataset_label(self.dataset)},opt={self.optimizer},"
                f"lr={self.learning_rate:g},l2={self.weight_decay:g},b={self.batch_size},"
                f"seed={self.seed}" + _regularizer(self.regularizer).run_name_part())


def _settings_of(config: TrainConfig, made: SpectraSettings | None) -> SpectraSettings:
    """``config``'s settings: ``made`` (settings made earlier from a config) when they hold
    the same values (a comparison, not a second validation), else new ones."""
    values = SpectraSettings.from_config(config, check=lambda values: values)
    same = made is not None and all(type(getattr(made, k)) is type(v) and getattr(made, k) == v
                                    for k, v in values.items())
    if same:
        return made
    return _spectra(values)


def _names(cls) -> set:
    return {f.name for f in fields(cls)}


def _regularizer(value) -> RegularizerSettings:
    return value if isinstance(value, RegularizerSettings) else \
        RegularizerSettings.from_dict(value)


# ----------------------------------------------------------------------------- flags
#: ``layerhessians train`` flag destinations that set a :class:`HessianConfig` field
HESSIAN_FLAGS = {"hessian_iterations": "iterations", "hessian_vectors": "vectors",
                 "hessian_kind": "kind", "hessian_bn_mode": "bn_mode",
                 "hessian_every": "every", "hessian_distribution": "distribution",
                 "layers": "layers", "init_spectra": "init",
                 "hessian_reorthogonalize": "reorthogonalize",
                 "layer_spectra": "layer_method", "validate_layer_spectra": "validate_layers",
                 "hessian_subset_seed": "subset_seed"}
#: flags of the seed's command lines accepted and ignored (outputs go under the run directory)
IGNORED_FLAGS = ("log_dir", "ckpt_dir", "images_dir")


def setting_flags() -> tuple:
    """Every flag destination that names a setting (grid files use these names)."""
    main = [f for f in _names(TrainConfig) if f not in ("hessian", "regularizer")]
    return tuple(sorted([*main, *HESSIAN_FLAGS, *REGULARIZER_FLAGS, "cuda", *IGNORED_FLAGS]))


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of integers"}


def _expected_type(name: str):
    """The Python type a setting takes (``object``: any scalar), or ``None`` when unknown."""
    if name == "cuda":
        return int
    if name in IGNORED_FLAGS:
        return str
    if name in HESSIAN_FLAGS:
        kind = {f.name: f.type for f in fields(HessianConfig)}[HESSIAN_FLAGS[name]]
    elif name in REGULARIZER_FLAGS:
        kind = {"gamma": float, "probes": int, "every": int, "start_epoch": int}.get(
            REGULARIZER_FLAGS[name], str)
    else:
        kind = {f.name: f.type for f in fields(TrainConfig)}.get(name)
    return kind if isinstance(kind, type) else None


def check_types(flags: dict, where: str = "") -> None:
    """Check that every setting in ``flags`` (by ``layerhessians train`` destination) has
    the JSON type of its field: an integer for ``num_epochs``, a number for
    ``learning_rate``, a scalar (not a list or an object) for the free-form ones; ``None``
    keeps a default. Values are checked later by :meth:`TrainConfig.validated`.

    Raises:
        UserError: the first setting of the wrong type (``where`` prefixes the message).
    """
    for name, value in flags.items():
        kind = _expected_type(name)
        if value is None or kind is None:
            continue
        if kind is list:
            ok = isinstance(value, list) and all(isinstance(v, Integral) and not
                                                 isinstance(v, bool) for v in value) \
                or (isinstance(value, Integral) and not isinstance(value, bool))
        elif kind is int:
            ok = isinstance(value, Integral) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, Real) and not isinstance(value, bool)
        elif kind in (bool, str):
            ok = isinstance(value, kind)
        else:  # a free-form scalar (e.g. "all" or 100; "8GB" or 10**9; "auto" or true)
            ok = isinstance(value, (str, Real))
        if not ok:
            expected = _TYPE_NAMES.get(kind, "a single value")
            raise UserError(f"{where}{name} must be {expected}, got {value!r}")


def apply_flags(config: TrainConfig, flags: dict) -> TrainConfig:
    """``config`` with the settings ``flags`` name by their ``layerhessians train``
    destination (``{"learning_rate": 0.01, "hessian_iterations": 64, "cuda": 1}``) replaced;
    ``None`` values keep the setting. Not validated (call :meth:`TrainConfig.validated`).

    Raises:
        UserError: a name that is not a setting (the message lists the valid ones).
    """
    valid = setting_flags()
    unknown = [k for k in flags if k not in valid]
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}; use `layerhessians train` "
                        f"destinations: {', '.join(valid)}")
    main, hessian = config.to_dict(), config.hessian.to_dict()
    regularizer = _regularizer(config.regularizer).to_dict()
    for key, value in flags.items():
        if value is None or key in IGNORED_FLAGS:
            continue
        if key in HESSIAN_FLAGS:
            hessian[HESSIAN_FLAGS[key]] = value
        elif key in REGULARIZER_FLAGS:
            regularizer[REGULARIZER_FLAGS[key]] = value
        elif key == "cuda":
            if flags.get("device") is None:
                main["device"] = f"cuda:{value}"
        else:
            main[key] = value
    main["hessian"], main["regularizer"] = hessian, regularizer
    return TrainConfig.from_dict(main)

