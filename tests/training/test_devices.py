"""Device resolution: --cuda N / --device, with clear errors for devices that do not exist."""

import pytest
import torch

from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.training.devices import available_devices, resolve_device


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_default_and_auto_without_gpu(no_gpu):
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert available_devices()[0] == "cpu"


def test_missing_cuda_device_says_there_is_none(no_gpu):
    with pytest.raises(UserError) as err:
        resolve_device(cuda=2)
    assert "no CUDA device 2" in str(err.value)
    assert "this machine has no CUDA devices (use --device cpu)" in str(err.value)
    with pytest.raises(UserError, match="no CUDA device 0"):
        resolve_device("cuda")


def test_gpus_listed_and_selected(two_gpus):
    assert resolve_device(cuda=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", cuda=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"no CUDA device 2 .*CUDA devices 0, 1"):
        resolve_device(cuda=2)
    with pytest.raises(UserError, match="disagree"):
        resolve_device("cpu", cuda=1)


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "gpu0", "cuda:-1"])
def test_unknown_device_names(no_gpu, bad):
    with pytest.raises(UserError, match="unknown device"):
        resolve_device(bad)


def test_cli_cuda_flag_fails_fast_with_one_line(no_gpu, tmp_path, capsys):
    run = tmp_path / "r"
    rc = main(["train", "-o", "sgd", "-d", "Digits", "-m", "LeNet", "--cuda", "2", "-r", str(run),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.splitlines() == [
        "layerhessians train: error: no CUDA device 2 (from --cuda 2): this machine has no CUDA "
        "devices (use --device cpu)"]
    assert not run.exists()  # refused before any data were loaded or files written
