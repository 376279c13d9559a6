"""Batched image augmentation and normalization on tensors.

The in-memory datasets are small images (8x8 to 32x32) where per-sample PIL transforms would cost far
more than the model's step; here a whole batch is cropped, flipped and normalized with a few tensor ops
on the batch's device. Augmentation runs on the raw integer pixels, so padding is true black, as with
torchvision's ``RandomCrop(padding=p)`` applied before ``Normalize``, and every crop is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropFlipParams:
    """Random parameters for one global batch.

    Attributes:
        offsets: int64 ``[n, 2]``: the (top, left) corner of each crop in the padded image, each in
            ``[0, 2 * padding]``; ``(padding, padding)`` is the unshifted image.
        flips: bool ``[n]``: which images to mirror left-right.
    """

    offsets: torch.Tensor
    flips: torch.Tensor

    def __getitem__(self, window: slice) -> CropFlipParams:
        """The parameters of a slice of the batch (one rank's share)."""
        return CropFlipParams(self.offsets[window], self.flips[window])


@dataclass(frozen=True)
class CropFlip:
    """Random crop of the original size from a zero-padded image, then an optional horizontal flip.

    ``CropFlip(padding=4, flip=True)`` is the standard CIFAR-10 augmentation; ``padding=1`` without flip
    is a random one-pixel shift; ``padding=0`` with flip is a flip only.

    Attributes:
        padding: zero padding on each side, in pixels (0 = no crop).
        flip: mirror each image left-right with probability 1/2.
    """

    padding: int = 0
    flip: bool = False

    def sample(self, n: int, generator: torch.Generator) -> CropFlipParams:
        """Draw the parameters for ``n`` images from ``generator`` (on the CPU).

        Both draws are always made, so the stream does not depend on which options are on.
        """
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return CropFlipParams(offsets, flips if self.flip else torch.zeros_like(flips))

    def apply(self, images: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: ``[n, C, H, W]`` tensor of any dtype.
            params: from :meth:`sample`, for the same ``n`` images.

        Returns:
            A new ``[n, C, H, W]`` tensor of the same dtype and device.
        """
        if self.padding:
            images = crop_padded(images, params.offsets.to(images.device), self.padding)
        if self.flip and bool(params.flips.any()):
            flips = params.flips.to(images.device)
            images = images.clone() if not self.padding else images  # never write into the dataset
            images[flips] = images[flips].flip(-1)
        return images


def crop_padded(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of a batch from its zero-padded version at its own offset.

    One gather for the whole batch instead of a Python loop over images.

    Args:
        images: ``[n, C, H, W]``.
        offsets: int64 ``[n, 2]`` (top, left) in ``[0, 2 * padding]``.
        padding: zero padding on each side.

    Returns:
        ``[n, C, H, W]``: output ``[k, :, y, x]`` is padded input ``[k, :, y + top_k, x + left_k]``.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # [n, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=device)  # [n, W]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class Normalize:
    """Turn raw pixels into the network's input: ``(pixels / scale - mean) / std`` per channel.

    Attributes:
        scale: the pixel value that maps to 1.0 (255 for uint8 images, 16 for scikit-learn's digits).
        mean: per-channel mean of the scaled pixels.
        std: per-channel standard deviation of the scaled pixels.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalize a ``[n, C, H, W]`` batch into a new float32 tensor."""
        shift, factor = self._affine(images.device)
        # One conversion and two in-place ops: (p / s - m) / d == (p - m * s) * (1 / (d * s)).
        return images.to(torch.float32).sub_(shift).mul_(factor)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`__call__` up to float rounding: back to raw pixel values (float32)."""
        shift, factor = self._affine(x.device)
        return x / factor + shift

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float64) * self.scale
        factor = 1.0 / (torch.tensor(self.std, dtype=torch.float64) * self.scale)
        shape = (1, len(self.mean), 1, 1)
        return (
            mean.to(device=device, dtype=torch.float32).view(shape),
            factor.to(device=device, dtype=torch.float32).view(shape),
        )


def channel_stats(images: torch.Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``images / scale`` (computed in float64).

    Args:
        images: ``[n, C, H, W]``.
        scale: see :class:`Normalize`.

    Returns:
        ``(mean, std)``, one float per channel.
    """
    x = images.to(torch.float64).div(scale).transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-12)
    return tuple(mean.tolist()), tuple(std.tolist())
