"""The writer of a run directory (:class:`RunStore`): what a training run or a
SpectraTracker writes, how it resumes, and what ``--resume PATH`` names.

Commit protocol.

- Every file is written atomically: a temporary file ``.NAME.XXXXXXXX.tmp`` in the same
  folder, fsynced, ``os.replace``d over ``NAME``, then the folder fsynced (so a committed
  epoch survives power loss). Temporary files left by a killed write are removed by the
  next writer (under the lock).
- An epoch is committed in the order spectra -> metrics -> checkpoint; the checkpoint's
  epoch is the last completed one. The CSVs only grow by appending whole epochs, and the
  checkpoint records the byte length and SHA-256 of both CSVs as committed with it, plus a
  SHA-256 digest of its own contents. On opening a run the store checks that the CSVs
  begin with exactly the committed bytes (rows of a later, uncommitted epoch are cut off),
  parse fully and cover every epoch up to the checkpoint's (a SpectraTracker's run: strictly
  increasing indices up to it, see :func:`~layerhessians.store.consistency.check_consistent`),
  and that the checkpoint's digest matches; anything else is refused with one line naming
  the file and what to do.
- Creating and overwriting a run are journalled (:mod:`layerhessians.store.journal`):
  ``.layerhessians-op.json`` is written before the first destructive step and removed
  after the last. A writer that finds it finishes the operation deterministically: an
  interrupted overwrite finishes deleting the old run's files, an interrupted creation is
  undone unless its config.json was written (then it is completed), an interrupted rewind
  is redone, but only when the journal is the store's own and fits the run
  (:func:`~layerhessians.store.recovery.check_journal`); anything else is refused naming the journal, with every
  file left in place. Readers refuse such a directory.
- The store only deletes regular files inside the run that its manifest lists (:mod:`layerhessians.store.manifest`,
  written before each new file is created), so ``--overwrite`` never removes a user's own
  files; it refuses to write over a file it did not write (naming it).
- The lock file is opened without following symbolic links; no write follows a link below
  the run directory; every write first checks that the run directory is still the one
  opened (:meth:`RunStore.check_place`).

Damaged files give one :class:`~layerhessians.errors.UserError` line naming the file and the
problem; operating-system errors (permissions, read-only or virtual file systems, a file
where a folder is expected) likewise.
"""

import errno
import fcntl
import hashlib
import os
import re
import stat
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.errors import UserError
from layerhessians.store import journal
from layerhessians.store.atomic import fsync_dir, read_regular, remove_temporaries
from layerhessians.store.checkpoints import (
    COMMITTED_KEY,
    checkpoint_epoch,
    load_torch,
    save_torch,
)
from layerhessians.store.consistency import VOLATILE_KEYS, check_consistent
from layerhessians.store.manifest import (
    delete_owned,
    ensure_manifest,
    foreign_files,
    manifest_digest,
    owned_file,
    read_manifest,
    write_bytes,
    write_json,
    write_manifest,
)
from layerhessians.store.names import (
    CHECKPOINTS,
    CONFIG,
    FIXED_FILES,
    FOLDERS,
    LAST_CHECKPOINT,
    LOCK,
    MANIFEST,
    METRICS,
    SPECTRA,
    run_path,
)
from layerhessians.store.oserrors import os_errors, os_message
from layerhessians.store.place import OpenedFolder, refuse_link
from layerhessians.store.readers import (
    METHOD,
    SPECTRA_COLUMNS,
    check_row,
    problem,
    read_config,
    read_metrics,
    read_spectra,
)
from layerhessians.store.record import RunRecord, differences, read_record
from layerhessians.store.recovery import check_journal
from layerhessians.store.resume import options_error as _options_error

__all__ = ["MAX_EPOCH", "RunStore"]

#: the largest epoch (update index) a record holds: exact in the CSV's int64 and in float64
MAX_EPOCH = 2**53


class RunStore:
    """Writes one run directory; holds an exclusive lock on it while open.

    Use :meth:`create`; close (or use as a context manager) to release the lock.
    """

    def __init__(self, path):
        self.path = run_path(path)
        self.spelling = "cli"  # how refusals name the run options (create's `spelling`)
        self._lock_fd = None
        self._metrics = None
        self._spectra = None
        self._bytes = {}
        self._state_cache = None
        self._folder = None  # the run directory as opened (checked before each write)
        self.notes = []  # what opening repaired (an interrupted operation), for the log

    # -- opening -----------------------------------------------------------------------
    def _refusal(self, fact: str, advice: str) -> UserError:
        return _options_error(fact, advice, self.spelling)

    @classmethod
    def create(cls, path, config, *, resume=False, overwrite=False,
               ignore=VOLATILE_KEYS, checkpoint=None, spelling: str = "cli") -> "RunStore":
        """Open ``path`` for writing the run described by ``config``.

        Args:
            path: the run directory (created if absent).
            config: the run's :class:`~layerhessians.store.record.RunRecord` (written to
                config.json; a ``dict`` is read by :meth:`RunRecord.from_dict`).
            resume: ``True``: continue the run there (same settings required, apart from
                ``ignore`` keys such as ``num_epochs``); refused when there is no run.
                ``"allow"``: continue it if there is one, else start it (grids).
                ``False``: start a new run; refused when one is there.
            overwrite: replace the run there (only the store's own files are deleted).
            ignore: record keys that may change on resume (a key with any part of its
                :meth:`RunRecord.flat` path among them).
            checkpoint: with ``resume``, a checkpoint file of this run to resume from
                (``RUN/checkpoints/*.pt`` holding a full training state); later epochs are
                dropped (see :meth:`rewind`).
            spelling: how refusals name the run options: ``"cli"`` (``--resume``, ``-r``)
                or ``"api"`` (``resume=True``, ``run_dir``, for :class:`SpectraTracker`).

        Returns:
            The open store (locked).

        Raises:
            UserError: busy, conflicting, foreign or damaged directory; no run to resume;
                OS errors (one line each).
        """
        store = cls(path)
        store.spelling = spelling
        record = config if isinstance(config, RunRecord) else RunRecord.from_dict(config)
        with os_errors("create the run directory", store.path):
            if store.path.exists() and not store.path.is_dir():
                raise store._refusal(f"run path {store.path} exists and is not a directory; ",
                                     "choose {run}")
            if resume is True and not store.path.exists():  # refuse before creating anything
                raise store._refusal(f"{store.path} does not exist: it holds no run to resume; ",
                                     "drop {resume} to start a new run there")
            store.path.mkdir(parents=True, exist_ok=True)
        store._lock()
        try:
            store._recover()
            if checkpoint is not None:
                if not resume:
                    raise UserError("a checkpoint to resume from needs --resume")
                store.rewind(checkpoint)
            store._prepare(record, resume=resume, overwrite=overwrite, ignore=ignore)
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self, record: RunRecord, *, resume, overwrite, ignore):
        has_config = (self.path / CONFIG).exists()
        if overwrite:
            self._overwrite()
            has_config = False
        old = read_record(self.path / CONFIG) if has_config else None
        if old is None:
            leftovers = [n for n in (METRICS, SPECTRA, f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
                         if (self.path / n).exists()]
            if leftovers:
                raise self._refusal(f"{self.path} holds {', '.join(leftovers)} but no {CONFIG} "
                                     "(not a complete run); ", "restore its config.json to "
                                     "resume it, or use {overwrite} or {run} to start a new run")
            if resume is True:
                raise self._refusal(f"{self.path} holds no run to resume (no {CONFIG}); ",
                                     "drop {resume} to start a new run there")
            self._create(record)
            return
        if not (self.path / MANIFEST).exists():
            self._adopt_or_refuse()
        manifest = read_manifest(self.path)
        done = self.completed_epoch
        self._verify(old, done)
        diffs = differences(old, record, ignore)
        started = done is not None or self.metrics.shape[0] > 0
        if diffs:
            raise self._refusal(
                f"{self.path} holds a run with different settings ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}); ", "use {overwrite} to replace it, "
                "or {run}")
        if started and not resume:
            raise self._refusal(
                f"{self.path} already holds this run (completed epoch {done}); ",
                "use {resume} to continue it or {overwrite} to start over")
        self._make_folders(manifest)
        write_json(self.path / CONFIG, old.resumed_by(record, ignore).to_dict())

    def _create(self, record: RunRecord):
        """A new run: journalled, so that a kill leaves a state the next open resolves."""
        self._refuse_foreign()
        self._journal({"op": "create"})
        manifest = {"files": [*FIXED_FILES], "dirs": [*FOLDERS]}
        with os_errors("write", self.path / MANIFEST):
            write_manifest(self.path, manifest)
        self._make_folders(manifest)
        write_json(self.path / CONFIG, record.to_dict())
        self._end_journal()
        self._metrics = self._spectra = None
        self._bytes = {METRICS: b"", SPECTRA: b""}

    def _make_folders(self, manifest):
        with os_errors("create folders in", self.path):
            for sub in FOLDERS:
                folder = self.path / sub
                if folder.is_symlink():
                    raise self._refusal(f"{folder} is a symbolic link; the store writes only "
                                         "into its own folders: ", "remove the link or choose "
                                         "{run}")
                if not folder.is_dir():
                    folder.mkdir()
                    fsync_dir(self.path)

    def _refuse_foreign(self):
        """Refuse to write over files at the store's names that it did not write."""
        foreign = foreign_files(self.path)
        if foreign:
            raise self._refusal(f"{self.path} holds {', '.join(foreign)}, which this tool did "
                                 "not write; ", "move them away or choose {run} (the store "
                                 "never replaces or deletes files it did not write)")

    def _ensure_manifest(self) -> dict:
        """The run's manifest (adopting a run of an earlier version, see
        :func:`~layerhessians.store.manifest.ensure_manifest`)."""
        return ensure_manifest(self.path)

    # -- journal and recovery ----------------------------------------------------------
    def _journal(self, entry: dict):
        journal.begin(self.path, entry)

    def _end_journal(self):
        journal.end(self.path)

    def _recover(self):
        """Remove temporary files of killed writes; finish an interrupted operation, but
        only one whose journal is the store's own and fits the run (:meth:`_check_journal`);
        anything else is refused with every file left in place."""
        self._remove_temporaries()
        entry = journal.read(self.path)
        if entry is None:
            return
        op = entry["op"]
        check_journal(self, entry)
        if op == "rewind":
            epoch = entry["epoch"]
            self.notes.append(f"finished an interrupted rewind to epoch {epoch}")
            self._do_rewind(epoch, self.path / CHECKPOINTS / entry["source"])
        elif op == "create" and (self.path / CONFIG).exists():
            self.notes.append("completed an interrupted creation")
            self._make_folders(self._ensure_manifest())
        else:  # an interrupted overwrite, or a creation killed before its config.json
            what = "overwrite" if op != "create" else "creation, removing what it had written"
            self.notes.append(f"finished an interrupted {what}")
            self._delete_owned()
        self._end_journal()

    def _remove_temporaries(self):
        for folder in (self.path, *(self.path / d for d in (*FOLDERS, "ckpt"))):
            if not folder.is_dir() or folder.is_symlink():
                continue
            with os_errors("clean up", folder):
                remove_temporaries(folder)

    def _overwrite(self):
        """Delete the run there (only the store's files), journalled."""
        if (self.path / MANIFEST).exists() or (self.path / CONFIG).exists():
            if not (self.path / MANIFEST).exists():
                self._adopt_or_refuse()
            read_manifest(self.path)  # a damaged one is refused before the journal is begun
            self._journal({"op": "overwrite", "manifest": manifest_digest(self.path)})
            self._delete_owned()
            self._end_journal()
        self._refuse_foreign()

    def _adopt_or_refuse(self):
        """A run without a manifest: adopt it if an earlier version of this tool wrote its
        config.json (it records ``versions.layerhessians``), else refuse."""
        try:
            versions = read_record(self.path / CONFIG).facts.get("versions")
        except UserError:
            versions = None
        if isinstance(versions, dict) and "layerhessians" in versions:
            self._ensure_manifest()
            return
        self._refuse_foreign()

    def _delete_owned(self):
        """Delete the files and (if empty) folders the manifest lists, then the manifest."""
        delete_owned(self.path)
        self._metrics = self._spectra = None
        self._bytes = {}

    # -- lock --------------------------------------------------------------------------
    def _lock(self):
        path = self.path / LOCK
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UserError(f"{path} is a symbolic link; the store never follows links: "
                                "remove it and run again") from None
            raise UserError(os_message(err, "lock", path)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path} is not a regular file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.path} is being written by another process (pid {owner}); "
                            "wait for it to finish or choose another run directory") from None
        pid = str(os.getpid()).encode()
        os.pwrite(fd, pid.ljust(max(len(pid), os.fstat(fd).st_size)), 0)  # no ftruncate: the
        self._lock_fd = fd  # holder's PID is overwritten in place (padded with spaces)
        self._folder = OpenedFolder(self.path)

    def check_place(self):
        """Refuse to go on writing when ``self.path`` is no longer the directory this store
        opened (:meth:`OpenedFolder.check`): a write would build a partial run at the old
        path."""
        if self._folder is not None:
            self._folder.check()

    def close(self):
        """Release the run's lock (the store can be opened again)."""
        if self._folder is not None:
            self._folder.close()
            self._folder = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- state -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The run's ``config.json`` as stored (a JSON object), read strictly."""
        return read_config(self.path / CONFIG)

    @property
    def record(self) -> RunRecord:
        """The run's record (``config.json`` read by :func:`~layerhessians.store.record.read_record`)."""
        return read_record(self.path / CONFIG)

    @property
    def checkpoint_path(self) -> Path:
        """``RUN/checkpoints/last.pt``, the commit point."""
        return self.path / CHECKPOINTS / LAST_CHECKPOINT

    @property
    def log_path(self) -> Path:
        """``RUN/logs/train.log`` (appended to: refused when it, or ``logs/``, is a symbolic
        link or not a regular file, so that no write follows a link out of the run)."""
        self.check_place()
        path = self.path / "logs" / "train.log"
        refuse_link(path.parent, path)
        return path

    @property
    def images(self) -> Path:
        """``RUN/images``, the figures folder (refused when it is a symbolic link)."""
        self.check_place()
        refuse_link(self.path / "images")
        return self.path / "images"

    @property
    def metrics(self) -> pd.DataFrame:
        """``metrics.csv`` as committed, read strictly (cached)."""
        if self._metrics is None:
            self._metrics = read_metrics(self.path / METRICS)
        return self._metrics

    @property
    def spectra(self) -> pd.DataFrame:
        """``spectra.csv`` as committed, read strictly (cached)."""
        if self._spectra is None:
            self._spectra = read_spectra(self.path / SPECTRA)
        return self._spectra

    def load_checkpoint(self, path=None):
        """The latest committed training state (a dict with ``"epoch"``), or ``None``;
        ``path``: another checkpoint file instead of ``checkpoints/last.pt``."""
        path = self.checkpoint_path if path is None else Path(path)
        with os_errors("read", path):
            if not path.exists():
                return None
            info = path.stat()
        key = (str(path), info.st_mtime_ns, info.st_size, info.st_ino)
        if self._state_cache is None or self._state_cache[0] != key:  # read (and digest) once
            self._state_cache = (key, load_torch(path))
        return self._state_cache[1]

    @property
    def completed_epoch(self):
        """The last committed epoch (0 = initialisation), or ``None`` before any."""
        state = self.load_checkpoint()
        return None if state is None else checkpoint_epoch(state, self.checkpoint_path)

    # -- verification ------------------------------------------------------------------
    def _verify(self, record: RunRecord, epoch):
        """Cut the CSVs back to what the checkpoint committed and check that every file
        agrees (see :func:`check_consistent`); refuses what does not."""
        state = self.load_checkpoint() if epoch is not None else None
        committed = state.get(COMMITTED_KEY) if isinstance(state, dict) else None
        for name in (METRICS, SPECTRA):
            path = self.path / name
            with os_errors("read", path):
                raw = read_regular(path) if path.exists() else b""
            if committed and name in committed:
                size, digest = int(committed[name]["bytes"]), committed[name]["sha256"]
                if len(raw) < size or hashlib.sha256(raw[:size]).hexdigest() != digest:
                    raise problem(path, f"does not hold what was committed with epoch {epoch} "
                                         "(changed or damaged since)")
                if len(raw) > size:  # rows of an epoch after the checkpoint's
                    raw = raw[:size]
                    write_bytes(path, raw)
            self._bytes[name] = raw
        self._metrics = self._spectra = None
        self.truncate_after(epoch)
        check_consistent(self.path, record, self.metrics, self.spectra, epoch)

    # -- rewinding ---------------------------------------------------------------------
    def rewind(self, checkpoint, *, state_keys=("model", "optimizer")):
        """Make the run continue from ``checkpoint`` (a file in ``RUN/checkpoints/``
        holding a full training state written by this store): rows of later epochs are
        dropped, later ``epoch_EEEE.pt`` removed, and it becomes ``last.pt``; journalled.

        Args:
            checkpoint: the checkpoint file to continue from.
            state_keys: the keys besides ``"epoch"`` that a full state of this run holds
                (the trainer's: model and optimizer; a ``SpectraTracker``'s: its unit).

        Raises:
            UserError: the file is not in this run's checkpoints folder, is not a
                readable checkpoint, holds only weights, or is newer than ``last.pt``.
        """
        self.check_place()
        source = Path(checkpoint)
        if not str(checkpoint).strip():
            raise UserError('the checkpoint path is empty; pass RUN/checkpoints/FILE.pt')
        folder = (self.path / CHECKPOINTS).resolve()
        if source.resolve().parent != folder or source.is_symlink():
            raise UserError(f"{source} is not a checkpoint of the run {self.path} (expected a "
                            f"file in {self.path / CHECKPOINTS})")
        if source.resolve() == self.checkpoint_path.resolve():
            return
        state = self.load_checkpoint(source)
        if not (isinstance(state, dict) and {"epoch", *state_keys} <= set(state)):
            raise UserError(f"{source} holds only model weights (no optimizer, schedule or "
                            "random state), so training cannot continue exactly from it; "
                            f"resume from the run's last checkpoint (--resume {self.path}), or "
                            "start a new run")
        epoch = checkpoint_epoch(state, source)
        last = self.completed_epoch
        if last is not None and epoch > last:
            raise UserError(f"{source} is of epoch {epoch}, after the run's last checkpoint "
                            f"(epoch {last}); resume with --resume {self.path}")
        self._journal({"op": "rewind", "epoch": epoch, "source": source.name})
        self._do_rewind(epoch, source)
        self._end_journal()
        self.notes.append(f"rewound to epoch {epoch} ({source.name})")

    def _do_rewind(self, epoch: int, source: Path):
        """The idempotent steps of :meth:`rewind`."""
        state = load_torch(source)
        self._bytes = {}
        self._metrics = self._spectra = None
        self.truncate_after(epoch)
        owned = set(read_manifest(self.path)["files"]) if (self.path / MANIFEST).exists() \
            else set()
        for path in (self.path / CHECKPOINTS).glob("epoch_*.pt"):
            match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
            rel = f"{CHECKPOINTS}/{path.name}"
            if match and int(match.group(1)) > epoch and rel in owned and \
                    owned_file(self.path, rel):
                with os_errors("delete", path):
                    path.unlink()
        state.pop(COMMITTED_KEY, None)
        state[COMMITTED_KEY] = self._committed()
        save_torch(self.checkpoint_path, state)

    # -- writing -----------------------------------------------------------------------
    def _raw(self, name) -> bytes:
        if name not in self._bytes:
            path = self.path / name
            with os_errors("read", path):
                self._bytes[name] = read_regular(path) if path.exists() else b""
        return self._bytes[name]

    def _write_table(self, name, frame: pd.DataFrame):
        data = frame.to_csv(index=False).encode("utf-8") if len(frame.columns) else b""
        write_bytes(self.path / name, data)
        self._bytes[name] = data
        setattr(self, "_" + name.split(".")[0], None)

    def truncate_after(self, epoch):
        """Drop metrics and spectra rows after ``epoch`` (all rows if ``None``)."""
        limit = -1 if epoch is None else epoch
        for name, frame in ((METRICS, self.metrics), (SPECTRA, self.spectra)):
            if len(frame) and (frame["epoch"] > limit).any():
                kept = frame[frame["epoch"] <= limit].reset_index(drop=True)
                self._write_table(name, kept)

    def _append(self, name, frame: pd.DataFrame, new: pd.DataFrame, epoch: int):
        """Add the rows ``new`` of ``epoch`` to the CSV ``name`` (whose rows are ``frame``):
        appended as text when they come after every row (so the committed bytes stay a
        prefix), else the table is rewritten with the epoch's rows replaced."""
        raw = self._raw(name)
        header = raw.split(b"\n", 1)[0].decode("utf-8").split(",") if raw else None
        later = len(frame) and (frame["epoch"] >= epoch).any()
        if raw and not later and set(new.columns) <= set(header):
            data = raw + new.reindex(columns=header).to_csv(index=False, header=False) \
                .encode("utf-8")
            write_bytes(self.path / name, data)
            self._bytes[name] = data
            setattr(self, "_" + name.split(".")[0], None)
            return
        if not raw:
            self._write_table(name, new.reset_index(drop=True))
            return
        old = frame[frame["epoch"] != epoch]
        self._write_table(name, pd.concat([old, new], ignore_index=True) if len(old) else
                          new.reset_index(drop=True))

    def _committed(self) -> dict:
        return {name: {"bytes": len(self._raw(name)),
                       "sha256": hashlib.sha256(self._raw(name)).hexdigest()}
                for name in (METRICS, SPECTRA)}

    def commit_epoch(self, epoch: int, metrics_row: dict, spectra=None, checkpoint=None):
        """Write one completed epoch: its spectra, its metrics row, then its checkpoint.

        ``spectra``: mapping ``block -> measure`` (anything with ``to_frame()`` giving
        columns vector, node, weight; its ``method``, default ``"slq"``, fills the
        :data:`METHOD` column) or ``None``. ``checkpoint``: a dict of tensors and
        plain containers (saved with ``"epoch"``, the committed CSV lengths and digests,
        and its own digest added) or ``None``.

        Raises:
            UserError: the run directory was moved or deleted (:meth:`check_place`); a
                metric name or value the CSV cannot hold (:func:`check_row`); nothing of
                the epoch is written then.
        """
        self.check_place()
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or \
                not 0 <= epoch <= MAX_EPOCH:
            raise UserError(f"epoch (update index) {str(epoch)[:40]} cannot be recorded in "
                            f"{METRICS}: use an integer from 0 to {MAX_EPOCH}")
        epoch = int(epoch)
        metrics_row = check_row(metrics_row, METRICS)
        if spectra:
            frames = [m.to_frame().assign(epoch=epoch, block=block,
                                          method=getattr(m, "method", None) or "slq")
                      for block, m in spectra.items()]
            new = pd.concat(frames, ignore_index=True)[[*SPECTRA_COLUMNS, METHOD]]
            self._append(SPECTRA, self.spectra, new, epoch)
        row = pd.DataFrame([{"epoch": epoch, **metrics_row}])
        self._append(METRICS, self.metrics, row, epoch)
        if checkpoint is not None:
            save_torch(self.checkpoint_path, {**checkpoint, "epoch": epoch,
                                              COMMITTED_KEY: self._committed()})

    def save_weights(self, epoch: int, state_dict: dict):
        """Keep the model weights of ``epoch`` (``checkpoints/epoch_EEEE.pt``)."""
        self.check_place()
        save_torch(self.path / CHECKPOINTS / f"epoch_{epoch:04d}.pt", state_dict)
