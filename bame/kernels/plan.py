"""Per-layer choice of the fastest formulation of each product, by timing them on the layer's shape.

Whether a sparse formulation beats a dense GEMM depends on the shape, the pattern, the token count, the
dtype and the machine (at 2:4 on a CPU nothing beats MKL's GEMM; at 1:16 4096-wide gathers win), so it
is measured, never assumed: every candidate, dense included, runs interleaved on random data of that
shape, and the median time decides. Plans are cached per (shape, N:M, token bucket, dtype, device).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bame.kernels.linear import FORWARD, INPUT_GRAD, WEIGHT_GRAD, nm_linear
from bame.kernels.packed import Packed, check_nm, pack, unpack

__all__ = ["Plan", "choose_plan", "clear_plan_cache", "random_nm_mask", "time_interleaved", "tokens_bucket"]


@dataclass(frozen=True)
class Plan:
    """Which formulation computes each product of one layer.

    Attributes:
        fwd: a key of ``FORWARD`` (``y = x W^T``).
        dx: a key of ``INPUT_GRAD`` (``dX = dY W``).
        dw: a key of ``WEIGHT_GRAD`` (``dW`` at kept slots).
        tile: tokens per tile for the embedding_bag forms (0 = auto).
        reason: one line on why, e.g. ``"1:16 4096x4096 T=256: fwd embag 2.1x, dX embag 1.6x, dW dense"``.
        timings_ms: median milliseconds of every candidate, ``{"fwd": {"dense": 60.1, ...}, ...}``.
    """

    fwd: str = "dense"
    dx: str = "dense"
    dw: str = "dense"
    tile: int = 0
    reason: str = ""
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        """True when every product runs dense."""
        return self.fwd == self.dx == self.dw == "dense"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for layer reports)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The inverse of :meth:`to_dict`."""
        return cls(**d)


_CACHES: list[dict[tuple[Any, ...], Any]] = []


def plan_cache() -> dict[tuple[Any, ...], Any]:
    """A new cache of plans that :func:`clear_plan_cache` empties (one per planner: Linear, convolution)."""
    cache: dict[tuple[Any, ...], Any] = {}
    _CACHES.append(cache)
    return cache


_CACHE: dict[tuple[Any, ...], Plan] = plan_cache()


def clear_plan_cache() -> None:
    """Forget every cached plan, Linear and convolution (after a change of machine load, threads, ...)."""
    for cache in _CACHES:
        cache.clear()


def tokens_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at least 1): plans are shared within a bucket."""
    return 1 << max(int(tokens) - 1, 0).bit_length()


def random_nm_mask(out: int, in_: int, n: int, m: int, device: torch.device | str = "cpu") -> Tensor:
    """A random bool ``(out, in)`` mask with exactly ``n`` ones in every block of ``m`` along ``in``."""
    scores = torch.rand(out, in_ // m, m, device=device)
    idx = scores.topk(n, dim=-1).indices  # (out, in//m, n)
    mask = torch.zeros(out, in_ // m, m, dtype=torch.bool, device=device)
    return mask.scatter_(2, idx, True).view(out, in_)


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock time measures them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cands: dict[str, Callable[[], Tensor]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds of each candidate, run interleaved so that drifting load hits all alike."""
    names = list(cands)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            cands[k]()
            _sync(device)
            if r >= warmup:
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _working(cands: dict[str, Callable[[], Tensor]], ref: Tensor) -> dict[str, Callable[[], Tensor]]:
    """The candidates that run on this dtype/device and agree with the dense reference."""
    ok = {}
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    scale = ref.abs().max().item() + 1.0
    for name, fn in cands.items():
        try:
            got = fn()
        except (RuntimeError, NotImplementedError, ValueError):  # e.g. no CSR kernel for this dtype or device
            continue
        if got.shape == ref.shape and torch.allclose(got, ref, rtol=tol, atol=tol * scale):
            ok[name] = fn
    return ok


def _pick(times: dict[str, float], margin: float) -> str:
    """The fastest candidate, but dense unless a sparse one beats it by ``margin`` (noise is not a win)."""
    best = min(times, key=times.__getitem__)
    return best if times[best] * margin < times["dense"] else "dense"


def _reason(head: str, picks: dict[str, str], timings: dict[str, dict[str, float]]) -> str:
    """``"<head>: fwd embag 2.1x, dX dense, dW sampled 1.3x"`` or ``"<head>: dense is fastest"``."""
    if all(v == "dense" for v in picks.values()):
        return f"{head}: dense is fastest"
    parts = []
    for product, label in (("fwd", "fwd"), ("dx", "dX"), ("dw", "dW")):
        name, t = picks[product], timings[product]
        parts.append(f"{label} dense" if name == "dense" else f"{label} {name} {t['dense'] / t[name]:.1f}x")
    return f"{head}: " + ", ".join(parts)


def choose_plan(
    out: int,
    in_: int,
    n: int,
    m: int,
    batch_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    margin: float = 1.1,
    use_cache: bool = True,
    layer_timer: Callable[..., dict[str, float]] | None = None,
) -> Plan:
    """Time every formulation of the three products on random data of this shape; keep the fastest of each.

    Args:
        out: output features.
        in_: input features (a multiple of ``m``).
        n: kept entries per block.
        m: block size.
        batch_tokens: rows of the flattened input per step; timed at :func:`tokens_bucket` of it.
        dtype: compute dtype.
        device: where the layer runs.
        repeats: timed runs per candidate (median taken).
        warmup: untimed runs per candidate first.
        margin: a sparse form must be this many times faster than dense to be chosen.
        use_cache: reuse / store the plan for this key.
        layer_timer: times the whole layer step the picks are checked with, ``(plan, packed, x, dy, device,
            repeats, warmup) -> {"dense": ms, "sparse": ms}``; default: a masked dense weight whose gradient
            is a dense tensor (``kernel="sparse"`` with dense storage). Compressed storage passes its own
            (the values alone: the gradient of the kept values only).

    Returns:
        The :class:`Plan`, with per-candidate median timings and a reason string.
    """
    check_nm((out, in_), n, m)
    device = torch.device(device)
    tokens = tokens_bucket(batch_tokens)
    timer = _time_layer if layer_timer is None else layer_timer
    key = (out, in_, n, m, tokens, dtype, str(device), timer.__qualname__)
    if use_cache and key in _CACHE:
        return _CACHE[key]
    packed = pack(
        torch.randn(out, in_, dtype=dtype, device=device), random_nm_mask(out, in_, n, m, device), n, m
    )
    packed.transposed()  # structure is built once per mask update, not per step: keep it out of the timings
    x = torch.randn(tokens, in_, dtype=dtype, device=device)  # (T, in)
    dy = torch.randn(tokens, out, dtype=dtype, device=device)  # (T, out)
    timings = {
        "fwd": _measure({k: _bind(f, x, packed) for k, f in FORWARD.items()}, device, repeats, warmup),
        "dx": _measure({k: _bind(f, dy, packed) for k, f in INPUT_GRAD.items()}, device, repeats, warmup),
        "dw": _measure(
            {k: _bind_w(f, dy, x, packed) for k, f in WEIGHT_GRAD.items()}, device, repeats, warmup
        ),
    }
    picks = {product: _pick(t, margin) for product, t in timings.items()}
    head = f"{n}:{m} {out}x{in_} T={tokens}"
    reason = _reason(head, picks, timings)
    # The sparse path has fixed costs of its own (a gather of the values, transposed copies of x and dY, a
    # dense gradient to fill): unless the picks save `margin` on the whole layer, the module's own dense
    # product is faster. A cheap test on the products' sum first, then the layer's forward + backward as it
    # will run, timed against the plain dense layer.
    dense_total = sum(t["dense"] for t in timings.values())
    picked_total = sum(timings[product][name] for product, name in picks.items())
    if any(v != "dense" for v in picks.values()):
        if picked_total * margin >= dense_total:
            reason = f"{head}: dense (the sparse products would save {1 - picked_total / dense_total:.0%} of the layer)"
            picks = dict.fromkeys(picks, "dense")
        else:
            layer = timer(Plan(**picks), packed, x, dy, device, repeats, warmup)
            timings["layer"] = layer
            if layer["sparse"] * margin >= layer["dense"]:
                reason = (f"{head}: dense (the sparse layer step, {reason.split(': ', 1)[1]}, "
                          f"ran at {layer['dense'] / layer['sparse']:.2f}x)")
                picks = dict.fromkeys(picks, "dense")
            else:
                reason += f"; layer {layer['dense'] / layer['sparse']:.1f}x"
    plan = Plan(**picks, tile=0, reason=reason, timings_ms=timings)
    if use_cache:
        _CACHE[key] = plan
    return plan


def _time_layer(
    plan: Plan, packed: Packed, x: Tensor, dy: Tensor, device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median ms of a whole layer step (forward and backward to x and W) on the masked weight: plain
    ``F.linear`` (``"dense"``) against :func:`nm_linear` with ``plan`` (``"sparse"``)."""
    w = unpack(packed).requires_grad_()  # (out, in), W*B
    xg = x.detach().requires_grad_()

    def run(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def step() -> Tensor:
            w.grad = xg.grad = None
            fn().backward(dy)
            return w.grad

        return step

    return time_interleaved(
        {"dense": run(lambda: F.linear(xg, w)),
         "sparse": run(lambda: nm_linear(xg, w, packed, None, None, plan, False, True))},
        device, repeats, warmup,
    )


def _bind(fn: Callable[[Tensor, Packed, int], Tensor], a: Tensor, packed: Packed) -> Callable[[], Tensor]:
    """A no-argument closure running ``fn(a, packed)`` (the product's tile resolves automatically)."""
    return lambda: fn(a, packed, 0)


def _bind_w(
    fn: Callable[[Tensor, Tensor, Packed], Tensor], dy: Tensor, x: Tensor, packed: Packed
) -> Callable[[], Tensor]:
    """A no-argument closure running the weight-gradient formulation ``fn(dy, x, packed)``."""
    return lambda: fn(dy, x, packed)


def _measure(
    cands: dict[str, Callable[[], Tensor]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Validate against the dense candidate, then time the ones that work (dense always among them)."""
    with torch.no_grad():
        ok = _working(cands, cands["dense"]())
        ok["dense"] = cands["dense"]
        return time_interleaved(ok, device, repeats, warmup)
