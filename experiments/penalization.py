"""The original's ``Regularization/experiments/*_penalization.py`` command line, shared by
the five scripts beside this file, as a thin layer over ``layerhessians train``.

Flags (the original's): ``-lr -l2 -n -d -b -m -r --milestones --lr_gamma -reruns -sp -gamma
-freq -hi -mom -seed --dataset_root -cuda --workers -dp``. ``-reruns R`` trains ``RUN,run1``
.. ``RUN,runR`` with seeds ``seed`` .. ``seed+R-1`` (the original ran its reruns in one
process after one seed). ``-sp S`` (0-based epoch) starts the penalty at epoch ``S + 1``
(1-based); ``-freq`` counts steps from 0 in every epoch, as the original. The estimator is
the original's: Hutchinson probes in parameter space over all parameters (``middle``: the
original's mask over the list of parameter tensors, ``htr_blocks="paper-middle"``).

Differences from the original (its bugs are not reproduced): batch norm trains in train
mode every epoch (the original left it in eval mode after the first evaluation); no random
flips or rotations of digits; the penalty's probes come from their own seeded generator;
defaults run offline (``-d MNIST5k``); every run also records the Hessian spectra per
epoch (``layerhessians train``), top-5 test accuracy and the penalty per epoch.
"""

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import layerhessians  # noqa: F401
except ImportError:  # a source checkout that was not installed
    sys.path.insert(0, str(REPO / "src"))

#: per method: its penalty (``None``: none) and the defaults that differ between scripts
METHODS = {
    "no": {"penalty": None, "l2": 0.0},
    "l2": {"penalty": None, "l2": 1e-4},
    "ht": {"penalty": "gaussian", "l2": 0.0, "gamma": 1e-3},
    "combined": {"penalty": "rademacher", "l2": 1e-5, "gamma": 1e-3},
    "middle": {"penalty": "gaussian", "l2": 0.0, "gamma": 1e-4, "blocks": "paper-middle"},
}


def parser(method: str) -> argparse.ArgumentParser:
    """The original's flags for ``method`` (one of :data:`METHODS`)."""
    spec = METHODS[method]
    p = argparse.ArgumentParser(
        description=f"{method}_penalization (the original's flags) over layerhessians train")
    p.add_argument("-lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    p.add_argument("-l2", type=float, default=spec["l2"],
                   help=f"SGD weight decay (default {spec['l2']:g})")
    p.add_argument("-n", type=int, default=30, help="epochs (default 30)")
    p.add_argument("-d", default="MNIST5k", help="dataset (default MNIST5k, offline)")
    p.add_argument("-b", type=int, default=256, help="batch size (default 256)")
    p.add_argument("-m", default="LeNet", help="model (default LeNet)")
    p.add_argument("-r", default=None, help="run directory (default runs/model=M,dataset=D,METHOD)")
    p.add_argument("--milestones", type=int, nargs="+", default=[10, 20],
                   help="learning-rate milestones in epochs (default 10 20)")
    p.add_argument("--lr_gamma", type=float, default=0.25, help="learning-rate factor (default 0.25)")
    p.add_argument("-reruns", type=int, default=1, help="runs with seeds seed.. (default 1)")
    p.add_argument("-mom", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("-seed", type=int, default=0, help="seed of the first rerun (default 0)")
    p.add_argument("--dataset_root", default=str(REPO / "datasets"), help="datasets folder")
    p.add_argument("-cuda", type=int, default=None, help="GPU index (default: CPU)")
    p.add_argument("--workers", type=int, default=4, help="accepted; unused (data in memory)")
    p.add_argument("-dp", action="store_true", help="accepted; unused (DataParallel: use torchrun)")
    if spec["penalty"] is not None:
        p.add_argument("-sp", type=int, default=10,
                       help="first penalised epoch, 0-based as the original (default 10)")
        p.add_argument("-gamma", type=float, default=spec["gamma"],
                       help=f"penalty weight (default {spec['gamma']:g})")
        p.add_argument("-freq", type=int, default=50,
                       help="penalise every FREQ-th step of an epoch (default 50)")
        p.add_argument("-hi", type=int, default=10, help="Hutchinson probes (default 10)")
    return p


def settings(args, method: str) -> dict:
    """The ``layerhessians train`` settings (by destination) of the parsed ``args``."""
    spec = METHODS[method]
    flags = {"model": args.m, "dataset": args.d, "optimizer": "sgd", "learning_rate": args.lr,
             "weight_decay": args.l2, "momentum": args.mom, "num_epochs": args.n,
             "batch_size": args.b, "milestones": args.milestones, "step_gamma": args.lr_gamma,
             "seed": args.seed, "dataset_root": args.dataset_root, "workers": args.workers}
    if args.cuda is not None:
        flags["device"] = f"cuda:{args.cuda}"
    if spec["penalty"] is not None:
        flags.update({"htr_gamma": args.gamma, "htr_estimator": "hutchinson",
                      "htr_probes": args.hi, "htr_every": args.freq,
                      "htr_start_epoch": args.sp + 1, "htr_distribution": spec["penalty"],
                      "htr_blocks": spec.get("blocks", "all")})
    return flags


def main(method: str, argv=None) -> int:
    """Parse the original's flags for ``method`` and train its reruns (a complete run is
    kept, an interrupted one resumed)."""
    from layerhessians.cli.train import reruns as rerun_list
    from layerhessians.errors import UserError
    from layerhessians.training import train
    from layerhessians.training.config import TrainConfig, apply_flags

    args = parser(method).parse_args(argv)
    run = args.r or f"runs/model={args.m},dataset={args.d},{method}"
    command = f"experiments/{method}_penalization.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    try:
        config = apply_flags(TrainConfig(), settings(args, method)).validated()
        for directory, replicate in rerun_list(config, Path(run), args.reruns):
            train(replicate, directory, resume="allow", command=command)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
