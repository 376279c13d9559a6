"""N:M-sparse convolutions on NCHW data from compressed weights: forward, input gradient, and the weight
gradient at the kept slots only (any kernel size, stride, padding and dilation).

A kxk convolution is a sum over kernel taps of shifted 1x1 products. The native kernels
(:func:`bame.native.conv_bags`, :func:`bame.native.conv_dots`) copy a chunk of images, channel by channel,
into one tall zero-padded plane in cache (:class:`Stacking`: rows ``wp`` floats wide, ``sh`` rows per
image, the zero columns and rows shared by neighbouring rows and images), where every kept weight is one
*term* ``(input plane, flat shift, value)`` of its output channel: each term is a vectorised multiply-add
over the chunk's positions, stored straight into the NCHW output. The input gradient is the same bags over
the output gradient's planes with the transposed terms (per input channel, the output channels that keep
it, shifted the other way); the weight gradient is, per term, the dot of its output channel's gradient with
its shifted input plane.

A stride-s convolution is a stride-1 one over the s x s *phases* of its input (``x[c, s i + a, s j + b]``:
tap ``k`` of a dimension reads phase ``(k d - p) mod s`` at offset ``floor((k d - p) / s)``), so every
stride takes the same kernels: the input is split into ``C s^2`` phase planes first, and the input
gradient comes out as phase planes, interleaved back.

All functions take ``values`` ``(K, N)`` and ``indices`` ``(K, N)`` in the block order of
:func:`bame.nm.to_blocks` with ``group_axis="cin"``: blocks of M input channels at each
``(out, kh, kw)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bame import native
from bame.kernels.plan import plan_cache

__all__ = ["ConvGeometry", "ConvTerms", "Stacking", "conv_dw", "conv_dx", "conv_forward", "conv_terms",
           "native_conv_problem"]

#: Bytes of stacked planes per chunk of images: with the chunk's outputs they stay in a 1 MiB L2.
SCRATCH_BYTES = 384 << 10
#: Partial sums of the weight gradient per batch (each one chunk of images, added in a fixed order): few
#: enough that their fixed cost (a horizontal sum per slot) is small, enough to keep the threads busy.
WEIGHT_GRAD_PARTS = 8


def native_conv_problem(x: Tensor, stride: tuple[int, ...]) -> str | None:
    """Why the native convolution kernels cannot compute this layer's products, or None (they take any
    stride: ``stride`` is checked to be positive)."""
    if min(stride) < 1:
        return f"stride {tuple(stride)}"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"native kernels take float32 CPU tensors, not {x.dtype} on {x.device}"
    if not native.available():
        return f"native kernels unavailable: {native.unavailable_reason()}"
    return None


@dataclass(frozen=True)
class Stacking:
    """Planes ``height x width`` stacked for a stride-1 product to ``ho x wo`` planes in which output
    ``(i, j)`` reads input ``(i + e_h - padding[0], j + e_w - padding[1])`` for tap offsets ``0 <= e <= reach``
    (``padding >= 0``; inputs out of range are zero).

    Image j's row h sits at row ``padding[0] + j * sh + h``, its column w at ``padding[1] + w``, rows ``wp``
    floats wide, zeros elsewhere. The zero columns after a row are the padding before the next one, the zero
    rows after an image the padding above the next one, so a tap is one flat shift ``e_h * wp + e_w`` and
    output row i of image j is grid row ``j * sh + i``.
    """

    height: int
    width: int
    ho: int
    wo: int
    padding: tuple[int, int]
    reach: tuple[int, int]

    @property
    def sh(self) -> int:
        """Rows per image: the plane, then zero rows for the reads below it and above the next image, and
        for output rows beyond the input's."""
        p, r = self.padding[0], self.reach[0]
        return self.height + max(p, self.ho + r - p - self.height, self.ho - self.height, 0)

    @property
    def wp(self) -> int:
        """Floats per row, likewise."""
        p, r = self.padding[1], self.reach[1]
        return self.width + max(p, self.wo + r - p - self.width, self.wo - self.width, 0)

    def shift(self, e_h: int, e_w: int) -> int:
        """The flat shift of tap offsets ``(e_h, e_w)``."""
        return e_h * self.wp + e_w

    def geo(self, batch: int, channels: int, per_image: int, maxshift: int, parts: int = 0) -> tuple[int, ...]:
        """The kernels' ``geo`` (:data:`bame.native.CONV_GEO`). ``per_image``: scratch planes per image (the
        stacked input channels, plus the gradient's for the weight gradient); ``parts``: the number of
        partial sums the images are split into (the weight gradient; 0: one per chunk)."""
        images = max(1, min(batch, SCRATCH_BYTES // (4 * per_image * self.sh * self.wp)))
        per_part = images
        if parts:  # whole chunks per partial sum, about batch / parts images
            per_part = images * max(1, -(-batch // parts) // images)
        return (batch, channels, self.height, self.width, self.ho, self.wo, self.padding[0], self.padding[1],
                self.sh, self.wp, images, maxshift, per_part)


def _taps(k: int, d: int, p: int, s: int) -> tuple[list[int], list[int]]:
    """Per tap of one dimension: the input phase it reads and its offset in phase rows."""
    return [(i * d - p) % s for i in range(k)], [(i * d - p) // s for i in range(k)]


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of a convolution (zero padding; ``stride`` splits the input into phases)."""

    out: int
    cin: int
    kh: int
    kw: int
    height: int
    width: int
    padding: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int] = (1, 1)

    @property
    def ho(self) -> int:
        return (self.height + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def wo(self) -> int:
        return (self.width + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def phases(self) -> int:
        return self.stride[0] * self.stride[1]

    @property
    def hph(self) -> int:
        """Rows of a phase plane (the input's own for stride 1)."""
        return -(-self.height // self.stride[0])

    @property
    def wph(self) -> int:
        return -(-self.width // self.stride[1])

    def taps(self, axis: int) -> tuple[list[int], list[int]]:
        """Phase and offset of every tap along ``axis`` (0: rows, 1: columns)."""
        k = (self.kh, self.kw)[axis]
        return _taps(k, self.dilation[axis], self.padding[axis], self.stride[axis])

    @property
    def forward_stacking(self) -> Stacking:
        """The input's phase planes for the forward and the weight gradient: tap offset ``delta + P``."""
        pad = tuple(-min(self.taps(a)[1]) for a in (0, 1))
        reach = tuple(max(self.taps(a)[1]) + pad[a] for a in (0, 1))
        return Stacking(self.hph, self.wph, self.ho, self.wo, pad, reach)

    @property
    def backward_stacking(self) -> Stacking:
        """The output gradient's planes for the input gradient (its phase planes): tap offset ``P - delta``."""
        pad = tuple(max(0, max(self.taps(a)[1])) for a in (0, 1))
        reach = tuple(pad[a] - min(self.taps(a)[1]) for a in (0, 1))
        return Stacking(self.ho, self.wo, self.hph, self.wph, pad, reach)


def phases(x: Tensor, geo: ConvGeometry) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C s_h s_w, hph, wph)``: plane ``c s_h s_w + a s_w + b`` is ``x[c, a::s_h, b::s_w]``
    (zero-filled to whole phase rows); stride 1: ``x`` itself."""
    if geo.phases == 1:
        return x
    (sh, sw), b, c = geo.stride, x.shape[0], x.shape[1]
    if geo.hph * sh != geo.height or geo.wph * sw != geo.width:
        x = F.pad(x, (0, geo.wph * sw - geo.width, 0, geo.hph * sh - geo.height))
    return x.view(b, c, geo.hph, sh, geo.wph, sw).permute(0, 1, 3, 5, 2, 4).reshape(b, c * geo.phases, geo.hph, geo.wph)


def unphase(d: Tensor, geo: ConvGeometry) -> Tensor:
    """The inverse of :func:`phases`: ``(B, C s_h s_w, hph, wph)`` -> ``(B, C, H, W)``."""
    if geo.phases == 1:
        return d
    (sh, sw), b = geo.stride, d.shape[0]
    full = d.view(b, geo.cin, sh, sw, geo.hph, geo.wph).permute(0, 1, 4, 2, 5, 3)
    return full.reshape(b, geo.cin, geo.hph * sh, geo.wph * sw)[:, :, :geo.height, :geo.width].contiguous()


def _terms(indices: Tensor, geo: ConvGeometry, m: int, backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Every slot as a term of its output channel: ``(input plane, shift, ptr)``, ``ptr`` ``(out + 1,)``;
    the shifts on the forward stacking, or the input gradient's (``backward``)."""
    n = indices.shape[1]
    idx = indices.long().view(geo.out, geo.kh, geo.kw, geo.cin // m, n)  # (O, kh, kw, C/M, N)
    (ph_h, dl_h), (ph_w, dl_w) = geo.taps(0), geo.taps(1)
    stack = geo.backward_stacking if backward else geo.forward_stacking
    phase = torch.tensor([[a * geo.stride[1] + b for b in ph_w] for a in ph_h])  # (kh, kw)
    if backward:
        e_h, e_w = [stack.padding[0] - d for d in dl_h], [stack.padding[1] - d for d in dl_w]
    else:
        e_h, e_w = [d + stack.padding[0] for d in dl_h], [d + stack.padding[1] for d in dl_w]
    shift = torch.tensor([[stack.shift(a, b) for b in e_w] for a in e_h])  # (kh, kw)
    channel = torch.arange(geo.cin // m).view(1, 1, 1, -1, 1) * m + idx
    plane = channel * geo.phases + phase.view(1, geo.kh, geo.kw, 1, 1)
    ptr = torch.arange(geo.out + 1) * (geo.kh * geo.kw * (geo.cin // m) * n)
    return plane.reshape(-1), shift.view(1, geo.kh, geo.kw, 1, 1).expand_as(idx).reshape(-1), ptr


@dataclass(frozen=True)
class ConvTerms:
    """A layer's slots as the kernels' terms (they change only with the slots: callers cache them).

    Attributes:
        row, shift, ptr: the forward's and the weight gradient's terms: input plane and shift of every slot
            (``(nnz,)``, slot order), ``ptr`` ``(out + 1,)`` the slots of every output channel.
        t_row, t_shift, t_ptr, order: the input gradient's: the slots ``order`` (``(nnz,)``) grouped by input
            plane (``t_ptr`` ``(planes + 1,)``), each with its output channel and its shift.
        maxshift, t_maxshift: the largest shift of each.
    """

    row: Tensor
    shift: Tensor
    ptr: Tensor
    t_row: Tensor
    t_shift: Tensor
    t_ptr: Tensor
    order: Tensor
    maxshift: int
    t_maxshift: int


def conv_terms(indices: Tensor, geo: ConvGeometry, m: int) -> ConvTerms:
    """The terms of every product of a layer with slot positions ``indices`` ``(K, N)``."""
    row, shift, ptr = _terms(indices, geo, m, backward=False)
    _, t_shift, _ = _terms(indices, geo, m, backward=True)
    order = torch.argsort(row, stable=True)  # the slots of every input plane together
    t_ptr = torch.zeros(geo.cin * geo.phases + 1, dtype=torch.int64)
    t_ptr[1:] = torch.cumsum(torch.bincount(row, minlength=geo.cin * geo.phases), 0)
    out_channel = torch.arange(geo.out).repeat_interleave(row.numel() // geo.out)
    return ConvTerms(row, shift, ptr, out_channel[order].contiguous(), t_shift[order].contiguous(), t_ptr, order,
                     int(shift.max()) if shift.numel() else 0, int(t_shift.max()) if t_shift.numel() else 0)


def conv_forward(x: Tensor, values: Tensor, indices: Tensor, geo: ConvGeometry, m: int,
                 terms: ConvTerms | None = None) -> Tensor:
    """``y = conv(x, W)`` ``(B, O, Ho, Wo)`` from the compressed W (``terms``: :func:`conv_terms`, if cached)."""
    t = conv_terms(indices, geo, m) if terms is None else terms
    planes = geo.cin * geo.phases
    g = geo.forward_stacking.geo(x.shape[0], planes, planes, t.maxshift)
    return native.conv_bags(phases(x, geo), g, t.row, t.shift, t.ptr, values.reshape(-1))


def conv_dx(dy: Tensor, values: Tensor, indices: Tensor, geo: ConvGeometry, m: int,
            terms: ConvTerms | None = None) -> Tensor:
    """``dX`` ``(B, C, H, W)``: the bags over the output gradient's planes with the transposed terms."""
    t = conv_terms(indices, geo, m) if terms is None else terms
    g = geo.backward_stacking.geo(dy.shape[0], geo.out, geo.out, t.t_maxshift)
    return unphase(native.conv_bags(dy, g, t.t_row, t.t_shift, t.t_ptr, values.reshape(-1)[t.order]), geo)


def conv_dw(dy: Tensor, x: Tensor, indices: Tensor, geo: ConvGeometry, m: int,
            terms: ConvTerms | None = None) -> Tensor:
    """The weight gradient at the kept slots ``(K, N)``: for every term, the dot of its output channel's
    gradient with its shifted input plane, summed over the images (in a fixed order)."""
    t = conv_terms(indices, geo, m) if terms is None else terms
    planes = geo.cin * geo.phases
    g = geo.forward_stacking.geo(x.shape[0], planes, planes + geo.out, t.maxshift, WEIGHT_GRAD_PARTS)
    return native.conv_dots(dy, phases(x, geo), g, t.row, t.shift, t.ptr).view(indices.shape)


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


_PLANS: dict[tuple, ConvPlan] = plan_cache()


def choose_conv_plan(geo: ConvGeometry, n: int, m: int, batch: int, dtype: torch.dtype, device: torch.device,
                     repeats: int = 5, margin: float = 1.1) -> ConvPlan:
    """Time the dense and the native form of each product on random data of this layer's shape and batch;
    keep the native one where it beats dense by ``margin`` (cached per shape, pattern and batch)."""
    from bame.kernels.plan import time_interleaved

    key = (geo, n, m, batch, dtype, str(device))
    if key in _PLANS:
        return _PLANS[key]
    stride = "" if geo.stride == (1, 1) else f" stride {geo.stride[0]}"
    head = f"{n}:{m} conv {geo.out}x{geo.cin}x{geo.kh}x{geo.kw}{stride} {geo.height}x{geo.width} B={batch}"
    problem = native_conv_problem(torch.empty(0, dtype=dtype, device=device), geo.stride)
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
    terms = conv_terms(indices, geo, m)  # cached by the layer: the timing leaves it out
    y = conv_forward(x, values, indices, geo, m, terms)
    dy = torch.randn_like(y)
    conf = (list(geo.stride), list(geo.padding), list(geo.dilation), False, [0, 0], 1)
    with torch.no_grad():
        times = time_interleaved({
            "fwd dense": lambda: torch.nn.functional.conv2d(x, weight, None, geo.stride, geo.padding, geo.dilation),
            "fwd native": lambda: conv_forward(x, values, indices, geo, m, terms),
            "dx dense": lambda: torch.ops.aten.convolution_backward(dy, x, weight, None, *conf, [True, False, False]),
            "dx native": lambda: conv_dx(dy, values, indices, geo, m, terms),
            "dw dense": lambda: torch.ops.aten.convolution_backward(dy, x, weight, None, *conf, [False, True, False]),
            "dw native": lambda: conv_dw(dy, x, indices, geo, m, terms),
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
