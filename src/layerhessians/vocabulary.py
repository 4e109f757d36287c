"""The settings' vocabularies and defaults, defined once, free of torch.

The packages that own a vocabulary re-export it (``curvature.BN_MODES``,
``spectra.DISTRIBUTIONS``, ``training.distributed.BACKENDS``, ``curvature.blocks.FULL``);
the CLI reads them from here so that ``layerhessians --help`` starts without torch.
"""

#: the reserved block name of the whole Hessian (beside the layer blocks' parameter names)
FULL = "full"
#: curvature kinds by name; `curvature.kinds.KIND_CLASSES` maps each to its operator class
#: (checked equal at import), in the order of help texts and choices
KINDS = ("hessian", "ggn", "residual", "ef")
#: what each kind is, for help texts (same names and order as KINDS)
KIND_HELP = {"hessian": "the Hessian", "ggn": "its Gauss-Newton part",
             "residual": "the residual H - G", "ef": "the empirical Fisher"}
#: the model zoo's names; `models.registry` checks them equal to its builders at import
MODELS = ("LeNet", "VGG11", "VGG11_bn", "ResNet18")
#: batch-norm mode the curvature is taken in: running statistics or the batch's own
BN_MODES = ("eval", "train")
#: distributions of the random start vectors of Lanczos / SLQ
DISTRIBUTIONS = ("gaussian", "rademacher")
#: how the layer blocks' spectra are computed (``--layer-spectra``, ``layer_method=``)
LAYER_METHODS = ("auto", "exact", "slq")
#: Lanczos re-orthogonalisation as the CLI spells it, and what each word means in the API
REORTHOGONALIZE = {"auto": "auto", "full": True, "none": False}
#: how a loss reduces over the examples of a batch
LOSS_REDUCTIONS = ("mean", "sum")
#: the paper's start vectors (API and CLI default)
DEFAULT_DISTRIBUTION = "gaussian"
#: Lanczos steps per random vector and random vectors per spectrum (the paper's setting)
DEFAULT_ITERATIONS = 128
DEFAULT_VECTORS = 1
#: the devices ``--device`` accepts (resolved by ``training.devices.resolve_device``)
DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"
#: where a grid's runs train (pipeline.launchers), and how to get the job launchers
LAUNCHERS = ("local", "slurm")
INSTALL_HINT = "pip install 'layerhessians[cluster]'"
SLURM_DEFAULT_MINUTES = 24 * 60  # a Slurm job's time limit unless --time
#: torch.distributed backends under torchrun (auto: nccl on GPUs, gloo on CPUs)
BACKENDS = ("auto", "gloo", "nccl")
#: bootstrap draws behind each distance's spread and the matching verdicts
DEFAULT_REPLICATES = 200

if tuple(KIND_HELP) != KINDS:
    raise ImportError(f"vocabulary.KIND_HELP names {tuple(KIND_HELP)}, not KINDS {KINDS}")
