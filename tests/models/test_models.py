"""The model zoo: architectures (parameter counts worked out by hand), shapes, wiring,
initialisation, determinism, layer blocks, and input errors."""

import math

import pytest
import torch
from torch.nn import functional as F

from layerhessians.errors import UserError
from layerhessians.models import MODELS, BasicBlock, build_model, layer_blocks


def conv(cin, cout, k, bias=True):
    return cout * cin * k * k + (cout if bias else 0)


def linear(fin, fout, bias=True):
    return fout * fin + (fout if bias else 0)


def bn(c):
    return 2 * c  # scale and shift; running statistics are buffers


def lenet_params(c, k):
    # conv1 6x(c*5*5)+6, conv2 16x(6*5*5)+16, fc1 120x400+120, fc2 84x120+84, fc3 kx84+k
    return conv(c, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, k)


VGG11_WIDTHS = [64, 128, 256, 256, 512, 512, 512, 512]


def vgg11_params(c, k, batch_norm):
    # 8 biased 3x3 convs (+ BatchNorm2d each for _bn); classifier as in the original:
    # Linear(512,4096,no bias) BN1d(4096) Linear(4096,4096,no bias) BN1d(4096) Linear(4096,k)
    total, cin = 0, c
    for width in VGG11_WIDTHS:
        total += conv(cin, width, 3) + (bn(width) if batch_norm else 0)
        cin = width
    total += linear(512, 4096, bias=False) + bn(4096)
    total += linear(4096, 4096, bias=False) + bn(4096)
    return total + linear(4096, k)


def resnet18_params(c, k):
    # stem 3x3 conv (no bias) + BN; per BasicBlock two 3x3 convs (no bias) + 2 BN, plus a
    # 1x1 conv + BN projection where stride/width changes (layer2.0, layer3.0, layer4.0)
    total = conv(c, 64, 3, bias=False) + bn(64)
    cin = 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            total += conv(cin, width, 3, bias=False) + bn(width)
            total += conv(width, width, 3, bias=False) + bn(width)
            if block == 0 and (stride != 1 or cin != width):
                total += conv(cin, width, 1, bias=False) + bn(width)
            cin = width
    return total + linear(512, k)


EXPECTED_PARAMS = {
    "LeNet": lenet_params,
    "VGG11": lambda c, k: vgg11_params(c, k, batch_norm=False),
    "VGG11_bn": lambda c, k: vgg11_params(c, k, batch_norm=True),
    "ResNet18": resnet18_params,
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_and_output_shapes(name):
    torch.manual_seed(0)
    for channels in (1, 3):
        model = build_model(name, in_channels=channels, num_classes=10)
        assert count(model) == EXPECTED_PARAMS[name](channels, 10)
        out = model(torch.randn(2, channels, 32, 32))
        assert out.shape == (2, 10) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_reference_numbers():
    # the figures quoted in the docs and the brief
    assert lenet_params(1, 10) == 61_706
    assert resnet18_params(3, 10) == 11_173_962


def test_num_classes_sets_output_width():
    model = build_model("LeNet", in_channels=3, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert count(model) == lenet_params(3, 100)


def test_names_are_case_insensitive():
    assert type(build_model("lenet")) is type(build_model("LeNet"))
    assert count(build_model("vgg11_BN")) == vgg11_params(1, 10, batch_norm=True)


@pytest.mark.parametrize("name", ["LeNet", "ResNet18", "VGG11_bn"])
def test_seeded_construction_is_deterministic(name):
    def weights(seed):
        torch.manual_seed(seed)
        return build_model(name, in_channels=3).state_dict()

    first, second, other = weights(7), weights(7), weights(8)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_lenet_layer_blocks_in_order():
    blocks = layer_blocks(build_model("LeNet"))
    names = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert list(blocks) == names
    assert all(len(b) == 1 for b in blocks.values())  # one leaf each
    assert [tuple(b[0].shape) for b in blocks.values()] == [
        (6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]


def test_vgg11_bn_layer_blocks():
    blocks = layer_blocks(build_model("VGG11_bn", in_channels=3))
    assert len(blocks) == 8 + 3  # 8 convolutions + 3 linear layers
    assert [b.dim() for [b] in blocks.values()] == [4] * 8 + [2] * 3
    assert list(blocks)[0] == "features.0.weight" and list(blocks)[-1] == "classifier.6.weight"


def test_resnet18_layer_blocks():
    blocks = layer_blocks(build_model("ResNet18"))
    assert len(blocks) == 1 + 4 * 2 * 2 + 3 + 1  # stem, 16 block convs, 3 shortcuts, fc
    shortcuts = [n for n in blocks if "downsample" in n]
    assert shortcuts == [f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4)]
    names = list(blocks)
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    # module order: a block's shortcut comes after its two convolutions
    assert names.index("layer2.0.downsample.0.weight") == names.index("layer2.0.conv2.weight") + 1


def test_lenet_forward_matches_float64_reference():
    torch.manual_seed(1)
    model = build_model("LeNet", in_channels=3, num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    p = dict(model.named_parameters())
    h = F.max_pool2d(torch.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"])), 2)
    h = F.max_pool2d(torch.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2)
    h = h.reshape(2, 400)
    h = torch.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    h = torch.relu(h @ p["fc2.weight"].T + p["fc2.bias"])
    expected = h @ p["fc3.weight"].T + p["fc3.bias"]
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def _bn_eval(x, module):
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight,
                        module.bias, training=False, eps=module.eps)


@pytest.mark.parametrize("in_planes, planes, stride", [(4, 4, 1), (4, 6, 2)])
def test_basic_block_matches_float64_reference(in_planes, planes, stride):
    torch.manual_seed(2)
    block = BasicBlock(in_planes, planes, stride).double()
    for module in block.modules():  # non-trivial batch-norm statistics and affine maps
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    block.eval()
    x = torch.randn(2, in_planes, 8, 8, dtype=torch.float64)
    h = torch.relu(_bn_eval(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    h = _bn_eval(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    if stride == 1 and in_planes == planes:
        assert block.downsample is None
        shortcut = x
    else:
        conv1x1, norm = block.downsample
        shortcut = _bn_eval(F.conv2d(x, conv1x1.weight, stride=stride), norm)
    expected = torch.relu(h + shortcut)
    assert expected.shape == (2, planes, 8 // stride, 8 // stride)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def _std_close(tensor, std, rel=0.02):
    assert abs(tensor.mean().item()) < 5 * std / math.sqrt(tensor.numel())
    assert tensor.std().item() == pytest.approx(std, rel=rel)


def test_vgg_initialisation_follows_original():
    torch.manual_seed(3)
    model = build_model("VGG11_bn", in_channels=3)
    conv = model.features[25]  # last 3x3 conv, 512 -> 512
    _std_close(conv.weight, math.sqrt(2 / (9 * 512)))
    assert not conv.bias.any()
    for index in (0, 3, 6):
        _std_close(model.classifier[index].weight, 0.01)
    assert model.classifier[0].bias is None and model.classifier[3].bias is None
    assert not model.classifier[6].bias.any()
    assert all(bn.weight.eq(1).all() and not bn.bias.any()
               for bn in model.modules() if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm))


def test_resnet_initialisation_follows_original():
    torch.manual_seed(4)
    model = build_model("ResNet18", in_channels=3)
    _std_close(model.layer4[1].conv2.weight, math.sqrt(2 / (9 * 512)))
    _std_close(model.layer4[0].downsample[0].weight, math.sqrt(2 / 512))
    # fc keeps PyTorch's default: U(-1/sqrt(512), 1/sqrt(512))
    assert model.fc.weight.abs().max() <= 1 / math.sqrt(512)
    assert model.fc.weight.std().item() > 0.5 / math.sqrt(3 * 512)


@pytest.mark.parametrize("name", MODELS)
def test_second_order_autograd_works(name):
    # the spectra engine differentiates twice; the forward must not break that
    torch.manual_seed(5)
    model = build_model(name, in_channels=1)
    model.eval()
    loss = F.cross_entropy(model(torch.randn(2, 1, 32, 32)), torch.tensor([0, 1]))
    [weight] = next(iter(layer_blocks(model).values()))
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    vector = torch.randn_like(weight)
    (hvp,) = torch.autograd.grad(grad, weight, vector)
    assert hvp.shape == weight.shape and torch.isfinite(hvp).all()


def test_unknown_name_lists_choices():
    with pytest.raises(UserError) as info:
        build_model("AlexNet")
    message = str(info.value)
    assert "AlexNet" in message and "\n" not in message
    assert all(name in message for name in MODELS)
    with pytest.raises(UserError):
        build_model(None)


@pytest.mark.parametrize("kwargs", [
    {"in_channels": 0}, {"in_channels": -3}, {"in_channels": 2.5}, {"in_channels": "3"},
    {"in_channels": True}, {"num_classes": 1}, {"num_classes": 0}, {"num_classes": 10.0},
])
def test_bad_sizes_raise_user_error(kwargs):
    with pytest.raises(UserError) as info:
        build_model("LeNet", **kwargs)
    assert next(iter(kwargs)) in str(info.value)
