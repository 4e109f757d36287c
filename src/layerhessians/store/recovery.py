"""Whether an unfinished operation's journal fits the run it is in, before the store's
writer acts on it (:meth:`~layerhessians.store.writer.RunStore` recovery): the journal's own
content is checked by :func:`layerhessians.store.journal.read`; here, its operation against
the run's files."""

import os
import re

from layerhessians.errors import UserError
from layerhessians.store import journal
from layerhessians.store.checkpoints import checkpoint_epoch, load_torch
from layerhessians.store.manifest import manifest_digest, owned_file, read_manifest
from layerhessians.store.names import (
    CHECKPOINTS,
    CONFIG,
    FIXED_FILES,
    FOLDERS,
    LAST_CHECKPOINT,
    MANIFEST,
    METRICS,
    SPECTRA,
)

__all__ = ["check_journal"]


def check_journal(store, entry: dict):
    """Refuse a journal whose operation does not fit the run: an overwrite of another
    manifest than the one there; a creation (before its config.json) of a run that
    holds data files or a manifest it did not write; a rewind to a file that is not a
    regular checkpoint file of this run, holds another epoch than the journal's, or an
    epoch that the run's record or last checkpoint lacks."""
    op = entry["op"]
    if op == "overwrite":
        digest = manifest_digest(store.path)
        if digest and digest != entry["manifest"]:
            raise journal.refusal(store.path, f"an overwrite of another {MANIFEST}")
    elif op == "create" and not (store.path / CONFIG).exists():
        data = [n for n in (METRICS, SPECTRA, f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
                if os.path.lexists(store.path / n)]
        if data:
            raise journal.refusal(store.path, f"a creation, but {data[0]} is there")
        if (store.path / MANIFEST).exists() and read_manifest(store.path) != \
                {"files": [*FIXED_FILES], "dirs": [*FOLDERS]}:
            raise journal.refusal(store.path, f"a creation, but {MANIFEST} lists more")
    elif op == "rewind":
        name, epoch = entry["source"], entry["epoch"]
        source = store.path / CHECKPOINTS / name
        if not re.fullmatch(r"[\w.-]+\.pt", name) or name.startswith(".") or \
                not owned_file(store.path, f"{CHECKPOINTS}/{name}"):
            raise journal.refusal(store.path, f"its checkpoint {name[:60]!r} is not a "
                                  f"file of {store.path / CHECKPOINTS}")
        try:
            held = checkpoint_epoch(load_torch(source), source)
        except UserError:
            raise journal.refusal(store.path, f"its checkpoint {name} is not a training "
                                  "state this tool wrote") from None
        last = store.completed_epoch
        if held != epoch or last is None or epoch > last:
            raise journal.refusal(store.path, f"a rewind to epoch {epoch}, but {name} holds "
                                  f"epoch {held} and last.pt epoch {last}")
        epochs = set(int(e) for e in store.metrics["epoch"])
        if epoch not in epochs:
            raise journal.refusal(store.path, f"a rewind to epoch {epoch}, which "
                                  f"{METRICS} does not hold")
