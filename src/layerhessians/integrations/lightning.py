"""A PyTorch Lightning callback that tracks Hessian spectra through ``trainer.fit``.

Needs the ``lightning`` package (``pip install 'layerhessians[lightning]'``).
"""

import torch

from layerhessians.errors import UserError
from layerhessians.tracking.tracker import SpectraTracker

try:  # optional: only this integration needs it
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise UserError("SpectraCallback needs PyTorch Lightning: pip install "
                    "'layerhessians[lightning]'") from err

__all__ = ["SpectraCallback"]


def _scalar_metrics(metrics) -> dict:
    """The one-number entries of Lightning's ``callback_metrics`` as floats."""
    row = {}
    for name, value in metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            row[name] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            row[name] = float(value)
    return row


class SpectraCallback(Callback):
    """Full and per-block Hessian spectra of the LightningModule after every
    ``every_n_epochs`` training epochs, recorded as a run directory.

    The module itself is the model: ``loss_fn(module(inputs), targets)`` on the fixed
    ``data`` (see :class:`~layerhessians.tracking.SpectraTracker` for both). After training
    epoch ``E`` (1-based, as ``layerhessians train`` counts; Lightning's ``current_epoch``
    is ``E - 1``) the global-zero process computes the spectra, records them as epoch
    ``E`` with the numeric ``trainer.callback_metrics`` as its metrics row, and logs them;
    the other processes do nothing (they wait at their next collective). The engine runs
    in eval mode with gradients enabled and restores the module's modes and buffers, so
    training continues unchanged.

    Args:
        loss_fn: the mean loss of a batch, ``loss_fn(outputs, targets)``.
        data: the fixed Hessian data, ``(inputs, targets)`` or a list of such pairs.
        run_dir: the run directory (``None``: only return and log the spectra).
        every_n_epochs: measure after every this many epochs (default 1).
        blocks: ``True`` (Conv2d/Linear weights), ``False`` (full only), a
            ``{name: parameter(s)}`` mapping, or a callable ``blocks(module) -> mapping``
            (evaluated when fitting starts, when the module is known).
        loggers: tracker loggers, e.g.
            :class:`~layerhessians.integrations.tensorboard.TensorBoardLogger`.
        at_start: also measure at initialisation (epoch 0) when fitting starts.
        **settings: the tracker's other settings (``iterations``, ``vectors``, ``seed``,
            ``kind``, ``resume``, ``overwrite``, ...).

    Attributes:
        tracker: the :class:`SpectraTracker` (``None`` before fitting and on other ranks).
        last: the spectra of the last update (``None`` before one).

    Raises:
        UserError: ``every_n_epochs < 1``; the tracker's errors when fitting starts.
    """

    def __init__(self, loss_fn, data, run_dir=None, every_n_epochs: int = 1, blocks=True,
                 loggers=(), at_start: bool = False, **settings):
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) \
                or every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be a positive integer; got {every_n_epochs!r}")
        self.loss_fn, self.data, self.run_dir = loss_fn, data, run_dir
        self.every_n_epochs, self.at_start = every_n_epochs, at_start
        self.blocks, self.loggers, self.settings = blocks, loggers, settings
        self.tracker, self.last = None, None

    def setup(self, trainer, pl_module, stage):
        """Create the tracker when fitting starts, on the global-zero process only.

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the LightningModule (the model whose spectra are tracked).
            stage: Lightning's stage; only ``"fit"`` creates the tracker.

        Raises:
            UserError: the tracker's errors (bad settings, data or run directory).
        """
        if stage != "fit" or not trainer.is_global_zero or self.tracker is not None:
            return
        blocks = self.blocks(pl_module) if callable(self.blocks) else self.blocks
        self.tracker = SpectraTracker(pl_module, self.loss_fn, self.data, self.run_dir,
                                      blocks=blocks, loggers=self.loggers, **self.settings)

    def _update(self, trainer, epoch):
        with torch.inference_mode(False), torch.enable_grad():
            self.last = self.tracker.update(
                epoch, metrics=_scalar_metrics(trainer.callback_metrics))

    def on_train_start(self, trainer, pl_module):
        """Measure at initialisation (epoch 0) when ``at_start`` and training starts from epoch 0.

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the LightningModule (unused: the tracker holds it).
        """
        if self.at_start and self.tracker is not None and trainer.current_epoch == 0:
            self._update(trainer, 0)

    def on_train_epoch_end(self, trainer, pl_module):
        """Measure after training epoch ``current_epoch + 1`` when it is a multiple of ``every_n_epochs``.

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the LightningModule (unused: the tracker holds it).
        """
        epoch = trainer.current_epoch + 1
        if self.tracker is not None and epoch % self.every_n_epochs == 0:
            self._update(trainer, epoch)

    def teardown(self, trainer, pl_module, stage):
        """Close the tracker (and its loggers) when fitting ends.

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the LightningModule.
            stage: Lightning's stage; only ``"fit"`` closes the tracker.
        """
        if stage == "fit" and self.tracker is not None:
            self.tracker.close()
            self.tracker = None
