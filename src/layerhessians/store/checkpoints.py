"""Checkpoint files: written atomically with a SHA-256 digest of their contents, read back
with torch's safe unpickler (``weights_only``) and the digest checked, so a damaged or foreign
file is refused in one line instead of being loaded.

A training state (a dict with ``"epoch"``) also records the byte length and SHA-256 of the
run's CSVs as committed with it (:data:`COMMITTED_KEY`, filled by the store's writer).
"""

import hashlib
import io
import warnings
from pathlib import Path

import torch

from layerhessians.errors import UserError
from layerhessians.store.atomic import read_regular
from layerhessians.store.manifest import atomic_path
from layerhessians.store.oserrors import os_errors

# the checkpoint keys the store adds: its own digest and the committed CSV prefixes
DIGEST_KEY = "store_digest"
COMMITTED_KEY = "store_committed"
#: the start of the refusal of a file that is not a checkpoint of this tool
NOT_CHECKPOINT = ("is not a readable checkpoint this tool wrote (damaged, or made by another "
                  "program)")


def state_digest(obj) -> str:
    """SHA-256 hex digest of a checkpoint's contents (tensors: dtype, shape and bytes;
    containers in a canonical order; plain values by ``repr``)."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            digest.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            digest.update(b"{")
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(b"[")
            for item in x:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr((type(x).__name__, x)).encode())

    feed(obj)
    return digest.hexdigest()


def save_torch(path, obj):
    """Write ``obj`` (tensors and plain containers) atomically; a dict gets its digest."""
    if isinstance(obj, dict) and not isinstance(obj, torch.nn.Module):
        obj = {k: v for k, v in obj.items() if k != DIGEST_KEY}
        if "epoch" in obj:  # a training state: digest it (plain weights stay loadable)
            obj[DIGEST_KEY] = state_digest(obj)
    with atomic_path(path) as tmp, os_errors("write", path):
        torch.save(obj, tmp)


def load_torch(path):
    """Load a checkpoint written by :func:`save_torch` (tensors and plain containers only).

    Raises:
        UserError: one line when the file cannot be read, cannot be unpickled safely
            (damaged, or foreign content that ``weights_only`` blocks), or its digest does
            not match its contents.
    """
    path = Path(path)
    with os_errors("read", path):
        data = read_regular(path)
    try:
        with warnings.catch_warnings():  # torch's advice on foreign pickles is not for users
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any failure of the safe unpickler on these bytes
        raise UserError(f"{path} {NOT_CHECKPOINT}; move it away and resume from another "
                        "checkpoint, or start over with --overwrite") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        stored = obj[DIGEST_KEY]
        if stored != state_digest({k: v for k, v in obj.items() if k != DIGEST_KEY}):
            raise UserError(f"{path} {NOT_CHECKPOINT}: its contents do not match their "
                            "digest; move it away and resume from another checkpoint, or "
                            "start over with --overwrite")
    return obj


def checkpoint_epoch(state, path) -> int:
    """The epoch (update index) of the training state ``state`` read from ``path``.

    Raises:
        UserError: ``state`` holds no epoch (plain weights, or not a training state).
    """
    try:
        return int(state["epoch"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} {NOT_CHECKPOINT}: it holds no training state (no epoch); "
                        "resume from the run directory (its checkpoints/last.pt)") from None

