"""CIFAR-10 from the official "python version": ``cifar-10-batches-py/`` with pickled batches.

Each of ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch`` is a pickle of a dict with
``b"data"`` (uint8 ``[10000, 3072]``: the red, green and blue 32x32 planes of each image, row-major),
``b"labels"`` (ints 0..9), ``b"batch_label"`` and ``b"filenames"``.

Pickle can run arbitrary code while loading, and a dataset directory is easy to swap, so the batches
are read with :class:`RestrictedUnpickler`, which only lets through the few numpy functions that
rebuild an array: a file that references anything else (``os.system``, ``builtins.eval`` ...) is refused
before any of it runs.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bame.data import DatasetSpec, Split, in_memory, register
from bame.data.download import download as fetch
from bame.data.download import safe_extract
from bame.data.transforms import CropFlip, Normalize
from bame.errors import DataError

DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
PIXELS = 3 * 32 * 32


def _numpy_attr(module: str, name: str) -> Callable[[], Any]:
    """A resolver for ``numpy.<module>.<name>``, under numpy 2's ``_core`` or numpy 1's ``core``.

    Files written by numpy 1 (the official ones) name ``numpy.core``, which numpy 2 only keeps as a
    deprecated alias, and files written by numpy 2 name ``numpy._core``: both resolve to the same thing.
    """

    def resolve() -> Any:
        import importlib

        try:
            return getattr(importlib.import_module(f"numpy._core.{module}"), name)
        except ImportError:  # numpy 1
            return getattr(importlib.import_module(f"numpy.core.{module}"), name)

    return resolve


# Everything a CIFAR batch pickled by Python 2 or 3 (any protocol) needs, and nothing else.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_attr("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_attr("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _numpy_attr("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _numpy_attr("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Protocol 2 pickles of bytes written by Python 3 go through _codecs.encode(str, "latin1").
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch needs (see ``_ALLOWED``)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global; refuse anything else before it can be called."""
        resolver = _ALLOWED.get((module, name))
        if resolver is None:
            raise ForbiddenGlobal(f"global '{module}.{name}' is not allowed")
        return resolver()


def _field(batch: dict[Any, Any], key: str) -> Any:
    # Official files have bytes keys; accept str keys from files re-pickled under Python 3.
    return batch.get(key.encode(), batch.get(key))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one batch file.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DataError: unreadable, not a CIFAR batch, or referencing a forbidden global.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # encoding="bytes": the official files come from Python 2, whose str must stay bytes here.
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise DataError(
            f"refusing {path}: {exc} (a CIFAR-10 batch never needs it: corrupt or malicious file)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure to decode a data file is the file's fault
        raise DataError(
            f"{path} is not a valid CIFAR-10 batch ({type(exc).__name__}: {exc}); download it again"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != PIXELS
    ):
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {shape}, expected a uint8 [N, {PIXELS}] array; is it CIFAR-10?")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: b'labels' is not a list of integers") from exc
    if labels_arr.shape != (len(data),):
        raise DataError(f"{path} has {labels_arr.size} labels for {len(data)} images")
    if len(labels_arr) and (labels_arr.min() < 0 or labels_arr.max() >= NUM_CLASSES):
        raise DataError(f"{path} has labels outside 0..{NUM_CLASSES - 1}; is it CIFAR-10 (not CIFAR-100)?")
    return data.reshape(-1, 3, 32, 32), labels_arr


def locate(split: str, data_dir: Path) -> Path:
    """The directory holding the split's batch files: ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    Raises:
        DataError: not found, saying where it looked and how to get the files.
    """
    files = TRAIN_FILES if split == "train" else TEST_FILES
    candidates = (data_dir / DIRNAME, data_dir)
    for directory in candidates:
        if all((directory / name).is_file() for name in files):
            return directory
    partial = [d for d in candidates if any((d / name).is_file() for name in files)]
    if partial:
        missing = [name for name in files if not (partial[0] / name).is_file()]
        raise DataError(f"{partial[0]} lacks CIFAR-10 files {', '.join(missing)}; download the dataset again")
    raise DataError(
        f"CIFAR-10 {split} files ({', '.join(files)}) not found in {candidates[0]} or {candidates[1]}; "
        f"run with --download, or extract {URL} into --data-dir"
    )


def fetch_dataset(data_dir: Path) -> None:
    """Download the official archive into ``data_dir``, check its MD5 and extract it there."""
    archive = fetch(URL, data_dir / ARCHIVE, MD5)
    safe_extract(archive, data_dir)


def load(split: str, data_dir: Path, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of CIFAR-10.

    Args:
        split: ``"train"`` (the five data batches) or ``"test"``.
        data_dir: the data directory.
        download: fetch and extract the archive into ``data_dir`` if the files are not found.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.
    """
    try:
        directory = locate(split, data_dir)
    except DataError:
        if not download:
            raise
        fetch_dataset(data_dir)
        directory = locate(split, data_dir)
    names = TRAIN_FILES if split == "train" else TEST_FILES
    keys = []
    for name in names:
        stat = (directory / name).stat()
        keys.append((str((directory / name).resolve()), stat.st_mtime_ns, stat.st_size))
    return _load_files(tuple(keys))


@functools.lru_cache(maxsize=2)
def _load_files(keys: tuple[tuple[str, int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Keyed by (path, mtime, size) of every file, so a replaced file is read again.
    parts = [read_batch(Path(key[0])) for key in keys]
    # concatenate copies even a single part: unpickled arrays may be read-only views of the file bytes.
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(images) == 0:
        raise DataError(f"the CIFAR-10 files in {Path(keys[0][0]).parent} hold no images")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _split(split: str, root: Path, download: bool) -> Split:
    images, labels = load(split, root, download)
    return images, labels, Normalize(255.0, MEAN, STD), CropFlip(padding=4, flip=True)


register(DatasetSpec("cifar10", "CIFAR-10 32x32 colour images (python batches, downloadable)",
                     NUM_CLASSES, 3, 32, "resnet32", 50000, 10000, in_memory(_split)))
