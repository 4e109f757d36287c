"""Strict readers of a run's files: ``config.json``, ``metrics.csv`` and ``spectra.csv``.
Damaged files (not UTF-8, cut mid-row, malformed, a missing column, a non-number) give one
:class:`~layerhessians.errors.UserError` line naming the file and the problem."""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.errors import UserError
from layerhessians.store.atomic import read_regular
from layerhessians.store.oserrors import os_errors

SPECTRA_COLUMNS = ["epoch", "block", "vector", "node", "weight"]
#: optional spectra.csv column: how a block's measure was computed ("slq" or "exact"); runs
#: written before it have none (their spectra are SLQ)
METHOD = "method"
METHODS = ("slq", "exact")
METRICS_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                   "train_seconds", "spectra_seconds"]


def problem(path, what: str) -> UserError:
    """The refusal of a damaged run file: ``PATH WHAT; restore it ... or start over``."""
    return UserError(f"{path} {what}; restore it from a backup, or start the run over with "
                     "--overwrite")


def _where(frame, row) -> str:
    """``, epoch E, block 'B'`` of data row ``row`` (as far as the columns exist)."""
    return "".join(f", {c} {str(frame[c].iloc[row])[:40]!r}" if c == "block" else
                   f", {c} {str(frame[c].iloc[row])[:20]}" for c in ("epoch", "block")
                   if c in frame.columns)


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
        empty_columns: the columns of the empty frame returned for a missing or empty file
            (default ``columns``).

    Returns:
        The table, with integer ``epoch`` (and ``vector``) columns.

    Raises:
        UserError: one line naming the file and the problem (not UTF-8, cut mid-row,
            malformed, a missing column, a non-number, an incomplete row).
    """
    path = Path(path)
    with os_errors("read", path):
        raw = read_regular(path) if path.exists() else b""
    if not raw:
        return pd.DataFrame(columns=list(empty_columns or columns))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise problem(path, f"is not UTF-8 text (byte {err.start} is damaged)") from None
    if not text.endswith("\n"):
        raise problem(path, "ends in the middle of a row (the file was cut off)")
    try:
        with warnings.catch_warnings():  # rows longer than the header: an error, not a warning
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), dtype={c: str for c in text_columns},
                                keep_default_na=False, na_values=[""], index_col=False)
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning) as err:
        detail = " ".join(str(err).split())[:120]
        raise problem(path, f"is not a well-formed CSV table ({detail})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise problem(path, f"misses the column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for column in frame.columns:
        if column in text_columns:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise problem(path, f"holds a non-number {str(frame[column].iloc[row])[:40]!r} in "
                                 f"column {column} (data row {row + 1}{_where(frame, row)})")
        frame[column] = values
    for column in columns:
        if column in nullable:
            continue
        empty = frame[column].isna()
        if empty.any():
            row = int(empty.to_numpy().nonzero()[0][0])
            raise problem(path, f"has an incomplete row (data row {row + 1}: no {column})")
    for column in ("epoch", "vector"):
        if column in frame.columns and len(frame):
            as_int = frame[column].astype("int64")
            if not (as_int == frame[column]).all():
                raise problem(path, f"holds a non-integer {column}")
            frame[column] = as_int
    return frame


#: the characters a metric's name may not hold (they would split or quote a CSV field)
_NAME_BREAKERS = (",", '"', "\n", "\r", "\0")
#: the longest metric name
MAX_NAME = 100


def check_row(row, path="metrics.csv") -> dict:
    """A metrics row as the store writes it: ``{name: float}``, checked so that the CSV
    always reads back (:func:`read_metrics`).

    Args:
        row: a mapping of metric names (non-empty strings of at most :data:`MAX_NAME`
            characters, without commas, quotes, line breaks or NUL, not ``epoch``, no
            leading or trailing spaces) to real numbers (Python, NumPy or 0-d tensor
            values; NaN is stored as an empty cell, "no value").
        path: the file named in the refusals.

    Returns:
        The row with float values.

    Raises:
        UserError: a name or value that the CSV cannot hold: a non-string or malformed
            name, a non-number, or an infinite value (one line; nothing is written).
    """
    if not isinstance(row, dict):
        raise UserError(f"metrics for {path} must be a dict of name -> number; got "
                        f"{type(row).__name__}")
    checked = {}
    for name, value in row.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip() or \
                len(name) > MAX_NAME or any(c in name for c in _NAME_BREAKERS) or \
                name == "epoch":
            raise UserError(f"metric name {str(name)[:60]!r} cannot be a column of {path}: "
                            f"use a non-empty name of at most {MAX_NAME} characters without "
                            "commas, quotes or line breaks (and not 'epoch')")
        try:
            if isinstance(value, (str, bytes)) or getattr(value, "ndim", 0) != 0:
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise UserError(f"metric {name!r} must be a number; got {str(value)[:40]!r}") \
                from None
        if number in (float("inf"), float("-inf")):
            raise UserError(f"metric {name!r} is {number}: {path} keeps finite numbers only "
                            "(NaN for no value)")
        checked[name] = number
    return checked


def read_metrics(path) -> pd.DataFrame:
    """``metrics.csv`` read strictly (:func:`read_table`): an ``epoch`` column of integers,
    every other column numbers (possibly empty: an epoch without spectra has no
    ``top_eigenvalue``)."""
    return read_table(path, ["epoch"], text_columns=(), nullable=METRICS_COLUMNS[1:],
                      empty_columns=METRICS_COLUMNS)


def read_spectra(path) -> pd.DataFrame:
    """``spectra.csv`` read strictly (:func:`read_table`): :data:`SPECTRA_COLUMNS`, all
    filled, ``block`` a name, the others numbers (nodes finite, weights finite and >= 0: a
    bad one is refused naming the file, epoch and block); the optional :data:`METHOD`
    column is text (empty in rows of older runs)."""
    frame = read_table(path, SPECTRA_COLUMNS, text_columns=("block", METHOD))
    for column, bad in (("node", ~np.isfinite(frame["node"].to_numpy(float))),
                        ("weight", ~(frame["weight"].to_numpy(float) >= 0)
                         | ~np.isfinite(frame["weight"].to_numpy(float)))):
        if bad.any():
            row = int(bad.nonzero()[0][0])
            raise problem(Path(path), f"holds a {'non-finite' if column == 'node' else 'bad'} "
                                       f"{column} {frame[column].iloc[row]!r} at epoch "
                                       f"{frame['epoch'].iloc[row]}, block "
                                       f"{frame['block'].iloc[row]!r} (data row {row + 1}; "
                                       f"{column}s must be finite"
                                       f"{', weights >= 0' if column == 'weight' else ''})")
    if METHOD in frame.columns:
        bad = frame[METHOD].notna() & ~frame[METHOD].isin(METHODS)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise problem(Path(path), f"holds an unknown method "
                                       f"{str(frame[METHOD].iloc[row])[:40]!r} (data row "
                                       f"{row + 1}; expected {' or '.join(METHODS)})")
    return frame


def read_config(path) -> dict:
    """``config.json`` as a dict; one :class:`UserError` line if it is not a JSON object."""
    path = Path(path)
    with os_errors("read", path):
        raw = read_regular(path)
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise problem(path, "is not UTF-8 text (damaged)") from None
    except ValueError as err:
        raise problem(path, f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise problem(path, f"holds a JSON {type(config).__name__}, not the object of settings")
    blocks = config.get("blocks", [])  # a list of names (earlier releases), else name -> size
    names_only = isinstance(blocks, list) and all(isinstance(b, str) for b in blocks)
    sized = isinstance(blocks, dict) and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in blocks.values())
    if not (names_only or sized):
        raise problem(path, "has a 'blocks' entry that is not a list of names or an object "
                            "of block sizes")
    return config

