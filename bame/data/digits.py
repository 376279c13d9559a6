"""scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, pixel values 0..16, 10 classes.

It ships inside scikit-learn, so the demo needs no download. There is no official split: a fixed
stratified one is made here with its own seed, independent of the run seed, so every run (and every
paper table) trains on the same 1,437 images and tests on the same 360.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from bame.data import DatasetSpec, Split, in_memory, register
from bame.data.transforms import CropFlip, Normalize, channel_stats
from bame.errors import DataError

NUM_TEST = 360
SPLIT_SEED = 0
# Pixels run 0..16 (4x4 blocks of an original 32x32 bitmap, counted): 16 maps to 1.0.
PIXEL_SCALE = 16.0


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 ``[N, 8, 8]`` and labels as int64 ``[N]`` (cached per process)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a dependency, but a broken install should say so
        raise DataError(
            f"the digits dataset needs scikit-learn ({exc}); run: pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def stratified_split(labels: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test, keeping class proportions.

    Written out rather than taken from ``sklearn.model_selection`` so the split cannot change with a
    scikit-learn release: it uses numpy's legacy ``RandomState``, whose stream numpy keeps fixed.

    Each class gives ``num_test * class_size / n`` test samples, rounded down, and the samples still
    missing go to the classes with the largest remainders (ties to the smaller class label).

    Args:
        labels: int labels ``[n]``.
        num_test: size of the test split.
        seed: the split seed.

    Returns:
        ``(train_indices, test_indices)``, each sorted.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * num_test / len(labels)
    take = np.floor(quotas).astype(np.int64)
    by_remainder = sorted(range(len(classes)), key=lambda k: (-(quotas[k] - take[k]), classes[k]))
    for k in by_remainder[: num_test - int(take.sum())]:
        take[k] += 1
    rng = np.random.RandomState(seed)
    test: list[np.ndarray] = []
    for cls, count in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == cls)
        test.append(members[rng.permutation(len(members))[:count]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


@functools.lru_cache(maxsize=2)
def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the digits.

    Args:
        split: ``"train"`` (1,437 images) or ``"test"`` (360).

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 8, 8]`` with values 0..16, and int64 ``[N]``.
    """
    images, labels = _load_all()
    train_idx, test_idx = stratified_split(labels, NUM_TEST, SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return torch.from_numpy(images[idx][:, None].copy()), torch.from_numpy(labels[idx].copy())


@functools.lru_cache(maxsize=1)
def train_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of the train split's scaled pixels, used for both splits."""
    return channel_stats(load("train")[0], PIXEL_SCALE)



def _split(split: str, root: Path, download: bool) -> Split:
    images, labels = load(split)
    mean, std = train_stats()
    # A one-pixel random shift: an 8x8 digit has no room for more, and must not be mirrored.
    return images, labels, Normalize(PIXEL_SCALE, mean, std), CropFlip(padding=1, flip=False)


#: The default global batch of 256 would leave 5 steps per epoch of these 1,437 images: a first run at the
#: defaults learned nothing. Batch 64 gives 22 steps per epoch; 30 epochs (20 s on one CPU thread) reach
#: dense accuracy; BAME's delta_t is scaled to that run (the paper's 100 assumes ~58k iterations): about
#: 22 LMA/OBF updates in its evolution phase.
DEFAULTS = {"epochs": 30, "batch_size": 64, "method_options": {"delta_t": 10}}

register(DatasetSpec("digits", "scikit-learn's bundled 8x8 handwritten digits (no download)",
                     10, 1, 8, "smallcnn", 1437, 360, in_memory(_split), DEFAULTS))
