"""The trace penalty on a schedule, for any training loop: :class:`TraceRegularizer`.

    regularizer = TraceRegularizer(model, nn.CrossEntropyLoss(), gamma=1e-3, every=50,
                                   start_epoch=11, estimator="hutchinson", probes=10)
    for epoch in range(1, epochs + 1):
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            loss = loss + regularizer.term((x, y), epoch=epoch, step=step)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        print(regularizer.epoch_summary())          # mean penalty, regularised steps

or, one forward fewer on regularised steps (:meth:`TraceRegularizer.loss`):
``loss, data_loss, outputs = regularizer.loss((x, y), epoch=epoch, step=step)``.

It draws its probes from its own generator (seeded), never from the loop's, and does not
change the model's buffers or modes, so it sits beside a
:class:`~layerhessians.tracking.SpectraTracker` (which measures what it does to the
spectra) without disturbing it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from layerhessians.curvature.modes import mode_difference
from layerhessians.errors import UserError
from layerhessians.regularization.penalty import penalty_forward_context, trace_penalty
from layerhessians.regularization.settings import RegularizerSettings

__all__ = ["TraceRegularizer"]


class TraceRegularizer:
    """``gamma * trace_penalty(...)`` on scheduled steps; zero (no work) on the others.

    Args:
        model: the network being trained.
        loss_fn: the training loss ``loss_fn(outputs, targets)`` (see
            :func:`~layerhessians.regularization.trace_penalty`).
        settings: a :class:`RegularizerSettings`; keyword arguments override its fields
            (``gamma``, ``estimator``, ``probes``, ``distribution``, ``every``,
            ``start_epoch``, ``blocks``, ``form``, ``bn_mode``, ``step_schedule``).
        blocks: a rule's name (``settings.blocks``) or a mapping ``{name: parameters}``
            instead of a rule.
        seed: seed of the probes' generator (``generator`` instead: your own).
        generator: a ``torch.Generator`` to draw the probes from.
        loggers: callables ``hook(index, {"htr/penalty": value})`` called on every
            regularised step with its global step index.

    Raises:
        UserError: invalid settings (:meth:`RegularizerSettings.validated`).
    """

    def __init__(self, model: nn.Module, loss_fn, settings: RegularizerSettings | None = None,
                 *, blocks=None, seed: int = 0, generator: torch.Generator | None = None,
                 loggers=(), **overrides):
        settings = settings if settings is not None else RegularizerSettings()
        if not isinstance(settings, RegularizerSettings):
            raise UserError("settings must be a RegularizerSettings")
        if isinstance(blocks, str):  # a rule's name is a setting (validated, recorded)
            overrides, blocks = {**overrides, "blocks": blocks}, None
        try:
            settings = replace(settings, **overrides)
        except TypeError:
            raise UserError(f"unknown regulariser setting(s) {', '.join(sorted(overrides))}; "
                            "see RegularizerSettings") from None
        self.settings = settings.validated()
        self.model, self.loss_fn = model, loss_fn
        self.blocks = blocks if blocks is not None else self.settings.blocks
        self.generator = generator if generator is not None else \
            torch.Generator().manual_seed(int(seed))
        self.loggers = [loggers] if callable(loggers) else list(loggers)
        self.global_step = 0
        self.steps = 0  # regularised steps in total
        self.values: list[float] = []  # penalty values of the current epoch's regularised steps
        self._epoch = None

    def due(self, epoch: int, step: int | None = None) -> bool:
        """Whether the step ``step`` (0-based within the epoch; ``None``: the next one by
        this regulariser's own count) of epoch ``epoch`` (1-based) is regularised."""
        if self.settings.step_schedule == "global" or step is None:
            step = self.global_step
        return self.settings.due(epoch, step)

    def penalty(self, data, outputs: Tensor | None = None) -> Tensor:
        """The penalty (without ``gamma``) on ``data``, an ``(inputs, targets)`` pair
        (``outputs``: the model's on its inputs, see
        :func:`~layerhessians.regularization.trace_penalty`)."""
        s = self.settings
        return trace_penalty(self.model, self.loss_fn, data, blocks=self.blocks,
                             estimator=s.estimator, probes=s.probes,
                             distribution=s.distribution, generator=self.generator,
                             form=s.form, bn_mode=s.bn_mode, outputs=outputs)

    def loss(self, data, *, epoch: int, step: int | None = None) -> tuple[Tensor, Tensor,
                                                                            Tensor]:
        """The step's loss with the term, from one forward where one suffices:
        ``(loss_fn(model(x), y) + term, loss_fn(model(x), y), model(x))``.

        ``model(x)`` runs in the model's own modes (a training forward: batch norm's
        running statistics update as usual). On a regularised step whose forward is the
        penalty's (:func:`~layerhessians.curvature.modes.mode_difference` finds nothing),
        the penalty reuses its outputs (batched form and ``hutchinson``); otherwise it runs
        its own. Same schedule, logging and errors as :meth:`term`; a non-finite data loss
        is returned without the penalty (nothing counted), for the caller to report.

        Args:
            data: the step's ``(inputs, targets)`` batch.
            epoch: the current epoch, 1-based.
            step: the step within the epoch, 0-based (``None``: counted here).

        Returns:
            ``(loss, data_loss, outputs)``: the 0-dim tensor to backpropagate, the data
            term alone, and the model's outputs (for accuracy).
        """
        x, y = data
        share = self.due(epoch, step) and mode_difference(self.model,
                                                          self.settings.bn_mode) is None
        with penalty_forward_context() if share else contextlib.nullcontext():
            outputs = self.model(x)
        data_loss = self.loss_fn(outputs, y)
        if not math.isfinite(float(data_loss.detach())):  # the caller's to report; no penalty
            return data_loss, data_loss, outputs
        term = self.term(data, epoch=epoch, step=step, outputs=outputs if share else None)
        return data_loss + term, data_loss, outputs

    def term(self, data, *, epoch: int, step: int | None = None,
             outputs: Tensor | None = None) -> Tensor | float:
        """What to add to this step's loss: ``gamma * penalty`` on a scheduled step, else
        ``0.0`` (a float, nothing computed). Call once per training step.

        Args:
            data: the step's ``(inputs, targets)`` batch.
            epoch: the current epoch, 1-based.
            step: the step within the epoch, 0-based (``None``: counted here).
            outputs: the model's outputs on the batch's inputs, reused by the penalty (see
                :func:`~layerhessians.regularization.trace_penalty`).

        Raises:
            UserError: the penalty is not finite (it names the step), or the penalty's own
                refusals (:func:`~layerhessians.regularization.trace_penalty`).
        """
        if epoch != self._epoch:
            self._epoch, self.values = epoch, []
        due = self.due(epoch, step)
        index = self.global_step
        self.global_step += 1
        if not due:
            return 0.0
        penalty = self.penalty(data, outputs)
        value = float(penalty.detach())
        if not math.isfinite(value):
            raise UserError(f"the trace penalty is {value} at epoch {epoch}, step {index}: "
                            "lower the learning rate or gamma")
        self.values.append(value)
        self.steps += 1
        for logger in self.loggers:
            logger(index, {"htr/penalty": value})
        return self.settings.gamma * penalty

    def epoch_summary(self) -> dict:
        """``{"htr_penalty": mean penalty over this epoch's regularised steps (NaN if none),
        "htr_steps": their number}`` (the columns ``layerhessians train`` writes)."""
        values = self.values
        return {"htr_penalty": sum(values) / len(values) if values else float("nan"),
                "htr_steps": len(values)}

    def __repr__(self) -> str:
        s = self.settings
        return (f"TraceRegularizer(gamma={s.gamma:g}, estimator={s.estimator!r}, "
                f"probes={s.probes}, every={s.every}, start_epoch={s.start_epoch}, "
                f"blocks={s.blocks!r})")
