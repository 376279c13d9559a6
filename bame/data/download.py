"""Downloading dataset archives: checksum-verified, with a progress bar, and safe extraction.

A download goes to ``<name>.part`` and only becomes ``<name>`` once its MD5 matches, so an interrupted
or tampered download never looks like a good file. Archives are extracted member by member after
checking that no member could write outside the target directory (``../`` names, absolute paths,
links, devices), which :mod:`tarfile` alone does not guarantee before Python 3.12.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from bame.errors import DataError

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    """The MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` into ``dest`` unless a file with the right MD5 is already there.

    Args:
        url: what to fetch.
        dest: the final file path; its directory is created.
        md5: the expected MD5 hex digest.

    Returns:
        ``dest``.

    Raises:
        DataError: the download failed, or the file's checksum is not ``md5``.
    """
    if dest.is_file() and md5_of(dest) == md5:
        return dest
    from tqdm.auto import tqdm  # a dependency, but only needed here

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create {dest.parent}: {exc.strerror or exc}; choose another --data-dir"
        ) from exc
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"could not download {url} ({reason}); fetch it by hand into {dest.parent} and run again"
        ) from exc
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: got MD5 {digest.hexdigest()}, expected {md5}; "
            "the download is damaged or not the official file, try again"
        )
    os.replace(part, dest)
    return dest


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive (any compression) into ``dest``, refusing members that escape it.

    Raises:
        DataError: a damaged archive, or a member that is a link, a device, or has a path outside
            ``dest``; nothing is written in that case.
    """
    root = dest.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                target = (root / member.name).resolve()
                if not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"{archive} contains {member.name!r}, which is not a plain file; refusing it"
                    )
                if target != root and root not in target.parents:
                    raise DataError(
                        f"{archive} contains {member.name!r}, which points outside {dest}; refusing it"
                    )
            for member in members:
                # The members were checked above; "data" is the 3.12+ filter that also drops odd modes.
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, root, filter="data")
                else:  # pragma: no cover - Python < 3.12
                    tar.extract(member, root)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); delete it and download again") from exc
