"""curvature.modes.mode_difference: when a model called in its own modes computes what the
engine's modes compute (so a training step's forward can serve the trace penalty)."""

from torch import nn

from layerhessians.curvature.modes import mode_difference
from layerhessians.models import build_model


def test_mode_free_models_in_either_mode():
    for name in ("LeNet", "VGG11_bn", "ResNet18"):
        model = build_model(name, in_channels=3, num_classes=10)
        assert mode_difference(model.train(), "train") is None, name  # BN in train mode
        assert mode_difference(model.eval(), "eval") is None, name
    lenet = build_model("LeNet", in_channels=1, num_classes=10)
    assert mode_difference(lenet.train(), "eval") is None  # nothing reads its mode


def test_modules_that_read_their_mode_are_named():
    bn = build_model("VGG11_bn", in_channels=3, num_classes=10).train()
    assert "features.1 (BatchNorm2d) reads its mode and is in train mode" == \
        mode_difference(bn, "eval")
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).train()
    assert "1 (Dropout)" in mode_difference(dropout, "train")
    assert mode_difference(dropout.eval(), "train") is None
    assert "LSTM" in mode_difference(nn.LSTM(3, 3).train(), "train")


def test_hooks_and_helpers_that_read_the_mode_and_sparse_embeddings():
    class Helper(nn.Module):  # reads its mode in a helper method, not in forward
        def forward(self, x):
            return self._scale(x)

        def _scale(self, x):
            return x * (2.0 if self.training else 1.0)

    assert "Helper" in mode_difference(nn.Sequential(Helper()).train(), "train")
    hooked = nn.Sequential(nn.Linear(3, 3)).train()
    hooked[0].register_forward_hook(lambda m, i, o: o * 2 if m.training else o)
    assert "0 (Linear)" in mode_difference(hooked, "train")
    embedding = nn.Embedding(5, 3, sparse=True)
    assert "sparse gradients" in mode_difference(embedding.eval(), "eval")
