"""Fashion-MNIST: 70,000 28x28 grey images of clothing in 10 classes, from the four official IDX files.

Where the files are looked for, in order (each file plain or ``.gz``):

1. ``<data_dir>/``, ``<data_dir>/fashion-mnist/`` and ``<data_dir>/FashionMNIST/raw/`` (torchvision's
   layout, so an existing torchvision download is reused);
2. only when no ``data_dir`` was given (``./data`` is tried in 1.): ``/usr/share/datasets/fashion-mnist/``,
   where Debian's ``dataset-fashion-mnist`` package puts them. A directory the user names is the only
   place looked in, so a wrong one is an error rather than a silent switch to another copy.

With ``download=True`` the official files are fetched into ``<data_dir>/fashion-mnist/`` and checked
against their published MD5s.

Normalization uses the published train-set statistics (mean 0.2860, std 0.3530), so the test split can
be loaded without the train files. Train augmentation is a random horizontal flip only: the images are
centred and tightly framed, so a shift or crop mostly cuts off garment edges, while a mirrored garment
is still the same class.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from bame.data import DatasetSpec, Loader, Request, Split, in_memory, register
from bame.data.download import download as fetch
from bame.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from bame.data.transforms import CropFlip, Normalize
from bame.errors import DataError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBDIRS = ("", "fashion-mnist", "FashionMNIST/raw")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BASE_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MEAN = (0.2860,)
STD = (0.3530,)
NUM_CLASSES = 10
IMAGE_SIZE = 28


def _find(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (plain first)."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(split: str, data_dir: Path, system: bool = True) -> tuple[Path, Path]:
    """The image and label files of a split.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: the data directory.
        system: also look in :data:`SYSTEM_DIR` (only when the user named no directory).

    Raises:
        DataError: not found; the message lists where it looked and how to get the files.
    """
    candidates = [data_dir / sub for sub in SUBDIRS] + ([SYSTEM_DIR] if system else [])
    images_stem, labels_stem = FILES[split]
    for directory in candidates:
        images, labels = _find(directory, images_stem), _find(directory, labels_stem)
        if images is not None and labels is not None:
            return images, labels
    looked = ", ".join(str(d) for d in candidates)
    debian = ("install them with 'apt-get install dataset-fashion-mnist'" if system else
              "leave out --data-dir to use Debian's dataset-fashion-mnist package")
    raise DataError(
        f"Fashion-MNIST {split} files ({images_stem}[.gz], {labels_stem}[.gz]) not found in: {looked}; "
        f"{debian}, run with --download, or put {BASE_URL}{images_stem}.gz and {BASE_URL}{labels_stem}.gz "
        "into --data-dir"
    )


def fetch_split(split: str, data_dir: Path) -> None:
    """Download a split's two official ``.gz`` files into ``data_dir/fashion-mnist``."""
    for stem in FILES[split]:
        name = stem + ".gz"
        fetch(BASE_URL + name, data_dir / "fashion-mnist" / name, MD5[name])


def load(split: str, data_dir: Path, download: bool = False, system: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of Fashion-MNIST.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: the data directory.
        download: fetch the files into ``data_dir/fashion-mnist`` if they are not found.
        system: try the system location after ``data_dir`` (when the user named no directory).

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and int64 ``[N]``.

    Raises:
        DataError: missing, damaged or inconsistent files.
    """
    try:
        images_path, labels_path = locate(split, data_dir, system)
    except DataError:
        if not download:
            raise
        fetch_split(split, data_dir)
        images_path, labels_path = locate(split, data_dir, system)
    return _load_files(*(_cache_key(p) for p in (images_path, labels_path)))


def _cache_key(path: Path) -> tuple[str, int, int]:
    # The mtime and size make a file replaced during the process count as a new one.
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _load_files(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = images_key[0], labels_key[0]
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise DataError(
            f"{images_path} holds {images.dtype} images of shape {list(images.shape)}, expected uint8 "
            f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}]; is it the right file?"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{labels_path} has {labels.shape[0] if labels.ndim else 0} labels for the {len(images)} images "
            f"of {images_path}; the two files do not belong together"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path} has label {int(labels.max())}, expected 0..{NUM_CLASSES - 1}")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images")
    # read_idx returned fresh arrays: wrap them without another copy.
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _split(split: str, root: Path, download: bool, system: bool = True) -> Split:
    images, labels = load(split, root, download, system)
    return images, labels, Normalize(255.0, MEAN, STD), CropFlip(0, flip=True)


def _loader(request: Request) -> Loader:
    """The in-memory loader; the system copy is a fallback only when no ``data_dir`` was given."""
    return in_memory(functools.partial(_split, system=not request.root_given))(request)


#: A first run that learns in about a minute on a CPU: 6 epochs of 468 steps, and BAME's delta_t scaled
#: to the run (the paper's 100 assumes ~58k iterations): about 19 LMA/OBF updates in its evolution phase.
DEFAULTS = {"epochs": 6, "batch_size": 128, "method_options": {"delta_t": 50}}

register(DatasetSpec("fashion-mnist", "Fashion-MNIST 28x28 clothing images (IDX files)",
                     NUM_CLASSES, 1, IMAGE_SIZE, "smallcnn", 60000, 10000, _loader, DEFAULTS))
