"""TensorBoard logging of a tracker's spectra: per block the top Ritz value and the SLQ
trace estimate as scalars, and the spectral density as an image.

Needs the ``tensorboard`` package (``pip install 'layerhessians[tensorboard]'``).
"""

from pathlib import Path

from layerhessians.analysis.figures import plot_block_spectra
from layerhessians.errors import UserError

try:  # optional: only this integration needs it
    from torch.utils.tensorboard import SummaryWriter
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise UserError("TensorBoardLogger needs tensorboard: pip install "
                    "'layerhessians[tensorboard]'") from err

__all__ = ["TensorBoardLogger", "DENSITY_TAG"]

#: tag prefix of the density images (``spectral_density/<block>``)
DENSITY_TAG = "spectral_density"


class TensorBoardLogger:
    """A tracker logger writing TensorBoard event files into ``log_dir``.

    Pass it in ``SpectraTracker(..., loggers=[TensorBoardLogger("tb")])``. At every update
    (global step = the update's index) it writes the scalars
    ``top_eigenvalue/<block>`` and ``trace/<block>`` (see
    :func:`~layerhessians.tracking.spectra_scalars`) and, with ``images``, each block's
    Gaussian-smoothed spectral density (log density against eigenvalue, drawn by
    :func:`~layerhessians.analysis.figures.plot_block_spectra`) as
    ``spectral_density/<block>``.

    Args:
        log_dir: folder of the event files (created), or an existing ``SummaryWriter``
            (``log_dir`` is then ignored and the writer is not closed by :meth:`close`).
        images: also write the density images (default ``True``).
        points: grid points of each density curve (default 512).
        prefix: optional tag prefix (``"<prefix>/top_eigenvalue/<block>"``).

    Raises:
        UserError: ``points < 16``.
    """

    def __init__(self, log_dir="runs/tensorboard", *, images: bool = True, points: int = 512,
                 prefix: str | None = None):
        if points < 16:
            raise UserError(f"points={points} is too few for a density curve; use >= 16")
        self._own = not hasattr(log_dir, "add_scalar")
        self.writer = SummaryWriter(str(Path(log_dir))) if self._own else log_dir
        self.images, self.points = images, int(points)
        self.prefix = f"{prefix.rstrip('/')}/" if prefix else ""

    def __call__(self, index: int, scalars: dict, spectra=None):
        """Write one update's scalars (and density images) at global step ``index``, then flush.

        Args:
            index: the update's index (the epoch for a training run), the global step.
            scalars: ``{tag: value}`` (e.g. ``top_eigenvalue/<block>``), written under ``prefix``.
            spectra: ``{block: SpectralMeasure}``; with ``images``, each block's density image.
        """
        for name, value in scalars.items():
            self.writer.add_scalar(self.prefix + name, value, global_step=index)
        if self.images and spectra:
            for block, measure in spectra.items():
                figure = plot_block_spectra({index: measure.density(points=self.points)}, block,
                                            title=f"Hessian spectrum: {block} at {index}")
                self.writer.add_figure(f"{self.prefix}{DENSITY_TAG}/{block}", figure,
                                       global_step=index, close=True)
        self.writer.flush()

    def close(self):
        """Flush and close the event file (unless the writer was passed in)."""
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()
