"""A PyTorch Lightning callback that trains with the Hessian-trace penalty.

Needs the ``lightning`` package (``pip install 'layerhessians[lightning]'``).

A callback cannot change the loss a ``training_step`` returns, but it can add to the
gradients: after Lightning's ``loss.backward()``, :class:`TraceRegularizerCallback` computes
``gamma * penalty`` on the same batch (a scheduled step only) and back-propagates it, so the
optimizer steps on the gradient of ``loss + gamma * penalty``. Lightning's ``current_epoch``
``E - 1`` is epoch ``E`` of the schedule; ``batch_idx`` is the step within the epoch.
"""

from layerhessians.errors import UserError
from layerhessians.regularization.regularizer import TraceRegularizer

try:  # optional: only this integration needs it
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise UserError("TraceRegularizerCallback needs PyTorch Lightning: pip install "
                    "'layerhessians[lightning]'") from err

__all__ = ["TraceRegularizerCallback"]


class TraceRegularizerCallback(Callback):
    """Adds ``gamma * trace_penalty`` to the gradients of scheduled training steps.

    Args:
        loss_fn: the loss of the module's outputs, ``loss_fn(module(inputs), targets)``.
        batch_to_data: ``fn(batch) -> (inputs, targets)`` (default: the batch's first two
            items).
        **settings: :class:`~layerhessians.regularization.TraceRegularizer` arguments
            (``gamma``, ``estimator``, ``probes``, ``every``, ``start_epoch``, ``blocks``,
            ``seed``, ...).

    Logs ``htr/penalty`` on regularised steps and ``htr/steps`` per epoch.

    Raises:
        UserError: at fit start, with several processes (the extra backward would bypass
            DDP's gradient reduction), mixed precision (the loss scale is not applied), or
            manual optimisation or gradient accumulation (the penalty is added once per
            backward).
    """

    def __init__(self, loss_fn, batch_to_data=None, **settings):
        self.loss_fn, self.settings = loss_fn, settings
        self.batch_to_data = batch_to_data or (lambda batch: (batch[0], batch[1]))
        self.regularizer = None
        self._batch = None

    def setup(self, trainer, pl_module, stage):  # noqa: D102 - Lightning hook
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise UserError("TraceRegularizerCallback runs in one process: use a loop with "
                            "TraceRegularizer.term added to the loss under DDP")
        if str(trainer.precision) not in ("32-true", "32", "64-true", "64"):
            raise UserError(f"TraceRegularizerCallback needs full precision, not "
                            f"{trainer.precision}")
        if not pl_module.automatic_optimization or trainer.accumulate_grad_batches != 1:
            raise UserError("TraceRegularizerCallback needs automatic optimisation without "
                            "gradient accumulation: add TraceRegularizer.term to the loss")
        self.regularizer = TraceRegularizer(pl_module, self.loss_fn, **self.settings)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self._batch = (batch, batch_idx)

    def on_after_backward(self, trainer, pl_module):  # noqa: D102 - Lightning hook
        batch, index = self._batch
        term = self.regularizer.term(self.batch_to_data(batch), epoch=trainer.current_epoch + 1,
                                     step=index)
        if not isinstance(term, float):
            term.backward()
            pl_module.log("htr/penalty", self.regularizer.values[-1], on_step=True,
                          on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: D102 - Lightning hook
        pl_module.log("htr/steps", float(self.regularizer.epoch_summary()["htr_steps"]))
