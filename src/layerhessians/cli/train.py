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

from layerhessians.data.registry import REGISTRY
from layerhessians.errors import UserError
from layerhessians.training.config import IGNORED_FLAGS, HessianConfig, TrainConfig
from layerhessians.training.resume import RUNS_ROOT, reruns, resolve
from layerhessians.vocabulary import (
    BACKENDS,
    BN_MODES,
    DEVICE_CHOICES,
    DISTRIBUTIONS,
    KIND_HELP,
    KINDS,
    LAYER_METHODS,
    MODELS,
    REORTHOGONALIZE,
)

HELP = "train a network, measuring full and layer-wise Hessian spectra after every epoch"
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
    bundled = [spec.name for spec in REGISTRY.values() if spec.bundled]
    others = [spec.name for spec in REGISTRY.values() if not spec.bundled]
    _add(g, "-d", "--dataset", metavar="NAME|PATH",
         help=f"{', '.join(bundled)} (bundled, offline), {', '.join(others)}; "
              f"case-insensitive (default {d.dataset}); or your own data: an image folder (one "
              "sub-folder per class) or a .npz/.pt file (keys train_x, train_y, test_x, test_y)")
    _add(g, "-m", "--model", metavar="NAME",
         help=f"{', '.join(MODELS)}; case-insensitive (default {d.model})")
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
    _add(hg, "--hessian-kind", choices=KINDS,
         help=", ".join(f"{name}: {what}" for name, what in KIND_HELP.items())
         + f" (default {h.kind})")
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
    _add(hg, "--hessian-reorthogonalize", choices=tuple(REORTHOGONALIZE),
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
