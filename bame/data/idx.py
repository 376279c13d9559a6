"""A reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

The format (http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic number ``0x00 0x00 TT DD``,
where ``TT`` is the element type and ``DD`` the number of dimensions, then ``DD`` big-endian uint32
sizes, then the elements in C order, big-endian. Image files have magic 2051 (ubyte, 3 dims), label
files 2049 (ubyte, 1 dim). Everything is checked, including that the payload has exactly the announced
size, so a truncated download is caught here rather than as garbage images later.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from bame.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# Element type code -> big-endian numpy dtype.
_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if the file is gzip (by content, whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged gzip file ({exc}); download it again") from exc


def parse_idx(data: bytes, source: str = "<bytes>", expected_magic: int | None = None) -> np.ndarray:
    """Decode an IDX payload.

    Args:
        data: the uncompressed file content.
        source: the file name, for error messages.
        expected_magic: if given, the magic number the file must have (2051 or 2049).

    Returns:
        The array, in native byte order, with the dims from the header.

    Raises:
        DataError: wrong magic, unknown type, or a payload that is not exactly the announced size.
    """
    if len(data) < 4:
        raise DataError(f"{source} is not an IDX file: only {len(data)} bytes; download it again")
    magic = struct.unpack(">I", data[:4])[0]
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{source} has magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'}); is it the right file?"
        )
    if zero != 0 or type_code not in _DTYPES or ndim == 0:
        raise DataError(f"{source} is not an IDX file (magic number {magic}); is it the right file?")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source} is truncated: its header is incomplete; download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"{source} is {what}: {actual} data bytes for dims {list(dims)}, expected {expected}; "
            "download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # A copy: the buffer is read-only bytes, and torch wants writable memory it may own.
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file, plain or gzip.

    Not cached itself: the dataset modules cache what they build from it (see ``fashion_mnist``).

    Args:
        path: the file.
        expected_magic: if given, the magic number the file must have.

    Returns:
        A writable array in native byte order.

    Raises:
        DataError: a missing, unreadable, damaged or wrong file, naming it.
    """
    p = Path(path)
    return parse_idx(_read_bytes(p), str(p), expected_magic)
