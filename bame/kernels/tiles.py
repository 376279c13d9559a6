"""Token-tiled, transposed layout shared by the gather-based formulations.

The embedding_bag and sampled formulations gather whole rows of a transposed activation (``x^T``: one row
per input feature, one column per token). Splitting the tokens into tiles of ``tile`` and storing each
tile's transposed table contiguously, ``(n_tiles, rows, tile)``, keeps one table in a core's L2 while it is
gathered from, and lets the forward, the input gradient and the weight gradient share one transposition of
``x`` and one of ``dY`` instead of each making its own.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["L2_BYTES", "auto_tile", "from_tiles", "layer_tile", "to_tiles"]

# Measured at 4096 wide, 1:16, 256 tokens on a 1 MiB-L2 Xeon: tiles of 64 tokens (a 1 MiB fp32 table) run
# the embedding_bag forward ~1.5x faster than one 4 MiB table that only fits in L3.
L2_BYTES = 1 << 20


def auto_tile(table_rows: int, tokens: int, like: Tensor) -> int:
    """Tokens per tile so that a ``(table_rows, tile)`` table of ``like``'s dtype fits in L2.

    A power of two, at least 16 and at most ``tokens``; on a GPU all tokens (one launch is best there).
    """
    if like.device.type != "cpu":
        return max(tokens, 1)
    fit = L2_BYTES // max(table_rows * like.element_size(), 1)
    return max(min(1 << max(fit.bit_length() - 1, 4), tokens), 1)


def layer_tile(shape: tuple[int, int], tokens: int, like: Tensor) -> int:
    """One tile size per ``(out, in)`` layer: the ``x`` and ``dY`` tiles must align for the weight grad."""
    return auto_tile(max(shape), tokens, like)


def to_tiles(a: Tensor, tile: int) -> Tensor:
    """``(T, R)`` -> ``(ceil(T / tile), R, tile)``: tile ``c`` holds ``a[c*tile : (c+1)*tile].T``.

    Tokens past ``T`` in the last tile are zero, which adds nothing to any of the products.
    """
    tokens, rows = a.shape
    n_tiles = max(-(-tokens // tile), 1)
    if n_tiles * tile != tokens:
        a = F.pad(a, (0, 0, 0, n_tiles * tile - tokens))  # (n_tiles*tile, R)
    return a.view(n_tiles, tile, rows).transpose(1, 2).contiguous()  # (n_tiles, R, tile)


def from_tiles(tiles: Tensor, tokens: int) -> Tensor:
    """The inverse of :func:`to_tiles`: ``(n_tiles, R, tile)`` -> contiguous ``(tokens, R)``."""
    n_tiles, rows, tile = tiles.shape
    # reshape copies unless there is one tile (then it is a transposed view): contiguous() covers both.
    return tiles.transpose(1, 2).reshape(n_tiles * tile, rows)[:tokens].contiguous()  # (T, R)
