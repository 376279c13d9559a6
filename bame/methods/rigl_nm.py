"""RigL adapted to N:M (BAME's Table 4 "RigL"; Evci et al., "Rigging the lottery", ICML 2020; code
``google-research/rigl``), METHODS section 6.

BAME's machinery (:class:`~bame.methods.bame.BlockEvolution`: gradual phase, dense G on update
iterations, zeroing of changed weights and their optimizer state, frozen phase, FLOPs) with OBF off and
RigL's drop/grow rule in place of LMA, since Table 4 ablates only the adaption rule.

``mode="fraction"`` (default; RigL's layer-wide rule made N:M-safe), on each update iteration t::

    f    = (alpha / 2) (1 + cos(pi (t - t_i) / (t_f - t_i)))     # RigL's cosine decay, window-relative
    n    = floor(f * K * N)                                       # RigL's per-layer drop count
    cap  = min(N, M - N)                                          # a block cannot swap more than this
    D    = the n smallest |W| among each block's `cap` smallest kept weights, layer-wide
           (ties: lower block, then lower rank in the block)
    grow = in block k, the |D_k| largest |G| among (pruned in k) + (D in k)   # dropped ones may win back
    B'   = B - D + grow

Every block keeps exactly N. A dropped-and-regrown weight keeps its value and momentum; a truly new
one starts at 0 with zeroed optimizer state (RigL's grow init), as does a dropped one.

``mode="every_block"``: each block swaps its smallest-|W| kept weight for its largest-|G| pruned one
whenever that |G| is strictly larger than the dropped weight's |G|; no drop fraction, no decay (much
more aggressive than RigL; SPEC's earlier reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bame.errors import ConfigError
from bame.methods import register
from bame.methods.bame import BlockEvolution, ScheduleOptions

MODES = ("fraction", "every_block")


@dataclass
class RiglNmOptions(ScheduleOptions):
    alpha: float = 0.3  # RigL's initial drop fraction (paper and rigl.gin)
    mode: str = "fraction"  # RigL's layer-wide drop fraction; "every_block" is the aggressive reading


def drop_fraction(t: int, t_i: int, t_f: int, alpha: float) -> float:
    """RigL's cosine-decayed drop fraction ``(alpha/2)(1 + cos(pi (t - t_i)/(t_f - t_i)))``."""
    if t_f <= t_i:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * (t - t_i) / (t_f - t_i)))


def _ranks(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of every entry within its row ``(K, M)``; ties go to the lower index (stable sort)."""
    order = torch.sort(scores, dim=-1, descending=descending, stable=True).indices  # (K, M)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


def drop_grow(
    weight_blocks: torch.Tensor, grad_blocks: torch.Tensor, mask_blocks: torch.Tensor, n: int, fraction: float
) -> torch.Tensor:
    """RigL-NM's proposal (``mode="fraction"``): layer-wide magnitude drop, per-block gradient grow.

    Args:
        weight_blocks: ``(K, M)`` weights W.
        grad_blocks: ``(K, M)`` dense gradient G.
        mask_blocks: ``(K, M)`` current mask B, N per block.
        n: N.
        fraction: the drop fraction f of this update.

    Returns:
        bool ``(K, M)``, N per block.
    """
    old = mask_blocks.bool()
    k, m = old.shape
    cap = min(n, m - n)
    n_drop = min(math.floor(fraction * k * n), k * cap)
    if n_drop <= 0:
        return old.clone()
    kept_mag = torch.where(old, weight_blocks.abs(), torch.full_like(weight_blocks, math.inf))  # (K, M)
    cand = torch.sort(kept_mag, dim=-1, stable=True)  # ascending: each block's smallest kept first
    cand_vals, cand_idx = cand.values[:, :cap], cand.indices[:, :cap]  # (K, cap)
    chosen = torch.sort(cand_vals.reshape(-1), stable=True).indices[:n_drop]  # block-major: lower block first
    picked = torch.zeros(k * cap, dtype=torch.bool, device=old.device)
    picked[chosen] = True
    drop = torch.zeros_like(old).scatter_(-1, cand_idx, picked.view(k, cap))  # (K, M)
    per_block = drop.sum(dim=-1)  # (K,) d_k
    eligible = ~old | drop
    grow_score = torch.where(eligible, grad_blocks.abs(), torch.full_like(grad_blocks, -math.inf))  # (K, M)
    grow = _ranks(grow_score, descending=True) < per_block[:, None]  # (K, M)
    return (old & ~drop) | grow


def swap_every_block(
    weight_blocks: torch.Tensor, grad_blocks: torch.Tensor, mask_blocks: torch.Tensor
) -> torch.Tensor:
    """RigL-NM's proposal (``mode="every_block"``): in every block, the smallest-|W| kept weight gives way
    to the largest-|G| pruned one if that |G| is strictly larger than the dropped weight's |G|."""
    old = mask_blocks.bool()
    if bool(old.all()):
        return old.clone()
    inf = torch.full_like(weight_blocks, math.inf)
    drop_idx = torch.where(old, weight_blocks.abs(), inf).argsort(dim=-1, stable=True)[:, :1]  # (K, 1)
    grow_idx = torch.where(old, -inf, grad_blocks.abs()).argsort(dim=-1, descending=True, stable=True)[:, :1]
    g = grad_blocks.abs()
    swap = g.gather(-1, grow_idx) > g.gather(-1, drop_idx)  # (K, 1)
    new = old.clone()
    new.scatter_(-1, drop_idx, ~swap)
    new.scatter_(-1, grow_idx, swap)
    return new


@register
class RiglNm(BlockEvolution):
    name = "rigl_nm"
    description = "RigL-NM: BAME's schedule with RigL's |W| drop / |G| grow inside blocks (Table 4 'RigL')"
    paper = "Evci et al., ICML 2020; N:M form as in BAME (Yang et al., ICML 2025), Table 4"
    Options = RiglNmOptions
    obf = False

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        if options.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {options.mode!r}")
        if not 0.0 <= options.alpha <= 1.0:
            raise ConfigError(f"alpha={options.alpha} must lie in [0, 1]")

    def propose(
        self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor, lr: float
    ) -> torch.Tensor:
        if self.options.mode == "every_block":
            return swap_every_block(w, g, old)
        return drop_grow(w, g, old, self.n, drop_fraction(t, self.t_i, self.t_f, self.options.alpha))
