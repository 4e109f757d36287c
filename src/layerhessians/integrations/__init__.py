"""Optional integrations of :class:`~layerhessians.tracking.SpectraTracker`.

One module per package they need, each imported only when used:

- :mod:`layerhessians.integrations.tensorboard`: :class:`TensorBoardLogger` (extra
  ``tensorboard``: ``pip install 'layerhessians[tensorboard]'``);
- :mod:`layerhessians.integrations.lightning`: :class:`SpectraCallback`, a PyTorch Lightning
  callback (extra ``lightning``: ``pip install 'layerhessians[lightning]'``).

Any other logger is a plain callable ``hook(index, scalars, spectra)`` passed in the
tracker's ``loggers``.
"""
