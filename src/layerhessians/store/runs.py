"""The run directory: what a training run writes, how it resumes, and how it is read back.

Layout (see docs/architecture.md)::

    RUN/config.json          every setting, versions, device, dataset checksum, start time
    RUN/metrics.csv          one row per epoch
    RUN/spectra.csv          long table: epoch, block, vector, node, weight[, method]
    RUN/slq_fidelity.csv     with --validate-layer-spectra (written by the trainer)
    RUN/checkpoints/last.pt  latest full training state (the commit point of an epoch)
    RUN/checkpoints/epoch_EEEE.pt   weights every --save_freq epochs
    RUN/logs/train.log       what was printed
    RUN/images/              figures
    RUN/.lock                the writer's lock (holds its PID)
    RUN/.layerhessians-files.json   the files and folders the store wrote (its manifest)
    RUN/.layerhessians-op.json      an unfinished create/overwrite/rewind (its journal)

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
  parse fully and cover every epoch up to the checkpoint's, and that the checkpoint's digest
  matches; anything else is refused with one line naming the file and what to do.
- Creating and overwriting a run are journalled: ``.layerhessians-op.json`` is written
  before the first destructive step and removed after the last. A writer that finds it
  finishes the operation deterministically: an interrupted overwrite finishes deleting the
  old run's files, an interrupted creation is undone unless its config.json was written
  (then it is completed), an interrupted rewind is redone. Readers refuse such a directory.
- The store only deletes files listed in its manifest (written before each new file is
  created), so ``--overwrite`` never removes a user's own files; it refuses to write over a
  file it did not write (naming it).
- The lock file is opened without following symbolic links.

Reading (:func:`load_run`, :class:`RunStore`): damaged files give one :class:`UserError`
line naming the file and the problem; operating-system errors (permissions, read-only or
virtual file systems, a file where a folder is expected) likewise.
"""

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from layerhessians.errors import UserError
from layerhessians.store import atomic
from layerhessians.store.atomic import fsync_dir
from layerhessians.vocabulary import FULL

CONFIG = "config.json"
METRICS = "metrics.csv"
SPECTRA = "spectra.csv"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
LOCK = ".lock"
MANIFEST = ".layerhessians-files.json"
JOURNAL = ".layerhessians-op.json"
SPECTRA_COLUMNS = ["epoch", "block", "vector", "node", "weight"]
#: optional spectra.csv column: how a block's measure was computed ("slq" or "exact"); runs
#: written before it have none (their spectra are SLQ)
METHOD = "method"
METHODS = ("slq", "exact")
METRICS_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                   "train_seconds", "spectra_seconds"]
# settings that may differ between a run and its resumption
VOLATILE_KEYS = frozenset({
    "num_epochs", "device", "resume", "overwrite", "run", "start_time", "versions",
    "progress", "save_freq", "export_legacy", "dataset_root", "download", "workers",
    "host", "resumed_at", "world_size", "micro_batch_size",
})
# the store's folders, and the files it writes at fixed names (registered on creation)
FOLDERS = (CHECKPOINTS, "logs", "images")
FIXED_FILES = (CONFIG, METRICS, SPECTRA, f"{CHECKPOINTS}/{LAST_CHECKPOINT}", "logs/train.log",
               "images/loss.png", "images/acc.png")
# names an earlier version of the store owned (adopted when a run has no manifest)
LEGACY_OWNED = (CONFIG, METRICS, SPECTRA, CHECKPOINTS, "logs", "images", "ckpt")
# the checkpoint keys the store adds: its own digest and the committed CSV prefixes
DIGEST_KEY = "store_digest"
COMMITTED_KEY = "store_committed"
# a temporary file of store.atomic.atomic_path: .NAME.XXXXXXXX.tmp (8 hex digits)
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_NOT_CHECKPOINT = ("is not a readable checkpoint this tool wrote (damaged, or made by another "
                   "program)")


# ----------------------------------------------------------------------------- names
def run_path(value) -> Path:
    """``value`` (a ``-r`` argument) as a ``Path``; refuses an empty name.

    Raises:
        UserError: ``value`` is empty or blank (``-r ""`` would mean the working directory).
    """
    if value is None or not str(value).strip():
        raise UserError('the run directory is empty (-r ""); name a directory, e.g. -r runs/lenet')
    return Path(value)


def safe_child(root, name) -> Path:
    """``root / name`` for a run name from a grid file, refusing names that leave ``root``.

    Args:
        root: the folder the runs belong under.
        name: one path component: not empty, not absolute, no ``/`` or ``\\``, no ``..``,
            no NUL character.

    Returns:
        ``Path(root) / name``.

    Raises:
        UserError: the name could place the run outside ``root``.
    """
    text = name if isinstance(name, str) else None
    bad = (text is None or not text.strip() or text in (".",) or ".." in text or "/" in text
           or "\\" in text or "\0" in text or os.path.isabs(text)
           or (os.altsep is not None and os.altsep in text))
    if bad:
        raise UserError(f"run name {name!r} is not a plain folder name (no '/', '\\', '..', "
                        f"absolute paths or empty names); runs are placed under {root}")
    return Path(root) / text


# ----------------------------------------------------------------------------- OS errors
def _os_message(err: OSError, doing: str, path) -> str:
    reason = err.strerror or type(err).__name__
    if isinstance(err, PermissionError) or err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "check its permissions, or choose another location"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        hint = "a file stands where a folder is expected (or the reverse); choose another path"
    elif err.errno == errno.ENOSPC:
        hint = "free some disk space"
    else:
        hint = "choose another location"
    return f"cannot {doing} {path}: {reason}; {hint}"


@contextmanager
def os_errors(doing: str, path):
    """Turn an ``OSError`` raised inside into one :class:`UserError` line
    (``cannot DOING PATH: reason; what to do``)."""
    try:
        yield
    except UserError:
        raise
    except OSError as err:
        raise UserError(_os_message(err, doing, path)) from None


# ----------------------------------------------------------------------------- atomic I/O
@contextmanager
def atomic_path(path):
    """The run directory's writer: :func:`layerhessians.store.atomic.atomic_path` for a file
    first added to the run's manifest (so ``--overwrite`` may delete it later), with OS errors
    as one-line :class:`UserError` s."""
    path = Path(path)
    with os_errors("write", path):
        register_output(path)
        with atomic.atomic_path(path) as tmp:
            yield tmp


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path, frame: pd.DataFrame):
    write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


# ----------------------------------------------------------------------------- manifest
def _manifest_root(path: Path):
    """The run directory holding ``path`` (its parent or grandparent with a manifest)."""
    for parent in (path.parent, path.parent.parent):
        if (parent / MANIFEST).is_file():
            return parent
    return None


def _read_manifest(root: Path) -> dict:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        files, dirs = data["files"], data["dirs"]
        if not all(isinstance(x, str) for x in [*files, *dirs]):
            raise TypeError("non-string entry")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{root / MANIFEST} (the list of files this tool wrote) is damaged "
                        f"({type(err).__name__}); delete the run directory's contents by hand, "
                        "or choose another -r") from None
    return {"files": list(files), "dirs": list(dirs)}


def _write_manifest(root: Path, manifest: dict):
    with atomic.atomic_path(root / MANIFEST) as tmp:  # not atomic_path: it registers
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def register_output(path, root=None):
    """Record ``path`` (and its folders not yet created) in the manifest of the run
    directory that holds it (no-op outside a run). Call it before creating a file in a run
    directory by other means than the store's writers (figures, logs), so that
    ``--overwrite`` may delete it later."""
    path = Path(path)
    root = Path(root) if root is not None else _manifest_root(path)
    if root is None:
        return
    try:
        rel = path.relative_to(root)
    except ValueError:
        return
    manifest = _read_manifest(root)
    folders = [p.as_posix() for p in rel.parents if p != Path(".") and not (root / p).exists()]
    new_dirs = [d for d in folders if d not in manifest["dirs"]]
    if rel.as_posix() not in manifest["files"] or new_dirs:
        manifest["files"] = [*dict.fromkeys([*manifest["files"], rel.as_posix()])]
        manifest["dirs"] += new_dirs
        _write_manifest(root, manifest)


def _no_links_below(root: Path, rel: str) -> bool:
    """True when no component of ``root/rel`` below ``root`` is a symbolic link."""
    current = root
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            return False
    return True


# ----------------------------------------------------------------------------- checkpoints
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
        with open(path, "rb") as fh:
            data = fh.read()
    try:
        with warnings.catch_warnings():  # torch's advice on foreign pickles is not for users
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any failure of the safe unpickler on these bytes
        raise UserError(f"{path} {_NOT_CHECKPOINT}; move it away and resume from another "
                        "checkpoint, or start over with --overwrite") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        stored = obj[DIGEST_KEY]
        if stored != state_digest({k: v for k, v in obj.items() if k != DIGEST_KEY}):
            raise UserError(f"{path} {_NOT_CHECKPOINT}: its contents do not match their "
                            "digest; move it away and resume from another checkpoint, or "
                            "start over with --overwrite")
    return obj


def _checkpoint_epoch(state, path) -> int:
    try:
        return int(state["epoch"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{path} {_NOT_CHECKPOINT}: it holds no training state (no epoch); "
                        "resume from the run directory (its checkpoints/last.pt)") from None


# ----------------------------------------------------------------------------- CSV reading
def _problem(path, what: str) -> UserError:
    return UserError(f"{path} {what}; restore it from a backup, or start the run over with "
                     "--overwrite")


def read_table(path, columns, *, text_columns=("block",), nullable=(),
               empty_columns=None) -> pd.DataFrame:
    """Read one of the run's CSVs strictly.

    Args:
        path: the CSV file; a missing or empty file gives an empty frame with
            ``empty_columns`` (default ``columns``).
        columns: required columns; all but ``text_columns`` must be numbers, and all but
            ``nullable`` non-empty on every row (``epoch``/``vector`` integers).
        text_columns: columns read as strings.
        nullable: required columns that may be empty.

    Returns:
        The table, with integer ``epoch`` (and ``vector``) columns.

    Raises:
        UserError: one line naming the file and the problem (not UTF-8, cut mid-row,
            malformed, a missing column, a non-number, an incomplete row).
    """
    path = Path(path)
    with os_errors("read", path):
        raw = path.read_bytes() if path.exists() else b""
    if not raw:
        return pd.DataFrame(columns=list(empty_columns or columns))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _problem(path, f"is not UTF-8 text (byte {err.start} is damaged)") from None
    if not text.endswith("\n"):
        raise _problem(path, "ends in the middle of a row (the file was cut off)")
    try:
        with warnings.catch_warnings():  # rows longer than the header: an error, not a warning
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), dtype={c: str for c in text_columns},
                                keep_default_na=False, na_values=[""], index_col=False)
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning) as err:
        detail = " ".join(str(err).split())[:120]
        raise _problem(path, f"is not a well-formed CSV table ({detail})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise _problem(path, f"misses the column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for column in frame.columns:
        if column in text_columns:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise _problem(path, f"holds a non-number {str(frame[column].iloc[row])[:40]!r} in "
                                 f"column {column} (data row {row + 1})")
        frame[column] = values
    for column in columns:
        if column in nullable:
            continue
        empty = frame[column].isna()
        if empty.any():
            row = int(empty.to_numpy().nonzero()[0][0])
            raise _problem(path, f"has an incomplete row (data row {row + 1}: no {column})")
    for column in ("epoch", "vector"):
        if column in frame.columns and len(frame):
            as_int = frame[column].astype("int64")
            if not (as_int == frame[column]).all():
                raise _problem(path, f"holds a non-integer {column}")
            frame[column] = as_int
    return frame


def read_metrics(path) -> pd.DataFrame:
    """``metrics.csv`` read strictly (:func:`read_table`): an ``epoch`` column of integers,
    every other column numbers (possibly empty: an epoch without spectra has no
    ``top_eigenvalue``)."""
    return read_table(path, ["epoch"], text_columns=(), nullable=METRICS_COLUMNS[1:],
                      empty_columns=METRICS_COLUMNS)


def read_spectra(path) -> pd.DataFrame:
    """``spectra.csv`` read strictly (:func:`read_table`): :data:`SPECTRA_COLUMNS`, all
    filled, ``block`` a name, the others numbers; the optional :data:`METHOD` column is
    text (empty in rows of older runs)."""
    frame = read_table(path, SPECTRA_COLUMNS, text_columns=("block", METHOD))
    if METHOD in frame.columns:
        bad = frame[METHOD].notna() & ~frame[METHOD].isin(METHODS)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise _problem(Path(path), f"holds an unknown method "
                                       f"{str(frame[METHOD].iloc[row])[:40]!r} (data row "
                                       f"{row + 1}; expected {' or '.join(METHODS)})")
    return frame


def read_config(path) -> dict:
    """``config.json`` as a dict; one :class:`UserError` line if it is not a JSON object."""
    path = Path(path)
    with os_errors("read", path):
        raw = path.read_bytes()
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _problem(path, "is not UTF-8 text (damaged)") from None
    except ValueError as err:
        raise _problem(path, f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise _problem(path, f"holds a JSON {type(config).__name__}, not the object of settings")
    blocks = config.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise _problem(path, "has a 'blocks' entry that is not a list of names")
    return config


def config_differences(old: dict, new: dict, ignore=VOLATILE_KEYS) -> list:
    """``["key: old -> new", ...]`` for the settings that differ (``ignore`` keys skipped)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in ignore]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


def check_consistent(path, config: dict, metrics, spectra, epoch):
    """Refuse a run whose files disagree: metrics.csv must hold each epoch exactly once,
    consecutively from 0 or 1 up to the checkpoint's ``epoch`` (none when ``epoch`` is
    ``None``); spectra.csv only measured epochs among those, each with every block.

    Raises:
        UserError: naming the file and the disagreement.
    """
    path = Path(path)
    epochs = [int(e) for e in metrics["epoch"]]
    if epoch is None:
        if epochs:
            raise _problem(path / METRICS, f"holds epochs {epochs[0]}..{epochs[-1]} but the "
                                           "run has no checkpoint (checkpoints/last.pt)")
    else:
        first = epochs[0] if epochs else None
        if first not in (0, 1) or epochs != list(range(first, epoch + 1)):
            shown = f"{epochs[0]}..{epochs[-1]} ({len(epochs)} rows)" if epochs else "none"
            raise _problem(path / METRICS, f"does not hold each epoch up to the checkpoint's "
                                           f"epoch {epoch} once (holds {shown})")
    if not len(spectra):
        return
    measured = sorted(set(int(e) for e in spectra["epoch"]))
    stray = [e for e in measured if e not in set(epochs)]
    if stray:
        raise _problem(path / SPECTRA, f"holds epoch {stray[0]}, which metrics.csv lacks")
    expected = [b for b in config.get("blocks", [])] or None
    pairs = spectra.groupby("epoch")["block"].agg(lambda s: set(s))
    for e in measured:
        have = pairs.loc[e]
        want = set(expected) if expected else set(spectra["block"])
        if have != want:
            lacking = sorted(want - have) or sorted(have - want)
            raise _problem(path / SPECTRA, f"does not hold exactly the run's blocks at epoch "
                                           f"{e} (differs in {', '.join(lacking[:3])})")


# ----------------------------------------------------------------------------- writer
class RunStore:
    """Writes one run directory; holds an exclusive lock on it while open.

    Use :meth:`create`; close (or use as a context manager) to release the lock.
    """

    def __init__(self, path):
        self.path = run_path(path)
        self._lock_fd = None
        self._metrics = None
        self._spectra = None
        self._bytes = {}
        self._state_cache = None
        self.notes = []  # what opening repaired (an interrupted operation), for the log

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: dict, *, resume=False, overwrite=False,
               ignore=VOLATILE_KEYS, checkpoint=None) -> "RunStore":
        """Open ``path`` for writing the run described by ``config``.

        Args:
            path: the run directory (created if absent).
            config: the run's settings (written to config.json).
            resume: ``True``: continue the run there (same settings required, apart from
                ``ignore`` keys such as ``num_epochs``); refused when there is no run.
                ``"allow"``: continue it if there is one, else start it (grids).
                ``False``: start a new run; refused when one is there.
            overwrite: replace the run there (only the store's own files are deleted).
            ignore: config keys that may change on resume.
            checkpoint: with ``resume``, a checkpoint file of this run to resume from
                (``RUN/checkpoints/*.pt`` holding a full training state); later epochs are
                dropped (see :meth:`rewind`).

        Returns:
            The open store (locked).

        Raises:
            UserError: busy, conflicting, foreign or damaged directory; no run to resume;
                OS errors (one line each).
        """
        store = cls(path)
        with os_errors("create the run directory", store.path):
            if store.path.exists() and not store.path.is_dir():
                raise UserError(f"run path {store.path} exists and is not a directory; "
                                "choose another -r")
            store.path.mkdir(parents=True, exist_ok=True)
        store._lock()
        try:
            store._recover()
            if checkpoint is not None:
                if not resume:
                    raise UserError("a checkpoint to resume from needs --resume")
                store.rewind(checkpoint)
            store._prepare(config, resume=resume, overwrite=overwrite, ignore=ignore)
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self, config, *, resume, overwrite, ignore):
        has_config = (self.path / CONFIG).exists()
        if overwrite:
            self._overwrite()
            has_config = False
        old = read_config(self.path / CONFIG) if has_config else None
        if old is None:
            leftovers = [n for n in (METRICS, SPECTRA, f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
                         if (self.path / n).exists()]
            if leftovers:
                raise UserError(f"{self.path} holds {', '.join(leftovers)} but no {CONFIG} "
                                "(not a complete run); restore its config.json to resume it, "
                                "or use --overwrite or another -r to start a new run")
            if resume is True:
                raise UserError(f"{self.path} holds no run to resume (no {CONFIG}); drop "
                                "--resume to start a new run there")
            self._create(config)
            return
        if not (self.path / MANIFEST).exists():
            self._adopt_or_refuse()
        manifest = _read_manifest(self.path)
        done = self.completed_epoch
        self._verify(old, done)
        diffs = config_differences(old, config, ignore)
        started = done is not None or self.metrics.shape[0] > 0
        if diffs:
            raise UserError(
                f"{self.path} holds a run with different settings ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}); use --overwrite to replace it, "
                "or another run directory")
        if started and not resume:
            raise UserError(
                f"{self.path} already holds this run (completed epoch {done}); use "
                "--resume to continue it or --overwrite to start over")
        merged = {**old, **{k: v for k, v in config.items() if k in ignore}}
        merged["start_time"] = old.get("start_time")
        merged["resumed_at"] = [*old.get("resumed_at", []), config.get("start_time")]
        self._make_folders(manifest)
        write_json(self.path / CONFIG, merged)

    def _create(self, config):
        """A new run: journalled, so that a kill leaves a state the next open resolves."""
        self._refuse_foreign()
        self._journal({"op": "create"})
        manifest = {"files": [*FIXED_FILES], "dirs": [*FOLDERS]}
        with os_errors("write", self.path / MANIFEST):
            _write_manifest(self.path, manifest)
        self._make_folders(manifest)
        write_json(self.path / CONFIG, config)
        self._end_journal()
        self._metrics = self._spectra = None
        self._bytes = {METRICS: b"", SPECTRA: b""}

    def _make_folders(self, manifest):
        with os_errors("create folders in", self.path):
            for sub in FOLDERS:
                folder = self.path / sub
                if folder.is_symlink():
                    raise UserError(f"{folder} is a symbolic link; the store writes only into "
                                    "its own folders: remove the link or choose another -r")
                if not folder.is_dir():
                    folder.mkdir()
                    fsync_dir(self.path)

    def _refuse_foreign(self):
        """Refuse to write over files at the store's names that it did not write."""
        owned = set(_read_manifest(self.path)["files"]) if (self.path / MANIFEST).exists() \
            else set()
        foreign = [n for n in FIXED_FILES if n not in owned and
                   (os.path.lexists(self.path / n))]
        foreign += [f"{d}/" for d in FOLDERS if (self.path / d).is_symlink()
                    or (self.path / d).exists() and not (self.path / d).is_dir()]
        if foreign:
            raise UserError(f"{self.path} holds {', '.join(foreign)}, which this tool did not "
                            "write; move them away or choose another -r (the store never "
                            "replaces or deletes files it did not write)")

    def _ensure_manifest(self) -> dict:
        """The run's manifest; a run of an earlier version (no manifest, but a config.json
        this tool wrote) gets one listing the names that version owned."""
        if (self.path / MANIFEST).exists():
            return _read_manifest(self.path)
        files, dirs = [], []
        for name in LEGACY_OWNED:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                dirs.append(name)
                files += [p.relative_to(self.path).as_posix() for p in target.rglob("*")
                          if p.is_file() or p.is_symlink()]
            elif os.path.lexists(target):
                files.append(name)
        manifest = {"files": sorted(set(files) | set(FIXED_FILES)), "dirs": dirs}
        with os_errors("write", self.path / MANIFEST):
            _write_manifest(self.path, manifest)
        return manifest

    # -- journal and recovery ----------------------------------------------------------
    def _journal(self, entry: dict):
        write_json(self.path / JOURNAL, {**entry, "pid": os.getpid()})

    def _end_journal(self):
        with os_errors("remove", self.path / JOURNAL):
            (self.path / JOURNAL).unlink(missing_ok=True)
            fsync_dir(self.path)

    def _recover(self):
        """Remove temporary files of killed writes; finish an interrupted operation."""
        self._remove_temporaries()
        journal = self.path / JOURNAL
        if not journal.exists():
            return
        try:
            entry = json.loads(journal.read_text(encoding="utf-8"))
            op = entry["op"]
        except (OSError, ValueError, KeyError, TypeError):
            op, entry = "overwrite", {}  # unreadable: the deletion is the safe completion
        if op == "rewind":
            try:
                epoch, source = int(entry["epoch"]), Path(entry["source"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{journal} (an interrupted rewind) is damaged; resume from "
                                "the run directory after deleting it, or use --overwrite") from None
            self.notes.append(f"finished an interrupted rewind to epoch {epoch}")
            self._do_rewind(epoch, source)
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
                for entry in os.scandir(folder):
                    if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)

    def _overwrite(self):
        """Delete the run there (only the store's files), journalled."""
        if (self.path / MANIFEST).exists() or (self.path / CONFIG).exists():
            if not (self.path / MANIFEST).exists():
                self._adopt_or_refuse()
            self._journal({"op": "overwrite"})
            self._delete_owned()
            self._end_journal()
        self._refuse_foreign()

    def _adopt_or_refuse(self):
        """A run without a manifest: adopt it if an earlier version of this tool wrote its
        config.json (it records ``versions.layerhessians``), else refuse."""
        try:
            config = read_config(self.path / CONFIG)
        except UserError:
            config = {}
        versions = config.get("versions")
        if isinstance(versions, dict) and "layerhessians" in versions:
            self._ensure_manifest()
            return
        self._refuse_foreign()

    def _delete_owned(self):
        """Delete the files and (if empty) folders the manifest lists, then the manifest."""
        if not (self.path / MANIFEST).exists():
            return
        manifest = _read_manifest(self.path)
        with os_errors("delete files in", self.path):
            for rel in manifest["files"]:
                target = self.path / rel
                if _no_links_below(self.path, str(Path(rel).parent)) and \
                        os.path.lexists(target) and not target.is_dir():
                    target.unlink()
            for rel in sorted(manifest["dirs"], key=lambda r: -len(Path(r).parts)):
                target = self.path / rel
                if target.is_dir() and not target.is_symlink():
                    self._remove_temporaries_in(target)
                    try:
                        target.rmdir()
                    except OSError as err:
                        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
            (self.path / MANIFEST).unlink(missing_ok=True)
            fsync_dir(self.path)
        self._metrics = self._spectra = None
        self._bytes = {}

    @staticmethod
    def _remove_temporaries_in(folder):
        for entry in os.scandir(folder):
            if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)

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
            raise UserError(_os_message(err, "lock", path)) from None
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

    def close(self):
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
        return read_config(self.path / CONFIG)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINTS / LAST_CHECKPOINT

    @property
    def log_path(self) -> Path:
        return self.path / "logs" / "train.log"

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def metrics(self) -> pd.DataFrame:
        if self._metrics is None:
            self._metrics = read_metrics(self.path / METRICS)
        return self._metrics

    @property
    def spectra(self) -> pd.DataFrame:
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
        return None if state is None else _checkpoint_epoch(state, self.checkpoint_path)

    # -- verification ------------------------------------------------------------------
    def _verify(self, config, epoch):
        """Cut the CSVs back to what the checkpoint committed and check that every file
        agrees (see :func:`check_consistent`); refuses what does not."""
        state = self.load_checkpoint() if epoch is not None else None
        committed = state.get(COMMITTED_KEY) if isinstance(state, dict) else None
        for name in (METRICS, SPECTRA):
            path = self.path / name
            with os_errors("read", path):
                raw = path.read_bytes() if path.exists() else b""
            if committed and name in committed:
                size, digest = int(committed[name]["bytes"]), committed[name]["sha256"]
                if len(raw) < size or hashlib.sha256(raw[:size]).hexdigest() != digest:
                    raise _problem(path, f"does not hold what was committed with epoch {epoch} "
                                         "(changed or damaged since)")
                if len(raw) > size:  # rows of an epoch after the checkpoint's
                    raw = raw[:size]
                    write_bytes(path, raw)
            self._bytes[name] = raw
        self._metrics = self._spectra = None
        self.truncate_after(epoch)
        check_consistent(self.path, config, self.metrics, self.spectra, epoch)

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
        epoch = _checkpoint_epoch(state, source)
        last = self.completed_epoch
        if last is not None and epoch > last:
            raise UserError(f"{source} is of epoch {epoch}, after the run's last checkpoint "
                            f"(epoch {last}); resume with --resume {self.path}")
        self._journal({"op": "rewind", "epoch": epoch, "source": str(source)})
        self._do_rewind(epoch, source)
        self._end_journal()
        self.notes.append(f"rewound to epoch {epoch} ({source.name})")

    def _do_rewind(self, epoch: int, source: Path):
        """The idempotent steps of :meth:`rewind`."""
        state = load_torch(source)
        self._bytes = {}
        self._metrics = self._spectra = None
        self.truncate_after(epoch)
        for path in (self.path / CHECKPOINTS).glob("epoch_*.pt"):
            match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
            if match and int(match.group(1)) > epoch:
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
                self._bytes[name] = path.read_bytes() if path.exists() else b""
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
        """
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
        save_torch(self.path / CHECKPOINTS / f"epoch_{epoch:04d}.pt", state_dict)


# ----------------------------------------------------------------------------- reader
@dataclass
class Run:
    """A run directory read back: settings, per-epoch metrics and the spectra."""

    path: Path
    config: dict
    metrics: pd.DataFrame
    spectra: pd.DataFrame = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self):
        return self.config.get("model")

    @property
    def dataset(self):
        return self.config.get("dataset")

    @property
    def blocks(self) -> list:
        """Block names: ``"full"`` first, then the layers from input to output."""
        present = list(dict.fromkeys(self.spectra["block"]))
        listed = [b for b in self.config.get("blocks", []) if b in present]
        return listed + [b for b in present if b not in listed]

    @property
    def layers(self) -> list:
        return [b for b in self.blocks if b != FULL]

    @property
    def epochs(self) -> list:
        """Epochs that have spectra, ascending (0 = at initialisation)."""
        return sorted(int(e) for e in self.spectra["epoch"].unique())

    def measure(self, block: str, epoch: int):
        """The :class:`~layerhessians.spectra.SpectralMeasure` of ``block`` at ``epoch``."""
        from layerhessians.spectra import SpectralMeasure

        rows = self.spectra[(self.spectra["epoch"] == epoch) & (self.spectra["block"] == block)]
        if rows.empty:
            raise UserError(f"run {self.path} has no spectrum for block {block!r} at epoch "
                            f"{epoch}; blocks: {', '.join(self.blocks)}; epochs: {self.epochs}")
        measure = SpectralMeasure.from_frame(rows[["vector", "node", "weight"]])
        if METHOD in rows.columns and rows[METHOD].notna().any():
            measure.method = str(rows[METHOD].dropna().iloc[0])
        return measure

    def density(self, block: str, epoch: int, **kwargs):
        """``(grid, density)`` of ``block`` at ``epoch``; kwargs go to ``measure.density``."""
        return self.measure(block, epoch).density(**kwargs)


def load_run(path) -> Run:
    """Read the run directory ``path`` (written by ``layerhessians train``).

    Raises:
        UserError: one line when ``path`` is not a run directory, an operation on it was
            interrupted (rerun the train command), or a file is unreadable or damaged.
    """
    path = run_path(path)
    with os_errors("read", path):
        if (path / JOURNAL).exists():
            raise UserError(f"{path} has an unfinished operation (a create, overwrite or rewind "
                            "was interrupted); run the same `layerhessians train` command again "
                            "to finish it")
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is not a LayerHessians run directory (no {CONFIG}); "
                            "pass the -r directory of a `layerhessians train` run")
    return Run(path=path, config=read_config(path / CONFIG),
               metrics=read_metrics(path / METRICS), spectra=read_spectra(path / SPECTRA))


def resume_source(value):
    """What ``--resume PATH`` names: ``(run directory, checkpoint or None)``.

    ``PATH`` is a run directory or ``RUN/checkpoints/last.pt`` (checkpoint ``None``: the last
    committed epoch), or another ``RUN/checkpoints/*.pt`` holding a full training state
    (returned, to be passed to :meth:`RunStore.create` as ``checkpoint``).

    Raises:
        UserError: empty or missing path, a file outside a run's checkpoints folder, an
            unreadable checkpoint, or one holding only weights (``epoch_EEEE.pt``).
    """
    if value is None or not str(value).strip():
        raise UserError('--resume "" names nothing; pass a run directory or its '
                        "checkpoints/last.pt")
    path = Path(value)
    with os_errors("read", path):
        if not path.exists():
            raise UserError(f"--resume {value}: no such file or directory; pass a run directory "
                            "or its checkpoints/last.pt")
        if path.is_dir():
            return path, None
        run = path.parent.parent
        if path.parent.name != CHECKPOINTS or not (run / CONFIG).is_file():
            raise UserError(f"--resume {value} is not inside a run directory "
                            "(RUN/checkpoints/*.pt); pass the run directory instead")
    if path.name == LAST_CHECKPOINT:
        return run, None
    state = load_torch(path)
    if not (isinstance(state, dict) and {"epoch", "model", "optimizer"} <= set(state)):
        raise UserError(f"--resume {value}: the file holds only model weights (no optimizer, "
                        "schedule or random state), so training cannot continue exactly from "
                        f"it; resume the run from its last checkpoint (--resume {run})")
    return run, path
