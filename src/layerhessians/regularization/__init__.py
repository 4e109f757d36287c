"""Hessian trace regularisation (Sankar et al., AAAI 2021, part 2): a differentiable
estimate of the trace of a model's curvature, added to the loss.

- :func:`trace_penalty` ``(model, loss_fn, data, blocks=None, estimator="ggn", probes=1,
  distribution="gaussian", generator=None) -> Tensor``: the penalty (estimators
  ``hutchinson``, ``ggn``, ``exact``; see :mod:`~layerhessians.regularization.penalty`)
- :func:`resolve_blocks`: the blocks it covers (``None``, a mapping, ``"layers"``,
  ``"middle"``, ``"paper-middle"``)
- :class:`RegularizerSettings`: the frozen, torch-free settings (trainer flags, config.json)
- :class:`TraceRegularizer`: the penalty on a schedule, for any training loop
- :func:`trace_certificates`: per block, whether the ggn estimator's trace is the Hessian's
"""

from layerhessians.regularization.settings import (
    BLOCK_RULES,
    ESTIMATORS,
    FLAGS,
    GGN_FORMS,
    PROBE_DISTRIBUTIONS,
    RegularizerSettings,
)

#: the torch-dependent names, imported on first use (the settings stay torch-free for the CLI)
_LAZY = {
    "MIDDLE_DEPTHS": "blocks", "middle_layers": "blocks", "paper_middle": "blocks",
    "resolve_blocks": "blocks", "OutputCurvature": "output_curvature",
    "output_curvature": "output_curvature", "trace_penalty": "penalty",
    "penalty_forward_context": "penalty", "trace_certificates": "certificates",
    "TraceRegularizer": "regularizer",
}

__all__ = [
    "BLOCK_RULES",
    "ESTIMATORS",
    "FLAGS",
    "GGN_FORMS",
    "MIDDLE_DEPTHS",
    "PROBE_DISTRIBUTIONS",
    "OutputCurvature",
    "RegularizerSettings",
    "TraceRegularizer",
    "middle_layers",
    "output_curvature",
    "paper_middle",
    "penalty_forward_context",
    "resolve_blocks",
    "trace_certificates",
    "trace_penalty",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"layerhessians.regularization.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'layerhessians.regularization' has no attribute {name!r}")
