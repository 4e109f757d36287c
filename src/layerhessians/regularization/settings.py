"""The regulariser's settings, free of torch: :class:`RegularizerSettings` (frozen) and its
vocabularies, shared by :func:`~layerhessians.regularization.trace_penalty`,
:class:`~layerhessians.regularization.TraceRegularizer`, the trainer's flags and a run's
config.json.

``RegularizerSettings().validated()`` canonicalises and checks every value, raising
:class:`~layerhessians.errors.UserError` with a one-line fix; ``to_dict`` / ``from_dict``
are what config.json stores (``"regularizer"``, nested). ``gamma == 0`` means no
regulariser (the default): nothing is computed and nothing recorded changes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real

from layerhessians.errors import UserError, check_choice

#: what the penalty's probes estimate: the Hessian trace with parameter-space probes (the
#: original's), the GGN trace with output-space probes, the exact GGN trace
ESTIMATORS = ("hutchinson", "ggn", "exact")
#: probe laws (both have E[v v^T] = I)
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher")
#: named block selections (beside None = every trainable parameter, and a mapping)
BLOCK_RULES = ("all", "layers", "middle", "paper-middle")
#: how the ggn estimator forms its probes: per example (lower variance), all examples in
#: one vector-Jacobian product (cheaper), or by what the model allows (``auto``)
GGN_FORMS = ("auto", "per-example", "batched")
#: the batch-norm mode the curvature is taken in (as ``layerhessians.vocabulary.BN_MODES``)
PENALTY_BN_MODES = ("eval", "train")
#: ``layerhessians train`` flag destinations -> :class:`RegularizerSettings` fields
FLAGS = {"htr_gamma": "gamma", "htr_estimator": "estimator", "htr_probes": "probes",
         "htr_distribution": "distribution", "htr_every": "every",
         "htr_start_epoch": "start_epoch", "htr_blocks": "blocks", "htr_form": "form",
         "htr_bn_mode": "bn_mode"}
#: each field's ``layerhessians train`` option, named beside the field in errors
CLI_FLAGS = {"--" + dest.replace("_", "-"): field for dest, field in FLAGS.items()}


def _number(label: str, value, minimum: float = 0.0) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum:
        raise UserError(f"{label} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(label: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise UserError(f"{label} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _name(label: str, value, choices) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    check_choice(key, choices, label)
    return key


@dataclass(frozen=True)
class RegularizerSettings:
    """A Hessian-trace regulariser: ``loss + gamma * penalty`` on scheduled steps.

    Attributes:
        gamma: the penalty's weight (``0``: no regulariser).
        estimator: ``hutchinson`` (the original's: E = tr H of the chosen blocks), ``ggn``
            (output-space probes: E = tr G) or ``exact`` (tr G exactly; small problems).
        probes: random probes averaged per regularised step (the original's ``-hi``).
        distribution: the probes' law, ``gaussian`` or ``rademacher``.
        every: regularise every ``every``-th step (the original's ``-freq``; 1: every step).
        start_epoch: first regularised epoch, 1-based (the original's ``-sp``, 0-based: its
            ``-sp 10`` is ``start_epoch=11``).
        blocks: ``all`` (every trainable parameter), ``layers``, ``middle`` or
            ``paper-middle`` (see :func:`~layerhessians.regularization.resolve_blocks`).
        form: the ggn estimator's form, ``auto``, ``per-example`` or ``batched``.
        bn_mode: batch norm's mode in the penalty's forward pass (``train``: the batch's
            statistics, as the training loss; ``eval``: running statistics).
        step_schedule: ``"epoch"`` (the step counter restarts every epoch, as the original's
            ``batch_idx % freq``) or ``"global"`` (counted over the whole run).
    """

    gamma: float = 0.0
    estimator: str = "ggn"
    probes: int = 1
    distribution: str = "gaussian"
    every: int = 1
    start_epoch: int = 1
    blocks: str = "all"
    form: str = "auto"
    bn_mode: str = "train"
    step_schedule: str = "epoch"

    @property
    def active(self) -> bool:
        """Whether a penalty is ever added (``gamma > 0``)."""
        return self.gamma > 0

    def validated(self) -> "RegularizerSettings":
        """A copy with names canonicalised and every value checked.

        Raises:
            UserError: a value out of range or an unknown name (named as the field and its
                ``layerhessians train`` option: ``gamma (--htr-gamma)``).
        """
        label = {field: f"{field} ({flag})" for flag, field in CLI_FLAGS.items()}
        return replace(
            self,
            gamma=_number(label["gamma"], self.gamma),
            estimator=_name(label["estimator"], self.estimator, ESTIMATORS),
            probes=_integer(label["probes"], self.probes, 1),
            distribution=_name(label["distribution"], self.distribution, PROBE_DISTRIBUTIONS),
            every=_integer(label["every"], self.every, 1),
            start_epoch=_integer(label["start_epoch"], self.start_epoch, 1),
            blocks=_name(label["blocks"], self.blocks, BLOCK_RULES),
            form=_name(label["form"], self.form, GGN_FORMS),
            bn_mode=_name(label["bn_mode"], self.bn_mode, PENALTY_BN_MODES),
            step_schedule=_name("step_schedule", self.step_schedule, ("epoch", "global")),
        )

    def notes(self, num_epochs: int | None = None) -> list[str]:
        """Settings that cannot act as given (said, not refused: a grid may set them on
        purpose): regulariser settings with ``gamma`` 0, a start epoch after the last
        epoch, a ggn form with another estimator."""
        default = type(self)()
        out = []
        if not self.active:
            changed = [flag for flag, f in CLI_FLAGS.items() if f != "gamma"
                       and getattr(self, f) != getattr(default, f)]
            if changed:
                verb = "does" if len(changed) == 1 else "do"
                out.append(f"--htr-gamma is 0: no regulariser, so {', '.join(changed)} "
                           f"{verb} nothing; pass --htr-gamma > 0")
            return out
        if num_epochs is not None and self.start_epoch > num_epochs:
            out.append(f"--htr-start-epoch {self.start_epoch} is after the last epoch "
                       f"({num_epochs}): no step is regularised")
        if self.estimator == "hutchinson" and self.form != "auto":
            out.append(f"--htr-form {self.form} applies to the ggn and exact estimators, not "
                       "hutchinson")
        return out

    def due(self, epoch: int, step: int) -> bool:
        """Whether step ``step`` (0-based, as counted by ``step_schedule``) of epoch
        ``epoch`` (1-based) is regularised."""
        return self.active and epoch >= self.start_epoch and step % self.every == 0

    def run_name_part(self) -> str:
        """What a default run name adds: ``",htr=GAMMA,ESTIMATOR"`` (``""`` when inactive)."""
        if not self.active:
            return ""
        return f",htr={self.gamma:g},{self.estimator}" + (
            "" if self.blocks == "all" else f",{self.blocks}")

    def to_dict(self) -> dict:
        """The settings as a plain dict (config.json's ``"regularizer"``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "RegularizerSettings":
        """Settings from a dict (other keys ignored; ``None``: the defaults, no regulariser)."""
        if not data:
            return cls()
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in names})
