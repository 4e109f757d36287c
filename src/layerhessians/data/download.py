"""Finding a dataset's files on disk, and downloading them when missing.

Each file is streamed into a temporary file in its destination folder while its MD5 is
computed, and only moved into place (``os.replace``) once the checksum matches; on any
failure the temporary file is deleted, so a partial or corrupt download never looks good.
Archives (CIFAR) are verified, extracted into a temporary folder, then moved into place.

``$LAYERHESSIANS_DATASET_MIRROR`` replaces every official URL by
``$LAYERHESSIANS_DATASET_MIRROR/<Name>/<filename>``.
"""

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from layerhessians.data.readers import find_idx
from layerhessians.data.registry import MIRROR_ENV, DatasetSpec, RemoteFile
from layerhessians.errors import DatasetMissingError
from layerhessians.store.atomic import atomic_path

#: Seconds a connection may stay silent before a download is abandoned.
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
#: Import name of each package shipping a bundled dataset, where it differs from the pip name.
_IMPORT_NAMES = {"scikit-learn": "sklearn"}


class _FailedDownload(Exception):
    """One URL did not give the expected file (internal; turned into DatasetMissingError)."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib's own also follows ``ftp://``)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """The redirected request, or ``_FailedDownload`` for a target that is not http(s)."""
        if not newurl.lower().startswith(("http://", "https://")):
            raise _FailedDownload(f"{req.full_url} redirects to {newurl[:80]!r}, which is not "
                                  "an http(s) URL; not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


#: the opener of every download (http(s) only, redirects included)
_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def file_md5(path) -> str:
    """MD5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_folder(spec: DatasetSpec, root) -> Path:
    """``<root>/<Name>``."""
    return Path(root) / spec.name


def data_folder(spec: DatasetSpec, root) -> Path:
    """The folder the reader reads from (``<root>/<Name>/<data_dir>``)."""
    return dataset_folder(spec, root) / spec.data_dir


def download_folder(spec: DatasetSpec, root) -> Path:
    """The folder the official files are downloaded into."""
    return dataset_folder(spec, root) / spec.download_dir


def file_urls(spec: DatasetSpec, remote: RemoteFile) -> list[str]:
    """Where to fetch ``remote`` from: the mirror named by the environment, else the official URLs."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return [f"{mirror.rstrip('/')}/{spec.name}/{remote.filename}"]
    return list(remote.urls)


def missing_files(spec: DatasetSpec, root) -> list[str]:
    """The files the reader needs that are absent (IDX files count if plain or ``.gz``)."""
    folder = data_folder(spec, root)
    names = spec.train_files + spec.test_files
    if spec.reader == "idx":
        return [name for name in names if find_idx(folder, name) is None]
    return [name for name in names if not (folder / name).is_file()]


def is_present(spec: DatasetSpec, root) -> bool:
    """True when the dataset can be read without downloading (bundled ones: when the package
    shipping them is installed)."""
    if spec.bundled:
        return importlib.util.find_spec(_IMPORT_NAMES.get(spec.package, spec.package)) is not None
    return not missing_files(spec, root)


def fetch(urls, dest, md5, timeout=TIMEOUT_S, max_bytes=None) -> Path:
    """Download the first of ``urls`` that yields a file with MD5 ``md5`` to ``dest``.

    ``max_bytes``: the most bytes the file may have; a server announcing or sending more is
    stopped there (and that URL fails) instead of being read to the end.

    Raises ``_FailedDownload`` (reasons of every URL, one line) when none does; nothing is
    left at ``dest`` or in its folder then.
    """
    dest = Path(dest)
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for url in urls:
        try:  # the part file is removed on any failure
            with atomic_path(dest, suffix=".part") as tmp:
                with open(tmp, "wb") as out:
                    got = _stream(url, out, timeout, dest.name, max_bytes)
                if got != md5:
                    raise _FailedDownload(f"checksum mismatch from {url} (md5 {got}, expected {md5})")
            return dest
        except (OSError, ValueError, HTTPException, _FailedDownload) as err:  # URLError, timeouts: OSError
            reasons.append(str(err) if isinstance(err, _FailedDownload) else f"{_describe(err)} [{url}]")
    for folder in created:  # deepest first: leave no empty folders behind
        with contextlib.suppress(OSError):
            folder.rmdir()
    raise _FailedDownload("; ".join(reasons))


def _describe(err) -> str:
    """One line saying why a URL failed."""
    if isinstance(err, urllib.error.HTTPError):
        text = f"HTTP {err.code} {err.reason}"
    elif isinstance(err, urllib.error.URLError):
        text = str(err.reason)
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _stream(url, out, timeout, label, max_bytes=None) -> str:
    """Copy ``url`` into the open binary file ``out``; return the MD5 of what was written.

    Raises ``_FailedDownload`` as soon as the server announces (Content-Length) or has sent
    more than ``max_bytes`` bytes."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"unsupported URL {url!r}")
    print(f"downloading {url}", file=sys.stderr)
    digest = hashlib.md5(usedforsecurity=False)
    with _OPENER.open(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise _FailedDownload(f"{url} announces {total} bytes, more than the expected "
                                  f"at most {max_bytes}; not downloaded (a wrong file)")
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=None, file=sys.stderr, leave=False) as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                received += len(chunk)
                if max_bytes is not None and received > max_bytes:
                    raise _FailedDownload(f"{url} sent more than the expected at most "
                                          f"{max_bytes} bytes; stopped (a wrong file)")
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def extract_archive(archive, folder, member_dir) -> Path:
    """Extract the ``.tar.gz`` ``archive`` and move its top folder ``member_dir`` to
    ``folder/member_dir``; only regular files and folders inside the archive are allowed."""
    folder, target = Path(folder), Path(folder) / member_dir
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{member_dir}."))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise DatasetMissingError(f"{archive} has an unsafe entry {member.name!r}: delete it")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        if not (tmp / member_dir).is_dir():
            raise DatasetMissingError(f"{archive} has no folder {member_dir}/: delete it and download it again")
        if target.exists():
            shutil.rmtree(target)  # an earlier, incomplete extraction
        os.replace(tmp / member_dir, target)
        return target
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetMissingError(
            f"{archive} could not be extracted ({err}): delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _advice(spec: DatasetSpec, root) -> str:
    """``put FILES into FOLDER/ (from URL-FOLDERS)``: how to supply the files by hand."""
    names = ", ".join(r.filename for r in spec.downloads)
    where = download_folder(spec, root).resolve()
    sources = dict.fromkeys(url.rsplit("/", 1)[0] + "/" for url in file_urls(spec, spec.downloads[0]))
    return f"put {names} into {where}/ (from {' or '.join(sources)})"


def ensure_files(spec: DatasetSpec, root, download=False, timeout=TIMEOUT_S) -> Optional[Path]:
    """Make the dataset readable and return :func:`data_folder` (``None`` for bundled data).

    Missing files are downloaded when ``download`` is true; a downloaded or user-supplied
    archive is verified (MD5) and extracted. Raises :class:`DatasetMissingError` (one line:
    which files, which folder) when the data cannot be made available.
    """
    if spec.bundled:
        return None
    if is_present(spec, root):
        return data_folder(spec, root)
    target = download_folder(spec, root)
    for remote in spec.downloads:
        path = target / remote.filename
        if spec.reader == "idx" and find_idx(target, remote.filename.removesuffix(".gz")):
            continue
        if spec.extract and path.is_file():
            if file_md5(path) != remote.md5:
                raise DatasetMissingError(f"{path} is corrupt (MD5 mismatch): delete it and download it again")
        elif not path.is_file():
            if not download:
                raise DatasetMissingError(
                    f"{spec.name} not found in {dataset_folder(spec, root).resolve()}: "
                    f"{_advice(spec, root)}, or download it with `layerhessians datasets --download {spec.name}`")
            try:
                fetch(file_urls(spec, remote), path, remote.md5, timeout=timeout,
                      max_bytes=remote.max_bytes)
            except _FailedDownload as err:
                mirrored = bool(os.environ.get(MIRROR_ENV, "").strip())
                hint = f"check {MIRROR_ENV}" if mirrored else f"or set {MIRROR_ENV} to a mirror"
                raise DatasetMissingError(f"{spec.name}: could not download {remote.filename} ({err}); "
                                          f"{_advice(spec, root)}; {hint}") from None
        if spec.extract:
            extract_archive(path, dataset_folder(spec, root), spec.data_dir)
    missing = missing_files(spec, root)
    if missing:
        raise DatasetMissingError(f"{spec.name}: {', '.join(missing)} still missing in "
                                  f"{data_folder(spec, root).resolve()}: {_advice(spec, root)}")
    return data_folder(spec, root)


def verify_downloads(spec: DatasetSpec, root) -> list[str]:
    """The official files present under :func:`download_folder` whose MD5 does not match."""
    bad = []
    for remote in spec.downloads:
        path = download_folder(spec, root) / remote.filename
        if path.is_file() and file_md5(path) != remote.md5:
            bad.append(str(path))
    return bad
