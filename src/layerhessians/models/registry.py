"""``build_model``: a model of the zoo by name, for ``[N, in_channels, 32, 32]`` inputs."""

from collections.abc import Callable
from numbers import Integral

from torch import nn

from layerhessians.errors import UserError, unknown_name
from layerhessians.models.lenet import LeNet
from layerhessians.models.resnet import resnet18
from layerhessians.models.vgg import vgg11, vgg11_bn
from layerhessians.vocabulary import MODELS as VOCABULARY_MODELS

IMAGE_SIZE = 32  # every model takes [N, C, 32, 32] inputs

_BUILDERS: "dict[str, Callable[[int, int], nn.Module]]" = {
    "LeNet": LeNet,
    "VGG11": vgg11,
    "VGG11_bn": vgg11_bn,
    "ResNet18": resnet18,
}
MODELS = tuple(_BUILDERS)
if MODELS != VOCABULARY_MODELS:  # the torch-free list the CLI offers must match
    raise ImportError(f"models {MODELS} differ from vocabulary.MODELS {VOCABULARY_MODELS}")


def canonical_model_name(name: str) -> str:
    """The zoo's spelling of ``name`` (matched case-insensitively): ``"resnet18"`` ->
    ``"ResNet18"``. Raises :class:`UserError` listing the choices if there is none."""
    if isinstance(name, str):
        for known in MODELS:
            if known.lower() == name.strip().lower():
                return known
    raise unknown_name("model", name, MODELS)


def build_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model ``[N, in_channels, 32, 32]`` -> logits ``[N, num_classes]``.

    ``name``: one of :data:`MODELS`, case-insensitive. The weights come from torch's global
    random generator: the same ``torch.manual_seed`` gives identical weights. The model is in
    training mode, on the CPU, in float32.
    """
    canonical = canonical_model_name(name)
    _check_count("in_channels", in_channels, minimum=1, hint="1 (grey) or 3 (colour)")
    _check_count("num_classes", num_classes, minimum=2, hint="the dataset's class count")
    return _BUILDERS[canonical](int(in_channels), int(num_classes))


def _check_count(label: str, value, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise UserError(f"{label} must be an integer >= {minimum}, got {value!r}; use {hint}")
