"""The "did you mean" suggestion for unknown names, in every registry that refuses names."""

import pytest

from layerhessians.cli.main import main
from layerhessians.data import get_spec
from layerhessians.errors import UserError, suggest, unknown_name
from layerhessians.models import build_model
from layerhessians.training.config import HessianConfig, TrainConfig


def test_suggest_close_names_only():
    choices = ["LeNet", "VGG11", "VGG11_bn", "ResNet18"]
    assert suggest("LeNett", choices) == ["LeNet"]
    assert suggest("resnet", choices) == ["ResNet18"]
    assert suggest("xyz", choices) == [] and suggest("", choices) == []


def test_message_lists_choices_and_suggests():
    message = str(unknown_name("model", "LeNett", ["LeNet", "VGG11"]))
    assert message == "unknown model 'LeNett'; choose one of LeNet, VGG11 (did you mean 'LeNet'?)"
    assert "did you mean" not in str(unknown_name("model", "Transformer", ["LeNet", "VGG11"]))


def test_model_name():
    with pytest.raises(UserError, match="did you mean 'LeNet'"):
        build_model("LeNett")


def test_dataset_name():
    with pytest.raises(UserError, match="did you mean 'MNIST5k'"):
        get_spec("mnist5")
    with pytest.raises(UserError, match="did you mean 'CIFAR10' or 'CIFAR100'"):
        get_spec("cifar")


def test_config_choices():
    with pytest.raises(UserError, match="unknown optimizer 'sdg'; choose one of sgd, adam .did you mean 'sgd'"):
        TrainConfig(optimizer="sdg").validated()
    with pytest.raises(UserError, match="did you mean 'ggn'"):
        HessianConfig(kind="gnn").validated()


def test_cli_prints_the_suggestion(capsys):
    assert main(["train", "-m", "LeNett", "-n", "1"]) == 2
    assert "did you mean 'LeNet'" in capsys.readouterr().err


def test_every_choice_check_shares_one_message_with_a_close_match():
    import torch

    from layerhessians.curvature import MatrixOperator
    from layerhessians.errors import UserError, check_choice
    from layerhessians.spectra import slq

    with pytest.raises(UserError, match=r"^layer_method must be one of auto, exact, slq; "
                                        r"got 'exat' \(did you mean 'exact'\?\)$"):
        check_choice("exat", ("auto", "exact", "slq"), "layer_method")
    with pytest.raises(UserError, match="distribution must be one of .*did you mean 'gaussian'"):
        slq(MatrixOperator(torch.eye(3, dtype=torch.float64)), iterations=2,
            distribution="gausian")
