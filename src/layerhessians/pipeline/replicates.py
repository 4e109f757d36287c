"""Replicated runs: one setting trained R times, named as the original names its runs.

The original's run directories end in ``run1`` (``model=LeNet,dataset=MNIST,te,run1``);
replicate ``k`` (1-based) of a setting is ``BASE,runK`` and trains with the training seed
``seed + k - 1`` (initialisation, batch order and the SLQ start vectors). With
``vary_subset`` the Hessian-subset seed (which training examples the spectra are measured
on; the original's fixed 0) moves with it: ``subset_seed + k - 1``. Replicate 1 keeps the
setting's own seeds, so an existing ``run1`` is the first replicate.

:func:`replicate_configs` expands a :class:`~layerhessians.training.config.TrainConfig`;
:func:`replicate_grid` expands the runs of a grid file (``reproduce``/``sweep``
``--replicates R``). Runs that differ only in these two seeds are pooled by ``match``
(:mod:`layerhessians.analysis.pooling`).
"""

import re
from dataclasses import replace

from layerhessians.errors import UserError

#: the replicate suffix of a run name: ``,run1`` .. ``,runR``
_SUFFIX = re.compile(r",run(\d+)$")
#: the ``layerhessians train`` destinations of the two seeds a replicate varies
SEED_FLAG = "seed"
SUBSET_SEED_FLAG = "hessian_subset_seed"


def check_replicates(replicates) -> int:
    """``replicates`` (runs per setting) if it is an integer >= 1, else :class:`UserError`."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise UserError(f"--replicates {replicates!r} must be an integer >= 1 (runs per "
                        "setting, each with the next training seed)")
    return replicates


def replicate_base(name: str) -> str:
    """``name`` without its replicate suffix (``...,te,run3`` -> ``...,te``)."""
    return _SUFFIX.sub("", str(name))


def replicate_index(name: str):
    """The replicate number ``k`` of a run named ``...,runK``, or ``None``."""
    match = _SUFFIX.search(str(name))
    return int(match.group(1)) if match else None


def replicate_name(base_name: str, index: int) -> str:
    """The run directory name of replicate ``index`` (1-based) of ``base_name``.

    A trailing ``,runK`` of ``base_name`` is replaced, so the seed's names
    (``model=LeNet,dataset=MNIST,te,run1``) give ``...,te,run1`` .. ``...,te,runR``.

    Args:
        base_name: the setting's run name, with or without a ``,runK`` suffix.
        index: the replicate number, >= 1.

    Returns:
        ``"BASE,runINDEX"``.

    Raises:
        UserError: ``index`` is not an integer >= 1.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise UserError(f"replicate index {index!r} must be an integer >= 1 (run1 is the first)")
    return f"{replicate_base(base_name)},run{index}"


def default_base_name(config) -> str:
    """The original's name of a setting: ``model=M,dataset=D,te`` (before ``,runK``)."""
    return f"model={config.model},dataset={config.dataset},te"


def replicate_configs(config, replicates: int, vary_subset: bool = False,
                      base_name: str = None) -> list:
    """The R replicates of ``config``: names and settings.

    Args:
        config: a :class:`~layerhessians.training.config.TrainConfig`.
        replicates: R >= 1.
        vary_subset: also vary the Hessian-subset seed (``config.hessian.subset_seed + k - 1``).
        base_name: the setting's run name (default :func:`default_base_name`).

    Returns:
        ``[(name, TrainConfig)]`` for k = 1..R: ``replicate_name(base_name, k)`` with the
        training seed ``config.seed + k - 1`` (and the subset seed, with ``vary_subset``);
        every other setting is ``config``'s.

    Raises:
        UserError: ``replicates`` is not an integer >= 1.
    """
    check_replicates(replicates)
    base = default_base_name(config) if base_name is None else base_name
    out = []
    for k in range(replicates):
        hessian = (replace(config.hessian, subset_seed=config.hessian.subset_seed + k)
                   if vary_subset else config.hessian)
        out.append((replicate_name(base, k + 1),
                    replace(config, seed=config.seed + k, hessian=hessian)))
    return out


def replicate_flags(flags: dict, index: int, vary_subset: bool = False) -> dict:
    """The settings (by ``train`` destination) of replicate ``index`` (1-based) of ``flags``:
    the seeds moved by ``index - 1`` from the given ones (or the defaults)."""
    from layerhessians.training.config import HessianConfig, TrainConfig

    out = dict(flags)
    seed = flags.get(SEED_FLAG)
    out[SEED_FLAG] = (TrainConfig().seed if seed is None else seed) + index - 1
    if vary_subset:
        subset = flags.get(SUBSET_SEED_FLAG)
        out[SUBSET_SEED_FLAG] = (HessianConfig().subset_seed if subset is None
                                 else subset) + index - 1
    return out


def replicate_grid(runs, replicates: int, vary_subset: bool = False) -> list:
    """Each :class:`~layerhessians.pipeline.grid.GridRun` of ``runs`` as ``replicates`` runs
    (``BASE,run1`` .. ``BASE,runR``), in grid order; ``runs`` itself for one replicate
    (today's names and settings: replicate 1 keeps the given seeds).

    Raises:
        UserError: ``replicates`` < 1, or two expanded runs with one name (a grid naming both
            ``X,run1`` and ``X,run2`` already).
    """
    from layerhessians.pipeline.grid import GridRun

    check_replicates(replicates)
    if replicates == 1:
        return list(runs)
    out = [GridRun(run=replicate_name(entry.run, k),
                   flags=replicate_flags(entry.flags, k, vary_subset))
           for entry in runs for k in range(1, replicates + 1)]
    names = [r.run for r in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--replicates {replicates} names run {repeated[0]} twice: the grid "
                        "already holds replicates of one setting; give each setting once")
    return out
