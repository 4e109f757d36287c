"""The run directory's public names in one place.

Kept for code written against the single module the store once was. Each lives in its own
module:

- :mod:`~layerhessians.store.names`: the layout's file names, ``run_path``, ``safe_child``;
- :mod:`~layerhessians.store.oserrors`: ``os_errors`` (OS errors as one line);
- :mod:`~layerhessians.store.manifest`: the files the store wrote, its atomic writers;
- :mod:`~layerhessians.store.journal`: unfinished create/overwrite/rewind operations;
- :mod:`~layerhessians.store.readers`: strict readers of config.json and the CSVs;
- :mod:`~layerhessians.store.checkpoints`: checkpoint I/O with digests;
- :mod:`~layerhessians.store.consistency`: whether a run's files agree;
- :mod:`~layerhessians.store.writer`: :class:`RunStore` and ``resume_source``;
- :mod:`~layerhessians.store.reader`: :class:`Run` and ``load_run``.

Patch a function where it is used (e.g. ``layerhessians.store.writer.save_torch`` for the
store's own checkpoint writes), not here.
"""

from layerhessians.store.checkpoints import (
    COMMITTED_KEY,
    DIGEST_KEY,
    load_torch,
    save_torch,
    state_digest,
)
from layerhessians.store.consistency import (
    SPARSE_SOURCES,
    TRACKER_SOURCE,
    VOLATILE_KEYS,
    check_consistent,
    config_differences,
)
from layerhessians.store.manifest import (
    atomic_path,
    register_output,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)
from layerhessians.store.names import (
    CHECKPOINTS,
    CONFIG,
    FIXED_FILES,
    FOLDERS,
    JOURNAL,
    LAST_CHECKPOINT,
    LEGACY_OWNED,
    LOCK,
    MANIFEST,
    METRICS,
    SPECTRA,
    run_path,
    safe_child,
)
from layerhessians.store.oserrors import os_errors
from layerhessians.store.reader import Run, load_run
from layerhessians.store.readers import (
    METHOD,
    METHODS,
    METRICS_COLUMNS,
    SPECTRA_COLUMNS,
    read_config,
    read_metrics,
    read_spectra,
    read_table,
)
from layerhessians.store.writer import RunStore, resume_source

__all__ = [
    "CHECKPOINTS", "COMMITTED_KEY", "CONFIG", "DIGEST_KEY", "FIXED_FILES", "FOLDERS",
    "JOURNAL", "LAST_CHECKPOINT", "LEGACY_OWNED", "LOCK", "MANIFEST", "METHOD", "METHODS",
    "METRICS", "METRICS_COLUMNS", "SPARSE_SOURCES", "SPECTRA", "SPECTRA_COLUMNS",
    "TRACKER_SOURCE", "VOLATILE_KEYS", "Run", "RunStore", "atomic_path", "check_consistent",
    "config_differences", "load_run", "load_torch", "os_errors", "read_config",
    "read_metrics", "read_spectra", "read_table", "register_output", "resume_source",
    "run_path", "safe_child", "save_torch", "state_digest", "write_bytes", "write_csv",
    "write_json", "write_text",
]
