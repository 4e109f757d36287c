"""The seed's grid of 12 runs (3 models x 4 datasets): its run directory names and the
original ``match_distros.py``'s hard-coded peak epochs (Sankar et al., AAAI 2021; the seed
repository's README and NOTES)."""

# The original match_distros.py's hard-coded peak epochs, as 0-based indices into its 50
# per-epoch spectra; index k is the spectrum after k + 1 training epochs, i.e. our epoch
# k + 1 (our epoch 0 is the initialisation).
PAPER_PEAK_INDEX = {
    ("LeNet", "FashionMNIST"): 33, ("LeNet", "MNIST"): 18, ("LeNet", "SVHN"): 20,
    ("LeNet", "CIFAR10"): 44, ("VGG11_bn", "MNIST"): 21, ("VGG11_bn", "FashionMNIST"): 6,
    ("VGG11_bn", "SVHN"): 28, ("VGG11_bn", "CIFAR10"): 19, ("ResNet18", "MNIST"): 19,
    ("ResNet18", "FashionMNIST"): 25, ("ResNet18", "SVHN"): 11, ("ResNet18", "CIFAR10"): 26,
}
PAPER_PEAK_EPOCH = {key: index + 1 for key, index in PAPER_PEAK_INDEX.items()}

SEED_MODELS = ("LeNet", "VGG11_bn", "ResNet18")
SEED_DATASETS = ("MNIST", "FashionMNIST", "SVHN", "CIFAR10")


def seed_run_name(model: str, dataset: str) -> str:
    """The seed README's run directory name, e.g. ``model=LeNet,dataset=MNIST,te,run1``."""
    return f"model={model},dataset={dataset},te,run1"


SEED_RUNS = tuple(seed_run_name(m, d) for m in SEED_MODELS for d in SEED_DATASETS)


def paper_peak_epoch(model, dataset):
    """The original's hard-coded peak for ``(model, dataset)`` as our epoch, or None."""
    return PAPER_PEAK_EPOCH.get((model, dataset))
