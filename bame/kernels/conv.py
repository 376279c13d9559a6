"""N:M-sparse convolutions on NCHW data from compressed weights: forward, input gradient, and the weight
gradient at the kept slots only (stride 1, any kernel size, zero padding and dilation).

A kxk convolution is a sum over kernel positions of shifted 1x1 products. With the input's planes
zero-padded to ``Hp x Wp`` and read with a shift ``kh * d * Wp + kw * d``, every kept weight is one *term*
``(input channel, shift, value)`` of its output channel, and the products are bags and dots over whole
planes (:func:`bame.native.plane_bags`, :func:`bame.native.plane_dots`): each term is a vectorised
multiply-add over a plane, the output plane computed ``Wp`` wide (the ``Wp - Wo`` extra columns of each row
are never stored). The input gradient is the same bags over the output gradient's planes with the
transposed terms (per input channel, the output channels that keep it, shifted the other way).

All functions take ``values`` ``(K, N)`` and ``indices`` ``(K, N)`` in the block order of
:func:`bame.nm.to_blocks` with ``group_axis="cin"``: blocks of M input channels at each
``(out, kh, kw)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bame import native

__all__ = ["ConvGeometry", "conv_dw", "conv_dx", "conv_forward", "native_conv_problem"]

PLANE_TW = 64  # the kernels' position tile (bame/csrc: PLANE_TW): planes carry this many readable floats past P


def native_conv_problem(x: Tensor, stride: tuple[int, ...]) -> str | None:
    """Why the native convolution kernels cannot compute this layer's products, or None."""
    if tuple(stride) != (1, 1):
        return "strided convolution (the native kernels cover stride 1)"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"native kernels take float32 CPU tensors, not {x.dtype} on {x.device}"
    if not native.available():
        return f"native kernels unavailable: {native.unavailable_reason()}"
    return None


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of a stride-1 convolution on padded planes."""

    out: int
    cin: int
    kh: int
    kw: int
    height: int
    width: int
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def hp(self) -> int:
        return self.height + 2 * self.padding[0]

    @property
    def wp(self) -> int:
        return self.width + 2 * self.padding[1]

    @property
    def ho(self) -> int:
        return self.hp - self.dilation[0] * (self.kh - 1)

    @property
    def wo(self) -> int:
        return self.wp - self.dilation[1] * (self.kw - 1)

    @property
    def plane(self) -> int:
        """Floats between padded input planes: the plane, one extra row and the kernels' tile of slack."""
        return self.hp * self.wp + self.wp + PLANE_TW

    @property
    def max_shift(self) -> int:
        return self.dilation[0] * (self.kh - 1) * self.wp + self.dilation[1] * (self.kw - 1)


def terms(indices: Tensor, geo: ConvGeometry, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every slot as a term of its output channel: ``(input channel, shift, ptr)``; ``ptr`` ``(out + 1,)``."""
    n = indices.shape[1]
    idx = indices.long().view(geo.out, geo.kh, geo.kw, geo.cin // m, n)  # (O, kh, kw, C/M, N)
    channel = torch.arange(geo.cin // m, device=idx.device).view(1, 1, 1, -1, 1) * m + idx
    ih = torch.arange(geo.kh, device=idx.device).view(1, -1, 1, 1, 1) * geo.dilation[0]
    iw = torch.arange(geo.kw, device=idx.device).view(1, 1, -1, 1, 1) * geo.dilation[1]
    shift = (ih * geo.wp + iw).expand_as(idx)
    per_out = geo.kh * geo.kw * (geo.cin // m) * n
    ptr = torch.arange(geo.out + 1, device=idx.device) * per_out
    return channel.reshape(-1), shift.reshape(-1), ptr


def padded_planes(x: Tensor, geo: ConvGeometry) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, plane)``: zero-padded planes, flattened, with the kernels' slack."""
    return native.pad_planes(x, geo.plane, top=geo.padding[0], left=geo.padding[1], wp=geo.wp)


def conv_forward(x: Tensor, values: Tensor, indices: Tensor, geo: ConvGeometry, m: int,
                 planes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``y = conv(x, W)`` ``(B, O, Ho, Wo)`` from the compressed W; also returns the padded input planes."""
    planes = padded_planes(x, geo) if planes is None else planes
    row, shift, ptr = terms(indices, geo, m)
    y = x.new_empty(x.shape[0], geo.out, geo.ho, geo.wo)
    native.plane_bags(planes, geo.plane, geo.ho * geo.wp, geo.wp, geo.wo, row, shift, ptr,
                      values.reshape(-1).contiguous(), y, geo.ho * geo.wo, geo.wo)
    return y, planes


def _wide_rows(dy: Tensor, geo: ConvGeometry, front: int, length: int) -> Tensor:
    """``(B, O, Ho, Wo)`` -> ``(B, O, length)``: each plane widened to Wp with zero columns, flattened, with
    ``front`` zeros before it and zeros after it."""
    return native.pad_planes(dy, length, front=front, wp=geo.wp)


def conv_dx(dy: Tensor, values: Tensor, indices: Tensor, geo: ConvGeometry, m: int) -> Tensor:
    """``dX`` ``(B, C, H, W)``: the same bags over the output gradient's planes with the transposed terms."""
    row, shift, _ = terms(indices, geo, m)
    out_channel = torch.repeat_interleave(torch.arange(geo.out, device=row.device), row.numel() // geo.out)
    order = torch.argsort(row, stable=True)  # the terms of every input channel together
    counts = torch.bincount(row, minlength=geo.cin)
    ptr = torch.zeros(geo.cin + 1, dtype=torch.int64, device=row.device)
    ptr[1:] = torch.cumsum(counts, 0)
    front = geo.max_shift
    positions = geo.hp * geo.wp
    ld = front + positions + PLANE_TW
    rows = _wide_rows(dy, geo, front, ld)  # (B, O, ld): dY shifted so that every read is in bounds
    dx = dy.new_empty(dy.shape[0], geo.cin, geo.hp, geo.wp)
    native.plane_bags(rows, ld, positions, geo.wp, geo.wp, out_channel[order], front - shift[order], ptr,
                      values.reshape(-1)[order].contiguous(), dx, positions, geo.wp)
    p0, p1 = geo.padding
    return dx[:, :, p0:p0 + geo.height, p1:p1 + geo.width]


def conv_dw(dy: Tensor, planes: Tensor, indices: Tensor, geo: ConvGeometry, m: int) -> Tensor:
    """The weight gradient at the kept slots ``(K, N)``: for every term, the dot of its output channel's
    gradient plane with its shifted input plane, summed over the images."""
    row, shift, ptr = terms(indices, geo, m)
    positions = geo.ho * geo.wp
    ldd = -(-positions // PLANE_TW) * PLANE_TW
    d = _wide_rows(dy, geo, 0, ldd)  # (B, O, ldd), zeros past P
    return native.plane_dots(d, ldd, planes, geo.plane, positions, row, shift, ptr).view(indices.shape)


# -- choosing per layer: the native kernels or dense products, by timing them ----------------------------
@dataclass(frozen=True)
class ConvPlan:
    """Which formulation computes each product of one convolution (``"dense"`` or ``"native"``)."""

    fwd: str = "dense"
    dx: str = "dense"
    dw: str = "dense"
    reason: str = ""

    @property
    def is_dense(self) -> bool:
        return self.fwd == self.dx == self.dw == "dense"


_PLANS: dict[tuple, ConvPlan] = {}


def choose_conv_plan(geo: ConvGeometry, n: int, m: int, batch: int, dtype: torch.dtype, device: torch.device,
                     repeats: int = 5, margin: float = 1.1) -> ConvPlan:
    """Time the dense and the native form of each product on random data of this layer's shape and batch;
    keep the native one where it beats dense by ``margin`` (cached per shape, pattern and batch)."""
    from bame.kernels.plan import time_interleaved

    key = (geo, n, m, batch, dtype, str(device))
    if key in _PLANS:
        return _PLANS[key]
    head = f"{n}:{m} conv {geo.out}x{geo.cin}x{geo.kh}x{geo.kw} {geo.height}x{geo.width} B={batch}"
    problem = native_conv_problem(torch.empty(0, dtype=dtype, device=device), (1, 1))
    if problem is not None:
        _PLANS[key] = ConvPlan(reason=f"{head}: dense ({problem})")
        return _PLANS[key]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, geo.cin, geo.height, geo.width, generator=gen)
    k = geo.out * geo.kh * geo.kw * geo.cin // m
    indices = torch.rand(k, m, generator=gen).argsort(dim=1)[:, :n].sort(dim=1).values.to(torch.uint8)
    values = torch.randn(k, n, generator=gen)
    weight = torch.zeros(k, m).scatter_(1, indices.long(), values)
    weight = weight.view(geo.out, geo.kh, geo.kw, geo.cin).permute(0, 3, 1, 2).contiguous()
    y, planes = conv_forward(x, values, indices, geo, m)
    dy = torch.randn_like(y)
    conf = ([1, 1], list(geo.padding), list(geo.dilation), False, [0, 0], 1)
    with torch.no_grad():
        times = time_interleaved({
            "fwd dense": lambda: torch.nn.functional.conv2d(x, weight, None, 1, geo.padding, geo.dilation),
            "fwd native": lambda: conv_forward(x, values, indices, geo, m)[0],
            "dx dense": lambda: torch.ops.aten.convolution_backward(dy, x, weight, None, *conf, [True, False, False]),
            "dx native": lambda: conv_dx(dy, values, indices, geo, m),
            "dw dense": lambda: torch.ops.aten.convolution_backward(dy, x, weight, None, *conf, [False, True, False]),
            "dw native": lambda: conv_dw(dy, planes, indices, geo, m),
        }, torch.device("cpu"), repeats, 1)
    picks, parts = {}, []
    for product, label in (("fwd", "fwd"), ("dx", "dX"), ("dw", "dW")):
        dense, fast = times[f"{product} dense"], times[f"{product} native"]
        picks[product] = "native" if fast * margin < dense else "dense"
        parts.append(f"{label} native {dense / fast:.1f}x" if picks[product] == "native" else f"{label} dense")
    plan = ConvPlan(**picks, reason=f"{head}: " + (", ".join(parts) if any(v == "native" for v in picks.values())
                                                   else "dense is fastest"))
    _PLANS[key] = plan
    return plan
