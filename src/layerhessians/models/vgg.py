"""VGG11 and VGG11_bn for 32x32 images, as in the original LayerHessians code.

Input ``[N, C, 32, 32]`` (C = ``in_channels``), output logits ``[N, num_classes]``.

``features`` (module names ``features.0``, ``features.1``, ...): the configuration
``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``; each number is a
``Conv2d(k=3, padding=1)`` with bias, followed by ``BatchNorm2d`` (VGG11_bn only) and ReLU;
``M`` is ``MaxPool2d(2)``. Five pools take 32x32 to 1x1, so the flattened features are
``[N, 512]``.

``classifier`` (``classifier.0`` ... ``classifier.6``): the original's classifier, found in
yashkhasbage25/HTR ``LayerHessians/models/cifar/network.py`` (class ``Network.VGG``):

    Linear(512, 4096, bias=False) -> BatchNorm1d(4096) -> ReLU
    Linear(4096, 4096, bias=False) -> BatchNorm1d(4096) -> ReLU
    Linear(4096, num_classes)

not the one-``Linear(512, classes)`` head common in CIFAR code. As in the original, the
classifier has its ``BatchNorm1d`` layers in both VGG11 and VGG11_bn (``_bn`` only adds
batch norm to the convolutions), and there is no dropout. Batch norm in training mode needs
more than one example per batch.

Initialisation, as in the original: conv weights ``N(0, 2 / (9 * out_channels))``
(Kaiming normal, fan-out), conv biases 0; linear weights ``N(0, 0.01^2)``, linear biases 0;
batch-norm scale 1, shift 0. (The distributions match; the random stream does not
reproduce the original's draws.)

Parameters (C channels, K classes): VGG11 ``576 C + 28,109,504 + 4,097 K``;
VGG11_bn adds 5,504 (conv batch norm).
"""

from torch import Tensor, nn

VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
CLASSIFIER_WIDTH = 4096


class VGG(nn.Module):
    """CIFAR-style VGG: ``[N, in_channels, 32, 32]`` -> ``[N, num_classes]`` logits.

    ``config``: channel counts and ``"M"`` (2x2 max-pool); it must pool 32x32 down to 1x1.
    ``batch_norm``: add ``BatchNorm2d`` after every convolution.
    """

    def __init__(
        self,
        config=VGG11_CONFIG,
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.features = _make_features(config, in_channels, batch_norm)
        width = [c for c in config if c != "M"][-1]
        self.classifier = nn.Sequential(
            nn.Linear(width, CLASSIFIER_WIDTH, bias=False),
            nn.BatchNorm1d(CLASSIFIER_WIDTH),
            nn.ReLU(),
            nn.Linear(CLASSIFIER_WIDTH, CLASSIFIER_WIDTH, bias=False),
            nn.BatchNorm1d(CLASSIFIER_WIDTH),
            nn.ReLU(),
            nn.Linear(CLASSIFIER_WIDTH, num_classes),
        )
        _init_like_original(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes] of images ``x`` [N, in_channels, 32, 32]."""
        return self.classifier(self.features(x).flatten(1))


def _make_features(config, in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers = []
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, entry, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(entry))
        layers.append(nn.ReLU())
        in_channels = entry
    return nn.Sequential(*layers)


def _init_like_original(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def vgg11(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG11 without batch norm in the convolutions (see the module docstring)."""
    return VGG(VGG11_CONFIG, in_channels, num_classes, batch_norm=False)


def vgg11_bn(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG11 with ``BatchNorm2d`` after every convolution (see the module docstring)."""
    return VGG(VGG11_CONFIG, in_channels, num_classes, batch_norm=True)
