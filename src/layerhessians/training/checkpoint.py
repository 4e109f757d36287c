"""The training state a run's checkpoint holds (model, optimizer, schedule, RNG), and the
settings that may change when a run is resumed."""

from collections import Counter

import torch

from layerhessians.errors import UserError
from layerhessians.store.consistency import VOLATILE_KEYS

#: config.json keys that may change when a run is resumed (besides consistency.VOLATILE_KEYS).
#: The scale-out settings are among them: like the world size (consistency.VOLATILE_KEYS), they
#: change numbers only by rounding (micro-batches, budget, backend) or batch-norm statistics
#: across GPUs (--sync-bn), and runs written before they existed lack them.
RESUME_IGNORES = VOLATILE_KEYS | {"command", "device_name", "threads", "dataset_folder",
                                  "hessian_batch_size", "memory_budget", "dist_backend",
                                  "backend", "reuse_graph", "memory_budget_bytes", "sync_bn"}


def checkpoint_state(setup) -> dict:
    """Model, optimizer, scheduler and RNG states of ``setup`` (a
    :class:`~layerhessians.training.setup.Setup`), as tensors and plain containers only, so
    ``torch.load(weights_only=True)`` reads it back."""
    rng = {"torch": torch.get_rng_state()}
    if setup.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(setup.device)
    scheduler = setup.scheduler.state_dict()
    scheduler["milestones"] = {int(k): int(v) for k, v in scheduler["milestones"].items()}
    return {"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
            "scheduler": scheduler, "rng": rng}


def restore_state(setup, state: dict) -> int:
    """Load a checkpoint written by :func:`checkpoint_state` into ``setup``; returns its epoch.

    Raises:
        UserError: the state does not fit ``setup`` (another architecture's weights, another
            optimizer's state: torch's load errors), in one line.
    """
    try:
        return _restore(setup, state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        detail = " ".join(str(err).split())[:160]
        raise UserError(f"the run's checkpoint does not fit its model, optimizer or schedule "
                        f"({type(err).__name__}: {detail}); it was written for another "
                        "network: restore the run's own checkpoints/last.pt, or start over with "
                        "--overwrite") from None


def _restore(setup, state: dict) -> int:
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    scheduler = dict(state["scheduler"])
    scheduler["milestones"] = Counter({int(k): int(v) for k, v in scheduler["milestones"].items()})
    setup.scheduler.load_state_dict(scheduler)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and setup.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), setup.device)
    return int(state["epoch"])
