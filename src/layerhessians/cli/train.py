"""``layerhessians train``: train a network and record the full and layer-wise Hessian
spectra after every epoch into a run directory (see :mod:`layerhessians.training.loop`).

Accepts the seed's ``training_eigenspectrum.py`` flags verbatim, plus our own. Flags not
typed take their defaults, or, when resuming (``--resume``), the values stored in the
run's ``config.json``; typed flags must agree with a stored run except the volatile ones
(``-n`` to extend a run, ``--device``, ``--save_freq``, ...).

The same command runs as one job over several processes under ``torchrun`` (see
:mod:`layerhessians.training.distributed`): ``torchrun --nproc_per_node N -m layerhessians train ...``.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.training.config import (
    HESSIAN_KINDS,
    IGNORED_FLAGS,
    LAYER_METHODS,
    HessianConfig,
    TrainConfig,
    apply_flags,
)
from layerhessians.vocabulary import BACKENDS, BN_MODES, DEVICE_CHOICES, DISTRIBUTIONS

HELP = "train a network, measuring full and layer-wise Hessian spectra after every epoch"
RUNS_ROOT = "runs"  # default parent of run directories (when -r is not given)
RUN_FLAGS = ("run", "resume", "overwrite", "progress", "with_pdb", "reruns")
_OPTIONS = {}  # destination -> the option string used to rebuild the command line

EPILOG = """\
The run directory (-r RUN; default runs/model=M,dataset=D,opt=O,lr=LR,l2=L2,b=B,seed=S):
  config.json          every setting, versions, device, dataset checksum, start time
  metrics.csv          one row per epoch: epoch, lr, train/test loss and accuracy, seconds
  spectra.csv          quadrature per epoch and block: epoch, block, vector, node, weight,
                       method (slq: Lanczos; exact: the block's eigenvalues, Gram route)
  metrics.csv also has top_eigenvalue/BLOCK and trace/BLOCK for the exact blocks
  slq_fidelity.csv     with --validate-layer-spectra: SLQ's W1 error per exact block, epoch
  checkpoints/last.pt  latest full training state; epoch_EEEE.pt every --save_freq epochs
  logs/train.log       what was printed
  images/              loss.png, acc.png (train and test, per epoch)
  ckpt/                the original's files, with --export-legacy
Epochs count completed training epochs (1..n; 0 = initialisation, with --init-spectra).
Read a run with layerhessians.load_run(RUN); plot it with `layerhessians plot -r RUN`.

Several processes, one run (only rank 0 writes RUN; -b is the global batch):
  torchrun --nproc_per_node N -m layerhessians train ...            (one node)
  torchrun --nnodes M --node_rank I --nproc_per_node N --master_addr HOST
           --master_port PORT -m layerhessians train ...
"""


def _hessian_examples(text: str):
    """``--hessian-examples``: a positive integer or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of examples or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of examples >= 1, got {value}")
    return value


def _add(group, *flags, **kwargs):
    kwargs.setdefault("default", argparse.SUPPRESS)
    action = group.add_argument(*flags, **kwargs)
    _OPTIONS[action.dest] = max(flags, key=len)
    return action


def add_arguments(parser):
    """Add the ``train`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    d, h = TrainConfig(), HessianConfig()
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    g = parser.add_argument_group("training (the seed's flags)")
    _add(g, "-lr", "--learning_rate", type=float, metavar="LR",
         help=f"learning rate (default {d.learning_rate:g})")
    _add(g, "-l2", "--weight_decay", type=float, metavar="L2",
         help=f"weight decay (default {d.weight_decay:g})")
    _add(g, "-n", "--num_epochs", type=int, metavar="N",
         help=f"training epochs; raise it with --resume to extend a run (default {d.num_epochs})")
    _add(g, "-o", "--optimizer", metavar="{sgd,adam}",
         help=f"SGD (momentum {d.momentum}) or Adam (default {d.optimizer}; the seed required it)")
    _add(g, "-d", "--dataset", metavar="NAME",
         help="Digits, MNIST5k (both bundled, offline), MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100; "
              f"case-insensitive (default {d.dataset})")
    _add(g, "-m", "--model", metavar="NAME",
         help=f"LeNet, VGG11, VGG11_bn, ResNet18; case-insensitive (default {d.model})")
    _add(g, "-b", "--batch_size", type=int, metavar="B", help=f"batch size (default {d.batch_size})")
    _add(g, "--milestones", type=int, nargs="+", metavar="EPOCH",
         help=f"epochs at which the learning rate is multiplied by --step_gamma (default {d.milestones[0]})")
    _add(g, "--step_gamma", type=float, metavar="G", help=f"MultiStepLR factor (default {d.step_gamma:g})")
    _add(g, "--augment", action="store_true",
         help="random crops (4-pixel padding), plus horizontal flips on CIFAR")
    _add(g, "--seed", type=int, help=f"seed of initialisation, batches and spectra (default {d.seed})")
    _add(g, "--examples_per_class", type=int, metavar="K",
         help=f"training examples per class in the fixed Hessian subset (default {d.examples_per_class})")
    _add(g, "--loss", metavar="{ce}", help="loss: cross-entropy (the only choice)")
    _add(g, "--dataset_root", metavar="DIR", help=f"datasets folder (default {d.dataset_root})")
    _add(g, "-r", "--run", metavar="RUN",
         help=f"run directory (default {RUNS_ROOT}/model=...,dataset=...; see below)")
    _add(g, "--resume", nargs="?", const=True, metavar="PATH",
         help="continue the run in -r (or in PATH: a run directory or its "
              "checkpoints/last.pt) from its last completed epoch; untyped flags come from "
              "its config.json (other checkpoints, such as epoch_0001.pt, are refused: "
              "only the last epoch's full training state is kept)")
    _add(g, "--save_freq", type=int, metavar="K", help="also keep the weights every K epochs")
    _add(g, "--cuda", type=int, metavar="N", help="GPU index (seed flag; same as --device cuda:N)")
    _add(g, "-j", "--workers", type=int, help="accepted for the seed's command lines; unused "
                                              "(data are held in memory)")
    _add(g, "-pdb", "--with_pdb", action="store_true",
         help="drop into the debugger on an unexpected exception")
    for name in IGNORED_FLAGS:
        _add(g, f"--{name}", metavar="DIR", help="accepted for the seed's command lines; "
                                                 "ignored (outputs go under -r)")

    hg = parser.add_argument_group("spectra (the paper's setting by default)")
    _add(hg, "--hessian-iterations", type=int, metavar="K",
         help="Lanczos steps per random vector; at most the number of parameters (that "
              "many steps give the exact eigenvalues; more are refused before training) "
              f"(default {h.iterations})")
    _add(hg, "--hessian-vectors", type=int, metavar="V",
         help=f"random start vectors (default {h.vectors})")
    _add(hg, "--hessian-kind", choices=HESSIAN_KINDS,
         help=f"the Hessian, its Gauss-Newton part or the residual (default {h.kind})")
    _add(hg, "--hessian-bn-mode", choices=BN_MODES,
         help="batch norm with running statistics (eval) or the subset's batch statistics "
              f"(train) (default {h.bn_mode})")
    _add(hg, "--hessian-distribution", choices=DISTRIBUTIONS,
         help=f"distribution of the random start vectors (default {h.distribution})")
    _add(hg, "--hessian-every", type=int, metavar="N",
         help=f"spectra every N epochs; the last epoch always (default {h.every})")
    _add(hg, "--no-layers", dest="layers", action="store_false",
         help="only the full Hessian, no layer blocks")
    _add(hg, "--init-spectra", action="store_true", help="also measure at initialisation (epoch 0)")
    _add(hg, "--hessian-examples", dest="hessian_total", type=_hessian_examples,
         metavar="N|all",
         help="size of the fixed Hessian set, class-balanced as far as possible, or 'all' "
              "(the training set); replaces --examples_per_class")
    _add(hg, "--hessian-subset-seed", type=int, metavar="S",
         help="seed of the class-balanced Hessian subset: which training examples the "
              f"spectra are measured on (default {h.subset_seed}, the original's)")
    _add(hg, "--hessian-reorthogonalize", choices=("auto", "full", "none"),
         help="Lanczos re-orthogonalisation: full, none (the original), or auto: full when "
              "the bases fit half the memory budget (default auto; config.json records "
              "the choice)")
    _add(hg, "--layer-spectra", dest="layer_spectra", choices=LAYER_METHODS,
         help="layer blocks' spectra: exact (the Gram route; refused before training where "
              "a block's Hessian is not certified equal to its Gauss-Newton part), slq "
              "(Lanczos, as the full spectrum), or auto: exact where certified and within "
              "the memory budget, else slq, the reason logged (default "
              f"{h.layer_method}; spectra.csv records each block's method)")
    _add(hg, "--validate-layer-spectra", dest="validate_layer_spectra", action="store_true",
         help="also run SLQ on the exact blocks every measured epoch and record its W1 "
              "error against the exact spectrum in RUN/slq_fidelity.csv")

    add_regularizer_arguments(parser)

    sg = parser.add_argument_group("memory and processes")
    _add(sg, "--hessian-batch-size", type=int, metavar="M",
         help="examples per first-order graph (micro-batch); products are accumulated, "
              "same spectra (default: the largest that fits --memory-budget)")
    _add(sg, "--memory-budget", metavar="SIZE",
         help="memory for the Hessian graphs and Lanczos bases, e.g. 8GB, 512MiB, 40%% of "
              "the free memory (default auto: 80%% of a GPU's free memory, 50%% of the "
              "host's shared by its processes); graphs that do not fit are rebuilt for "
              "every product (slower, same numbers)")
    _add(sg, "--dist-backend", choices=BACKENDS,
         help="torch.distributed backend under torchrun (default auto: nccl on GPUs, gloo "
              "on the CPU)")
    _add(sg, "--sync-bn", action="store_true",
         help="SyncBatchNorm when training on several GPUs (default: batch statistics per "
              "rank)")
    _add(sg, "--threads", type=int, metavar="N",
         help="torch CPU threads; set 1 when other processes share the cores (the default, "
              "one per core, is then several times slower). config.json records the count; "
              "--resume reuses it (another count warns: not bit-identical)")

    rg = parser.add_argument_group("run")
    _add(rg, "--device", metavar="DEV", help=f"{DEVICE_CHOICES} (default: cpu, or --cuda N)")
    _add(rg, "--overwrite", action="store_true", help="replace a run already in -r")
    _add(rg, "--export-legacy", action="store_true",
         help="also write the original's ckpt/training_eigenspectrum_full.npy and "
              "ckpt/training_eigenspectrums_epoch_E_layer_NAME.npz")
    _add(rg, "--no-download", dest="download", action="store_false",
         help="never download datasets (fail if absent)")
    _add(rg, "--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_regularizer_arguments(parser):
    """The ``--htr-*`` options (Hessian trace regularisation) and ``--reruns``."""
    from layerhessians.regularization.settings import (
        BLOCK_RULES,
        ESTIMATORS,
        GGN_FORMS,
        PENALTY_BN_MODES,
        PROBE_DISTRIBUTIONS,
        RegularizerSettings,
    )

    r = RegularizerSettings()
    g = parser.add_argument_group(
        "Hessian trace regularisation (loss + gamma * trace penalty on scheduled steps)")
    _add(g, "--htr-gamma", type=float, metavar="G",
         help="weight of the trace penalty; 0: no regulariser (default 0)")
    _add(g, "--htr-estimator", choices=ESTIMATORS,
         help="hutchinson: parameter-space probes, E = tr H (the original's); ggn: output-"
              "space probes, E = tr G (= tr H for ReLU/max-pool/eval-BN nets; double "
              f"backward only); exact: tr G exactly (default {r.estimator})")
    _add(g, "--htr-probes", type=int, metavar="P",
         help=f"probes per regularised step (the original's -hi) (default {r.probes})")
    _add(g, "--htr-distribution", choices=PROBE_DISTRIBUTIONS,
         help=f"probe law (default {r.distribution})")
    _add(g, "--htr-every", type=int, metavar="K",
         help="regularise every K-th step of an epoch, counted from 0 (the original's "
              f"-freq) (default {r.every})")
    _add(g, "--htr-start-epoch", type=int, metavar="E",
         help="first regularised epoch, 1-based (the original's -sp S is E = S + 1) "
              f"(default {r.start_epoch})")
    _add(g, "--htr-blocks", choices=BLOCK_RULES,
         help="all parameters (the full trace), layers (Conv2d/Linear weights), middle "
              "(layers at relative depth 1/4..3/4) or paper-middle (the original's mask "
              f"over parameter tensors) (default {r.blocks})")
    _add(g, "--htr-form", choices=GGN_FORMS,
         help="ggn probes per example (lower variance) or batched (cheaper; the only form "
              f"with train-mode batch norm); auto: per example where possible (default {r.form})")
    _add(g, "--htr-bn-mode", choices=PENALTY_BN_MODES,
         help="batch norm in the penalty: the batch's statistics (train, as the loss) or "
              f"running statistics (eval) (default {r.bn_mode})")
    _add(g, "--reruns", type=int, metavar="R",
         help="R runs of these settings with seeds seed..seed+R-1, each in its own run "
              "directory RUN,run1..RUN,runR (default 1: one run in RUN)")


# ----------------------------------------------------------------------------- resolution
def typed_flags(args) -> dict:
    """The flags the user typed (untyped ones are absent: their defaults are SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}


def resume_target(value, run):
    """The run directory that ``--resume PATH`` continues (with ``-r RUN``, if given).

    ``PATH`` is a run directory or its ``checkpoints/last.pt``: a run continues from its last
    completed epoch. Any other checkpoint (the seed's ``--resume RUN/checkpoints/
    epoch_0001.pt``) is refused: ``train`` resumes exactly, from the full training state
    (optimizer, schedule, random generators) of the last committed epoch. This function is
    the one place that decides; the store checks the path
    (:func:`~layerhessians.store.writer.resume_source`).

    Raises:
        UserError: a path that does not exist, a checkpoint other than ``last.pt`` or
            outside a run directory, or a ``-r`` that names another run.
    """
    # torch: imported only when running, not for --help
    from layerhessians.store.names import CHECKPOINTS, LAST_CHECKPOINT
    from layerhessians.store.writer import resume_source

    path = Path(value)
    if path.is_file() and path.parent.name == CHECKPOINTS and path.name != LAST_CHECKPOINT:
        run_dir = path.parent.parent
        raise UserError(f"--resume {value}: --resume continues a run from its last "
                        f"completed epoch ({run_dir / CHECKPOINTS / LAST_CHECKPOINT}), "
                        "not from another checkpoint (epoch_EEEE.pt files hold only model "
                        f"weights); run `layerhessians train --resume {run_dir}` (to start "
                        "again from these weights, use a new run)")
    path, _ = resume_source(value)
    if run is not None and Path(run).resolve() != path.resolve():
        raise UserError(f"--resume {value} and -r {run} name different runs; give one of them")
    return path


def _apply(config: TrainConfig, flags: dict) -> TrainConfig:
    return apply_flags(config, {k: v for k, v in flags.items() if k not in RUN_FLAGS})


def resolve(flags: dict):
    """``(config, run_dir, resume, overwrite)`` from the typed flags (and a stored run)."""
    resume = flags.get("resume")
    overwrite = bool(flags.get("overwrite", False))
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one")
    run = flags.get("run")
    if run is not None and not str(run).strip():
        raise UserError("-r/--run is empty; give a run directory, e.g. -r runs/lenet-digits "
                        f"(or leave -r out for {RUNS_ROOT}/model=...)")
    if "hessian_total" in flags and "examples_per_class" in flags:
        raise UserError("--hessian-examples and --examples_per_class both set the Hessian "
                        "set's size; give one")
    if isinstance(resume, str):
        run = resume_target(resume, run)
    if "cuda" in flags or "device" in flags:  # check devices before loading any data
        # torch: imported only when running, not for --help
        from layerhessians.training.devices import resolve_device

        flags = {**flags, "device": str(resolve_device(flags.get("device"), flags.get("cuda")))}
    config = _apply(TrainConfig(), flags).validated()
    run_dir = Path(run) if run is not None else Path(RUNS_ROOT) / config.run_name()
    stored = run_dir / "config.json"
    if resume and stored.is_file():
        import json

        try:
            base = TrainConfig.from_dict(json.loads(stored.read_text()))
        except (ValueError, TypeError) as err:
            raise UserError(f"{stored} is unreadable ({err}); use --overwrite to start over") from None
        config = _apply(base, flags).validated()
    elif resume and isinstance(flags.get("resume"), str):
        raise UserError(f"--resume {flags['resume']}: {run_dir} holds no run (no config.json)")
    elif resume and any(k not in RUN_FLAGS for k in flags):
        resume = "allow"  # issue 12: settings given (grids): continue the run, or start it
    return config, run_dir, resume if resume == "allow" else bool(resume), overwrite


def reruns(config: TrainConfig, run_dir: Path, count) -> list:
    """``[(run directory, settings)]`` of ``--reruns R``: ``RUN`` itself for 1, else
    ``RUN,run1`` .. ``RUN,runR`` with seeds ``seed`` .. ``seed + R - 1``
    (:func:`~layerhessians.pipeline.replicates.replicate_configs`), trained one after
    another (a complete replicate is skipped on ``--resume``, an interrupted one resumed).

    Raises:
        UserError: ``R`` is not an integer >= 1.
    """
    from layerhessians.pipeline.replicates import replicate_configs

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--reruns {count!r} must be an integer >= 1 (runs of these settings, "
                        "each with the next seed)")
    if count == 1:
        return [(run_dir, config)]
    return [(run_dir.parent / name, replicate)
            for name, replicate in replicate_configs(config, count, base_name=run_dir.name)]


def command_line(flags: dict) -> str:
    """``layerhessians train ...`` rebuilt from the typed flags (recorded in config.json)."""
    argv = ["layerhessians", "train"]
    for key, value in flags.items():
        option = _OPTIONS.get(key, f"--{key}")
        if isinstance(value, bool):
            argv.append(option)
        elif isinstance(value, (list, tuple)):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return shlex.join(argv)


def run(args) -> int:
    """Train (or resume) one run from the parsed ``train`` options.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status: 0, or 2 on a rank other than 0 of a distributed run when another
        rank failed (that rank prints the cause).

    Raises:
        UserError: bad settings or a run directory that cannot be used (see
            :func:`~layerhessians.training.train`).
    """
    from layerhessians.training import train
    from layerhessians.training.distributed import PeerError

    flags = typed_flags(args)
    try:
        config, run_dir, resume, overwrite = resolve(flags)
        for directory, replicate in reruns(config, run_dir, flags.get("reruns", 1)):
            train(replicate, directory, resume=resume, overwrite=overwrite,
                  command=command_line(flags),
                  progress=None if flags.get("progress", True) else False)
    except PeerError:
        if os.environ.get("RANK", "0") != "0":
            return 2  # the failing rank printed the cause
        raise
    except (UserError, KeyboardInterrupt):
        raise
    except Exception:
        if flags.get("with_pdb"):
            import pdb
            import traceback

            traceback.print_exc()
            pdb.post_mortem(sys.exc_info()[2])
        raise
    return 0
