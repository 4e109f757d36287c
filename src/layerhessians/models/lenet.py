"""LeNet-5 for 32x32 images, as in the original LayerHessians code.

Input ``[N, C, 32, 32]`` (C = ``in_channels``), output logits ``[N, num_classes]``.

    conv1  Conv2d(C, 6, 5)    -> ReLU -> MaxPool 2   [N, 6, 14, 14]
    conv2  Conv2d(6, 16, 5)   -> ReLU -> MaxPool 2   [N, 16, 5, 5] -> flatten [N, 400]
    fc1    Linear(400, 120)   -> ReLU
    fc2    Linear(120, 84)    -> ReLU
    fc3    Linear(84, num_classes)

Parameters: ``150 C + 60,706 + 85 num_classes`` (61,706 for 1 channel, 10 classes).
Initialisation: PyTorch's default, as in the original (it set none of its own).
"""

from torch import Tensor, nn
from torch.nn import functional as F


class LeNet(nn.Module):
    """LeNet-5: ``[N, in_channels, 32, 32]`` -> ``[N, num_classes]`` logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes] of images ``x`` [N, in_channels, 32, 32]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
