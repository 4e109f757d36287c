"""The regularisation grids: the original's scripts.sh settings (Regularization/, LeNet,
VGG11_bn, ResNet18) and the offline finding on MNIST5k, as grid entries for ``sweep``.

Every method is a set of ``layerhessians train`` settings (by destination). The original's
``-sp S`` (0-based epoch) is ``htr_start_epoch = S + 1``; its ``-freq``, ``-hi``,
``-gamma`` are ``htr_every``, ``htr_probes``, ``htr_gamma`` with ``htr_estimator
"hutchinson"`` (its estimator), Gaussian probes (``ht``, ``middle``) or Rademacher
(``combined``), and ``middle`` is ``htr_blocks "paper-middle"``.
"""

from __future__ import annotations

#: LeNet on MNIST in the original's scripts.sh (``no_penalization``): 30 epochs, b 256
MNIST_BASE = {"model": "LeNet", "optimizer": "sgd", "learning_rate": 1e-2,
              "weight_decay": 0.0, "batch_size": 256, "num_epochs": 30,
              "milestones": [10, 20], "step_gamma": 0.25}
#: the original's HTR schedule on LeNet/MNIST: from epoch 11 (-sp 10), every 50th step of an
#: epoch, 10 Hutchinson probes
ORIGINAL_HTR = {"htr_estimator": "hutchinson", "htr_probes": 10, "htr_every": 50,
                "htr_start_epoch": 11, "htr_distribution": "gaussian", "htr_blocks": "all"}


def mnist_methods(ggn_gamma: float | None = None) -> dict:
    """The finding's methods on LeNet/MNIST settings: ``{name: settings}``.

    ``sgd`` (no penalty), ``l2`` (weight decay 1e-4), ``htr`` (the original: gamma 1e-3, 10
    Gaussian Hutchinson probes every 50th step from epoch 11), ``htr+l2`` (the original's
    ``combined``: Rademacher probes plus weight decay 1e-4), ``paper-middle`` (the original's
    ``middle``: gamma 1e-4 on its parameter-list mask), and, when ``ggn_gamma`` is given,
    ``ggn`` (1 output-space probe every step from epoch 1, all parameters, the batched
    form: the cheaper one) and
    ``ggn-middle`` (the same on the middle layers by depth).
    """
    methods = {
        "sgd": {},
        "l2": {"weight_decay": 1e-4},
        "htr": {**ORIGINAL_HTR, "htr_gamma": 1e-3},
        "htr+l2": {**ORIGINAL_HTR, "htr_gamma": 1e-3, "htr_distribution": "rademacher",
                   "weight_decay": 1e-4},
        "paper-middle": {**ORIGINAL_HTR, "htr_gamma": 1e-4, "htr_blocks": "paper-middle"},
    }
    if ggn_gamma is not None:
        ggn = {"htr_gamma": ggn_gamma, "htr_estimator": "ggn", "htr_probes": 1,
               "htr_every": 1, "htr_start_epoch": 1, "htr_form": "batched"}
        methods["ggn"] = {**ggn, "htr_blocks": "all"}
        methods["ggn-middle"] = {**ggn, "htr_blocks": "middle"}
    return methods


def grid(methods: dict, base: dict, extra: dict | None = None, description: str = "") -> dict:
    """A grid file's content: one entry per method (run name = method name)."""
    runs = [{"run": name, "flags": {**base, **(extra or {}), **settings}}
            for name, settings in methods.items()]
    return {"description": description, "runs": runs}


#: the original's scripts.sh commands (NOTES-HTR.md), per model/dataset and method
SEED_COMMANDS = {
    ("LeNet", "MNIST"): {
        "base": MNIST_BASE,
        "methods": {"no": {}, "ht": {**ORIGINAL_HTR, "htr_gamma": 1e-3},
                    "combined": {**ORIGINAL_HTR, "htr_gamma": 1e-3,
                                 "htr_distribution": "rademacher", "weight_decay": 1e-4},
                    "middle": {**ORIGINAL_HTR, "htr_gamma": 1e-4,
                               "htr_blocks": "paper-middle"}}},
    ("LeNet", "FashionMNIST"): {
        "base": {**MNIST_BASE, "num_epochs": 40},
        "methods": {"ht": {**ORIGINAL_HTR, "htr_start_epoch": 21, "htr_gamma": 1e-5},
                    "combined": {**ORIGINAL_HTR, "htr_start_epoch": 21, "htr_gamma": 1e-5,
                                 "htr_distribution": "rademacher", "weight_decay": 1e-13},
                    "middle": {**ORIGINAL_HTR, "htr_start_epoch": 21, "htr_gamma": 1e-6,
                               "htr_blocks": "paper-middle"}}},
    ("LeNet", "SVHN"): {
        "base": {**MNIST_BASE, "learning_rate": 1e-1, "num_epochs": 50, "milestones": [20, 35]},
        "methods": {"ht": {**ORIGINAL_HTR, "htr_start_epoch": 1, "htr_gamma": 1e-7},
                    "combined": {**ORIGINAL_HTR, "htr_start_epoch": 1, "htr_gamma": 1e-8,
                                 "htr_distribution": "rademacher", "weight_decay": 1e-3}}},
    ("VGG11_bn", "CIFAR100"): {
        "base": {**MNIST_BASE, "model": "VGG11_bn", "batch_size": 64, "num_epochs": 50},
        "methods": {"ht": {**ORIGINAL_HTR, "htr_probes": 5, "htr_gamma": 1e-6,
                           "num_epochs": 60},
                    "combined": {**ORIGINAL_HTR, "htr_probes": 5, "htr_gamma": 1e-6,
                                 "htr_distribution": "rademacher", "weight_decay": 1e-4},
                    "middle": {**ORIGINAL_HTR, "htr_probes": 10, "htr_gamma": 1e-7,
                               "htr_blocks": "paper-middle"}}},
    ("ResNet18", "CIFAR10"): {
        "base": {**MNIST_BASE, "model": "ResNet18", "batch_size": 64, "num_epochs": 40,
                 "milestones": [20, 30]},
        "methods": {"ht": {**ORIGINAL_HTR, "htr_probes": 3, "htr_gamma": 1e-6},
                    "combined": {**ORIGINAL_HTR, "htr_probes": 3, "htr_gamma": 1e-12,
                                 "htr_distribution": "rademacher", "weight_decay": 1e-4},
                    "middle": {**ORIGINAL_HTR, "htr_probes": 3, "htr_gamma": 1e-5,
                               "htr_blocks": "paper-middle"}}},
}


def seed_grid() -> dict:
    """The original's scripts.sh regularisation commands as one grid file (datasets must be
    downloaded; their bugs not reproduced: batch norm back in train mode every epoch, no
    flips or rotations of digits)."""
    runs = []
    for (model, dataset), spec in SEED_COMMANDS.items():
        for method, settings in spec["methods"].items():
            runs.append({"run": f"model={model},dataset={dataset},{method}",
                         "flags": {**spec["base"], "dataset": dataset, **settings}})
    return {"description": "The original's Regularization/scripts.sh settings", "runs": runs}


#: the quick, offline variant: LeNet on MNIST5k, 5 epochs, the penalties from epoch 2
QUICK_BASE = {**MNIST_BASE, "dataset": "MNIST5k", "num_epochs": 5, "milestones": [3, 4],
              "examples_per_class": 10, "hessian_iterations": 64, "layer_spectra": "auto",
              "init_spectra": True, "threads": 1}


def quick_grid() -> dict:
    """The offline quick variant (``layerhessians reproduce --regularization --quick``)."""
    methods = mnist_methods(1e-3)
    for name in ("htr", "htr+l2", "paper-middle"):  # from epoch 2, every 4th step
        methods[name] = {**methods[name], "htr_start_epoch": 2, "htr_every": 4}
    return grid({f"model=LeNet,dataset=MNIST5k,{name}": settings
                 for name, settings in methods.items()}, QUICK_BASE,
                description="HTR quick grid: LeNet on MNIST5k, 5 epochs, SGD / L2 / the "
                            "original's HTR (from epoch 2, every 4th step) / ggn every step, "
                            "all and middle layers; offline, a few minutes per run on one "
                            "core. Run: layerhessians reproduce --regularization --quick "
                            "--replicates 3")


#: shipped grid name -> its generator (the JSON files in layerhessians/configs/ are written
#: from these; a test keeps them equal)
SHIPPED_GRIDS = {"htr-seed": seed_grid, "htr-quick": quick_grid}
