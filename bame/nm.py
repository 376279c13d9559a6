"""N:M blocks: the block view of a weight, the top-N kernel, and N:M checks.

Every mask computation in bame runs on a 2-D block view ``[K, M]`` of a weight (SPEC section 1):

* ``group_axis="cin"`` (default): M consecutive input channels at a fixed output and kernel position.
  A conv weight ``[out, cin, kh, kw]`` is viewed as ``[out, kh, kw, cin]`` and cut into rows of M along
  ``cin``; a Linear weight ``[out, in]`` is cut along ``in``. This is the layout of SR-STE, ASP, TensorRT
  and the sparse tensor cores.
* ``group_axis="kflat"``: M consecutive entries of the row-major ``[out, cin*kh*kw]`` matrix (the
  layout of the Bi-Mask code).
* ``group_axis="out"``: M consecutive output channels at a fixed input position. It is the layout of
  the *transposed* weight used by the input gradient, and serves bi-directional (backward) masks.

All functions here are pure and vectorised over blocks. Every selection orders scores the same way
(:func:`sorted_blocks`): by value, ties to the lower index, NaN above every number, -0.0 equal to +0.0.
The selection family serves every method and the export and packing code:

* :func:`topn_mask` / :func:`keep_top`: the top-k of every block (one budget, or one per block);
* :func:`ranks`: each entry's rank within its block;
* :func:`drop_grow`: per block, drop the smallest kept entries and grow the best of the others;
* :func:`smallest_per_block`: a layer-wide budget of smallest kept entries, counted per block;
* :func:`kept_indices`: the in-block positions of the kept entries (compressed storage, export).
"""

from __future__ import annotations

import math
import re

import torch

from bame import native
from bame.errors import ConfigError

GROUP_AXES = ("cin", "kflat")
_ALL_AXES = ("cin", "kflat", "out")
_PAIRWISE_MAX_M = 4  # up to this block size a round robin of comparisons beats argmax passes and sorts
_ARGMAX_MAX_N = 4  # above this a stable sort of each block is faster than N argmax passes
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(nm: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse and validate an N:M pattern such as ``"2:4"`` or ``(1, 16)``.

    Raises:
        ConfigError: unless N and M are integers with 0 < N < M.
    """
    if isinstance(nm, str):
        match = _NM_RE.match(nm)
        if match is None:
            raise ConfigError(f"invalid N:M pattern {nm!r}: expected two integers like '2:4' or '1:16'")
        n, m = int(match.group(1)), int(match.group(2))
    elif isinstance(nm, (tuple, list)) and len(nm) == 2 and all(isinstance(v, int) for v in nm):
        n, m = int(nm[0]), int(nm[1])
    else:
        raise ConfigError(f"invalid N:M pattern {nm!r}: expected two integers like '2:4' or '1:16'")
    if not 0 < n < m:
        raise ConfigError(f"invalid N:M pattern {n}:{m}: need 0 < N < M")
    return n, m


def format_nm(n: int, m: int) -> str:
    """``(2, 4) -> "2:4"``."""
    return f"{n}:{m}"


def axis_length(shape: torch.Size | tuple[int, ...], group_axis: str) -> int:
    """Length of the axis along which blocks of M are cut."""
    _check_axis(group_axis)
    if group_axis == "cin":
        return int(shape[1])
    if group_axis == "kflat":
        return int(math.prod(shape[1:]))
    return int(shape[0])


def blocking_problem(shape: torch.Size | tuple[int, ...], m: int, group_axis: str) -> str | None:
    """Why a weight of this shape cannot be cut into blocks of M, or None if it can."""
    if len(shape) < 2:
        return f"weight of shape {tuple(shape)} has no input axis"
    length = axis_length(shape, group_axis)
    if length % m != 0:
        name = {"cin": "input channels", "kflat": "cin*kh*kw", "out": "output channels"}[group_axis]
        return f"{name}={length} not divisible by M={m}"
    return None


def to_blocks(weight: torch.Tensor, m: int, group_axis: str = "cin") -> torch.Tensor:
    """View a weight as its ``[K, M]`` block matrix.

    Args:
        weight: a Linear ``[out, in]`` or conv ``[out, cin, *kernel]`` weight (or a mask of that shape).
        m: block size M.
        group_axis: ``"cin"``, ``"kflat"`` or ``"out"`` (see the module docstring).

    Returns:
        ``[K, M]`` with K = numel / M; row k is the k-th block. A copy when the layout needs a permute.
    """
    problem = blocking_problem(weight.shape, m, group_axis)
    if problem is not None:
        raise ConfigError(f"cannot cut a weight of shape {tuple(weight.shape)} into blocks: {problem}")
    if group_axis == "cin":
        return weight.movedim(1, -1).reshape(-1, m)  # [out, *kernel, cin] -> (K, M)
    if group_axis == "kflat":
        return weight.reshape(-1, m)  # row-major [out, cin*kh*kw] -> (K, M)
    return weight.movedim(0, -1).reshape(-1, m)  # [cin, *kernel, out] -> (K, M)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...], group_axis: str = "cin") -> torch.Tensor:
    """Inverse of :func:`to_blocks`: put a ``[K, M]`` block matrix back into the weight's shape."""
    _check_axis(group_axis)
    shape = tuple(shape)
    if group_axis == "cin":
        permuted = (shape[0], *shape[2:], shape[1])
        return blocks.reshape(permuted).movedim(-1, 1)
    if group_axis == "kflat":
        return blocks.reshape(shape)
    permuted = (*shape[1:], shape[0])
    return blocks.reshape(permuted).movedim(-1, 0)


def topn_mask(scores: torch.Tensor, n: int, magnitude: bool = False) -> torch.Tensor:
    """Keep the N largest scores of every block.

    Ties break towards the lower index within the block, deterministically (a stable descending sort
    keeps equal scores in index order). NaN scores sort as the largest values; -0.0 equals +0.0.

    Args:
        scores: ``(K, M)`` block scores.
        n: entries to keep per block, 0 <= n <= M.
        magnitude: rank ``|scores|`` instead.

    Returns:
        bool ``(K, M)`` with exactly n True per row.
    """
    k, m = scores.shape
    if not 0 <= n <= m:
        raise ValueError(f"cannot keep {n} of {m} entries per block")
    mask = torch.zeros((k, m), dtype=torch.bool, device=scores.device)
    if n == m:
        return mask.fill_(True)
    if n == 0:
        return mask
    fast = _native_topn(scores.unsqueeze(-1), n, magnitude)  # (K, M, 1): contiguous iff scores is
    if fast is not None:
        return fast.view(k, m)
    if magnitude:
        scores = scores.abs()
    if scores.device.type != "cpu":  # one sort: no data-dependent branch, so no host sync on an accelerator
        return mask.scatter_(-1, sorted_blocks(scores).indices[:, :n], True)
    if m <= _PAIRWISE_MAX_M and _no_nan(scores):
        return _topn_round_robin(scores.unsqueeze(-1), n).squeeze(-1)
    if n <= _ARGMAX_MAX_N and scores.is_floating_point() and not torch.isneginf(scores).any():
        # n passes of argmax (which returns the first maximum, so ties go to the lower index) beat a
        # sort of every block for the small N of N:M patterns; -inf marks the entries already taken.
        work = scores.clone()
        for _ in range(n):
            pick = work.argmax(dim=-1, keepdim=True)  # (K, 1)
            mask.scatter_(-1, pick, True)
            work.scatter_(-1, pick, float("-inf"))
        return mask
    order = sorted_blocks(scores).indices  # (K, M)
    return mask.scatter_(-1, order[:, :n], True)


def sorted_blocks(scores: torch.Tensor, descending: bool = True) -> torch.return_types.sort:
    """Each row of ``(K, M)`` scores sorted: the one ordering every selection uses (ties keep index order,
    NaN sorts as the largest value)."""
    return torch.sort(scores, dim=-1, descending=descending, stable=True)


def ranks(scores: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """The rank (0 = first) of every entry within its row of ``(K, M)`` scores, int64 ``(K, M)``.

    Descending: the largest score has rank 0; ascending: the smallest. Ties go to the lower index.
    """
    order = sorted_blocks(scores, descending).indices  # (K, M)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def keep_top(scores: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """The ``keep`` largest scores of every block, bool ``(K, M)``; ``keep`` is one int or ``(K,)`` budgets."""
    if isinstance(keep, int):
        return topn_mask(scores, keep)
    return ranks(scores) < keep.view(-1, 1)


def drop_grow(
    mask_blocks: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Per block k, ``counts[k]`` kept entries give way to ``counts[k]`` others (RigL's drop and grow).

    The kept entries with the smallest ``drop_scores`` are dropped; then the largest ``grow_scores`` among
    the pruned entries *and the dropped ones* (a dropped entry may win its place back) are grown. Every
    block keeps its count of kept entries.

    Args:
        mask_blocks: ``(K, M)`` current mask.
        drop_scores: ``(K, M)``; the smallest kept ones are dropped.
        grow_scores: ``(K, M)``; the largest eligible ones are grown.
        counts: ``(K,)`` swaps per block, at most the block's kept and pruned counts.

    Returns:
        bool ``(K, M)``.
    """
    old = mask_blocks.bool()
    counts = counts.view(-1, 1)
    drop = ranks(torch.where(old, drop_scores, math.inf), descending=False) < counts  # (K, M)
    eligible = ~old | drop
    grow = ranks(torch.where(eligible, grow_scores, -math.inf)) < counts  # (K, M)
    return (old & ~drop) | grow


def smallest_per_block(scores: torch.Tensor, mask_blocks: torch.Tensor, cap: int, total: int) -> torch.Tensor:
    """Where a layer's ``total`` smallest kept scores lie, counting at most ``cap`` per block: ``(K,)`` int64.

    Each block offers its ``cap`` smallest kept scores; the ``total`` smallest offers of the whole layer are
    taken (ties: the lower block, then the lower rank within the block).
    """
    k = scores.shape[0]
    offers = sorted_blocks(torch.where(mask_blocks.bool(), scores, math.inf), descending=False).values[:, :cap]
    chosen = sorted_blocks(offers.reshape(1, -1), descending=False).indices[0, :total]  # block-major order
    return torch.bincount(chosen // cap, minlength=k)


def kept_indices(mask_blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The in-block positions of every block's kept entries, ascending, ``(K, n)`` int64.

    A block with fewer than n kept entries is padded with its lowest unused positions (so the structure
    stays regular: a compressed weight holds zero there).
    """
    keep = mask_blocks.bool().to(torch.uint8)  # (K, M)
    first = sorted_blocks(keep).indices[:, :n]  # kept entries first, each group in index order
    return first.sort(dim=-1).values


def _native_topn(scores: torch.Tensor, n: int, magnitude: bool) -> torch.Tensor | None:
    """The native kernel's top-N of a float32 CPU ``(G, M, R)`` tensor (the same selection), or None where
    it does not apply (see :func:`bame.native.ready`)."""
    if not native.ready(scores, m=scores.shape[1]):
        return None
    return native.topn_mask(scores, n, magnitude)


def _no_nan(scores: torch.Tensor) -> bool:
    """True when no score is NaN. Conservative and cheap: one sum (a NaN, or inf - inf, makes it NaN)."""
    return not (scores.is_floating_point() and bool(torch.isnan(scores.sum())))


def topn_mask_grouped(scores: torch.Tensor, n: int, magnitude: bool = False) -> torch.Tensor:
    """Keep the N largest of every group along dim 1 of a ``(G, M, R)`` score tensor, ties to the lower index.

    The same selection as :func:`topn_mask` on the ``(G*R, M)`` blocks ``scores.movedim(1, -1)``, without
    that copy: groups of M consecutive output channels of an ``[out, rest]`` weight are its
    ``(out/M, M, rest)`` view. With ``magnitude``, ``|scores|`` is ranked.

    Returns:
        bool ``(G, M, R)``, contiguous, exactly N True along dim 1.
    """
    g, m, r = scores.shape
    if 0 < n < m:
        fast = _native_topn(scores, n, magnitude)
        if fast is not None:
            return fast
    if magnitude:
        scores = scores.abs()
    if m <= _PAIRWISE_MAX_M and 0 < n < m and scores.device.type == "cpu" and _no_nan(scores):
        return _topn_round_robin(scores, n)
    return topn_mask(scores.movedim(1, -1).reshape(-1, m), n).view(g, r, m).movedim(-1, 1).contiguous()


def _topn_round_robin(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Top-N along dim 1 of ``(G, M, R)`` for small M: keep the entries beaten by fewer than N others.

    Entry j beats entry i when its score is larger, or equal with a lower index: a strict total order
    without NaNs, so exactly N entries per group have fewer than N defeats. M*(M-1)/2 comparisons of
    ``(G, R)`` slices, about 3x faster than N argmax passes at 2:4 for millions of blocks.
    """
    g, m, r = scores.shape
    # defeats[j] = #{i < j: i beats j} + #{i > j: i beats j} = j - #{i < j: j beats i} + #{i > j: ...}.
    # Bytes with wrap-around arithmetic (every true count is below m <= 4): no widening conversions.
    defeats = torch.zeros((m, g, r), dtype=torch.uint8, device=scores.device)  # (M, G, R): contiguous rows
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = torch.gt(scores[:, j], scores[:, i]).view(torch.uint8)  # (G, R); a tie goes to i
            defeats[i] += j_wins
            defeats[j] -= j_wins
    defeats += torch.arange(m, dtype=torch.uint8, device=scores.device).view(m, 1, 1)
    return (defeats < n).movedim(0, 1).contiguous()


def block_flips(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """SAD per block: how many entries differ between two ``(K, M)`` masks, int32 ``(K,)``.

    Column by column (``M`` XORs of ``(K,)`` bool columns, summed as bytes when ``M < 256``): several
    times faster than ``(old != new).sum(-1)``, which widens every entry to int64 first.
    """
    old, new = old.bool(), new.bool()
    m = old.shape[-1]
    if native.ready(masks=(old, new)):
        return native.block_flips(old, new)
    if m > 16:
        return (old != new).sum(dim=-1, dtype=torch.int32)
    acc = torch.zeros(old.shape[0], dtype=torch.uint8, device=old.device)  # (K,) counts <= 16
    for j in range(m):
        acc += torch.bitwise_xor(old[:, j], new[:, j]).view(torch.uint8)
    return acc.to(torch.int32)


def random_mask(k: int, m: int, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random N:M block mask ``(K, M)`` drawn from ``generator`` (on the CPU, so that every
    device and every rank draws the same mask from the same seed)."""
    noise = torch.rand((k, m), generator=generator)
    return topn_mask(noise, n).to(device)


def count_per_block(mask_blocks: torch.Tensor) -> torch.Tensor:
    """Number of kept entries in every block, ``(K,)`` int64."""
    return mask_blocks.sum(dim=-1, dtype=torch.int64)


def is_nm(mask: torch.Tensor, n: int, m: int, group_axis: str = "cin", exact: bool = True) -> bool:
    """Whether a mask (weight-shaped) keeps exactly (or at most) N of every M along ``group_axis``."""
    counts = count_per_block(to_blocks(mask.bool(), m, group_axis))
    return bool((counts == n).all()) if exact else bool((counts <= n).all())


def _check_axis(group_axis: str) -> None:
    if group_axis not in _ALL_AXES:
        raise ConfigError(f"unknown group_axis {group_axis!r}: choose one of {', '.join(GROUP_AXES)}")


def backward_mask(
    weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """A bi-directional (transposable-in-backward) mask (SPEC section 5).

    The input gradient ``dX = dY (W*B)`` reduces over the *output* axis, so a mask that N:M hardware can
    use there must keep N of every M consecutive output channels. This keeps the forward mask AND the
    top-N of ``|W*B|`` in each group of M output channels, for every input position.

    Args:
        weight: weight W, ``[out, ...]``.
        mask: forward mask B (bool, same shape).
        n: N.
        m: M; ``out`` must divide by it.
        perm: optional permutation of the output channels (Bi-Mask): groups are taken over the
            permuted rows, and the result is returned in the original order.

    Returns:
        bool, the weight's shape: a subset of ``mask`` with at most N per group of M output channels.
    """
    mask = mask.bool()
    scores = torch.where(mask, weight.detach().abs(), 0.0)  # |W*B| without converting the bool mask
    if perm is not None:
        scores = scores.index_select(0, perm)  # row copies, in the permuted order
    shape = scores.shape
    keep = topn_mask_grouped(scores.reshape(shape[0] // m, m, -1), n).view(shape)  # groups of M outputs
    if perm is not None:
        keep = torch.empty_like(keep).index_copy_(0, perm, keep)
    return keep & mask
