"""2:4 sparse tensor cores through PyTorch core's semi-structured sparse tensors (CUDA, compute capability 8+).

Two products of an N:M layer whose pattern keeps at most 2 of every 4 consecutive weights (2:4, and the
2:4-compatible 1:4, 1:8, 1:16):

* the forward ``y = x W^T``: W is 2:4 along its input axis, the reduction axis, so
  ``F.linear(x, to_sparse_semi_structured(W))`` runs it on the 2:4 units;
* BAME-dagger's input gradient ``dX = dY W_bwd``: the backward mask is 2:4 along the *output* axis, the
  reduction axis of this product, so ``S = W_bwd^T`` (in, out) is 2:4 along its rows and
  ``dX^T = S dY^T`` is a semi-structured product too.

A compressed weight is kept until the weight or its mask changes (:class:`SemiCache`: once per optimizer
step, reused by every micro-batch), and both operands are zero-padded to the library's minimum shapes.
Where any of this cannot run (no GPU, an old one or PyTorch, a dtype cuSPARSELt lacks), the functions
raise ``NotImplementedError`` with the reason, which makes the planner keep the dense product and say why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SemiCache", "semi_structured_dx", "semi_structured_linear", "semi_structured_problem"]

#: dtypes the 2:4 kernels take (cuSPARSELt / CUTLASS); float32 runs through them only as TF32 on some builds.
DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def semi_structured_problem(x: Tensor, n: int, m: int, shape: tuple[int, int]) -> str | None:
    """Why the 2:4 units cannot compute this layer's products, or None."""
    if x.device.type != "cuda":
        return "semi-structured 2:4 runs on CUDA only"
    if not ((m % 4 == 0 and n <= 2) or (m == 2 and n == 1)):
        return f"{n}:{m} does not keep at most 2 of every 4 consecutive weights"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "semi-structured 2:4 needs compute capability 8.0 or newer"
    if x.dtype not in DTYPES:
        return f"the 2:4 kernels take float16, bfloat16 or int8, not {x.dtype} (train with AMP)"
    return None


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """The minimum (rows, cols) multiples a semi-structured operand of ``dtype`` needs."""
    try:
        from torch.sparse import SparseSemiStructuredTensor

        constraints = SparseSemiStructuredTensor._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(constraints.dense_min_rows), int(constraints.dense_min_cols)
    except (ImportError, AttributeError, KeyError):
        return 32, 64  # cuSPARSELt's documented minimum for 16-bit types


def _pad_to(t: Tensor, rows: int, cols: int) -> Tensor:
    pad_r, pad_c = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_c, 0, pad_r)) if pad_r or pad_c else t


def compress(weight: Tensor) -> Tensor:
    """A dense 2:4 matrix as a semi-structured tensor, zero-padded to the minimum shape."""
    rows, cols = _min_shape(weight.dtype)
    return torch.sparse.to_sparse_semi_structured(_pad_to(weight.contiguous(), rows, cols))


class SemiCache:
    """Compressed operands kept until their source changes (per optimizer step, not per micro-batch)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Tensor]] = {}

    def get(self, name: str, source: Tensor, make: Tensor | None = None) -> Tensor:
        """The compressed form of ``make`` (default ``source``), cached on ``source``'s storage and version."""
        key = (source.data_ptr(), source._version, source.dtype)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            hit = self._entries[name] = (key, compress(source if make is None else make))
        return hit[1]


def semi_structured_linear(x: Tensor, weight: Tensor | None = None, compressed: Tensor | None = None,
                           out_features: int | None = None) -> Tensor:
    """``y = x W^T`` on the 2:4 units. Give the dense 2:4 ``weight`` or its ``compressed`` form (then also
    ``out_features``). ``x`` may have any leading dimensions."""
    if compressed is None:
        compressed, out_features = compress(weight.to(x.dtype)), weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    cols = compressed.shape[1]
    rows_mult = _min_shape(x.dtype)[0]
    x2 = F.pad(x2, (0, cols - x2.shape[1], 0, -x2.shape[0] % rows_mult))
    y = F.linear(x2, compressed)[: x.numel() // x.shape[-1], :out_features]
    return y.reshape(*x.shape[:-1], out_features)


def semi_structured_dx(dy: Tensor, weight_bwd: Tensor | None = None, compressed_t: Tensor | None = None,
                       in_features: int | None = None) -> Tensor:
    """``dX = dY W_bwd`` on the 2:4 units, W_bwd 2:4 along its output axis: ``dX^T = (W_bwd^T) dY^T``. Give
    the dense ``weight_bwd`` or the compressed ``W_bwd^T`` (then also ``in_features``)."""
    if compressed_t is None:
        compressed_t, in_features = compress(weight_bwd.to(dy.dtype).t()), weight_bwd.shape[1]
    dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
    tokens = dy2.shape[0]
    dy2 = F.pad(dy2, (0, compressed_t.shape[1] - dy2.shape[1], 0, -tokens % _min_shape(dy.dtype)[1]))
    dx_t = torch.mm(compressed_t, dy2.t())  # (in, T)
    return dx_t[:in_features, :tokens].t().reshape(*dy.shape[:-1], in_features)
