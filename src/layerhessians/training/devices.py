"""Device resolution: the seed's ``--cuda N`` and our ``--device cpu|cuda|cuda:N|mps|auto``.

- :func:`resolve_device` ``(device=None, cuda=None) -> torch.device``, checked against the
  machine: asking for a GPU that is not there raises :class:`UserError` naming the devices
  that exist.
- :func:`available_devices` ``() -> list[str]``: what this machine offers (``"cpu"`` first).
"""

import re

import torch

from layerhessians.errors import UserError
from layerhessians.vocabulary import DEVICE_CHOICES

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def available_devices() -> list:
    """``["cpu", "cuda:0", ...]`` (plus ``"mps"`` on Apple silicon) on this machine."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def _cuda_device(index: int, flag: str) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index < 0 or index >= count:
        if count == 0:
            where = "this machine has no CUDA devices (use --device cpu)"
        else:
            where = (f"this machine has CUDA devices "
                     f"{', '.join(str(i) for i in range(count))} (use e.g. --device cuda:0)")
        raise UserError(f"no CUDA device {index} (from {flag}): {where}")
    return torch.device("cuda", index)


def resolve_device(device=None, cuda=None) -> torch.device:
    """The ``torch.device`` to run on.

    ``cuda``: the seed's GPU index (``--cuda N``), or ``None``. ``device``: ``"cpu"``,
    ``"cuda"`` (= ``cuda:0``), ``"cuda:N"``, ``"mps"``, ``"auto"`` (``cuda:0`` if there is
    a GPU, else CPU), or ``None``. With neither given: the CPU, as the seed did. Both
    given must agree. Raises :class:`UserError` for a device this machine lacks.
    """
    if cuda is not None:
        if isinstance(cuda, bool) or not isinstance(cuda, int):
            raise UserError(f"--cuda takes a GPU index (0, 1, ...), got {cuda!r}")
        chosen = _cuda_device(cuda, f"--cuda {cuda}")
        if device is not None and device != "auto":
            other = resolve_device(device)
            if other != chosen:
                raise UserError(f"--cuda {cuda} and --device {device} disagree; give only one")
        return chosen
    if device is None:
        return torch.device("cpu")
    name = str(device).strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "mps":
        if "mps" not in available_devices():
            raise UserError("no MPS device on this machine; available: "
                            f"{', '.join(available_devices())} (use --device cpu)")
        return torch.device("mps")
    match = _CUDA.match(name)
    if match:
        return _cuda_device(int(match.group(1) or 0), f"--device {device}")
    raise UserError(f"unknown device {device!r}; use {DEVICE_CHOICES}")


def device_name(device: torch.device) -> str:
    """``"cpu"``, ``"cuda:0 (NVIDIA H100 ...)"``: the device as recorded in a run's config."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
