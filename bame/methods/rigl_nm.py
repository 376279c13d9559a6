"""RigL adapted to N:M (BAME's Table 4 "RigL"; Evci et al., "Rigging the lottery", ICML 2020; code
``google-research/rigl``), METHODS section 6.

BAME's machinery (:class:`~bame.methods.bame.BlockEvolution`: gradual phase, dense G on update
iterations, zeroing of changed weights and their optimizer state, frozen phase, FLOPs) with OBF off and
RigL's drop/grow rule in place of LMA, since Table 4 ablates only the adaption rule.

``mode="fraction"`` (default; RigL's layer-wide rule made N:M-safe), on each update iteration t::

    f    = (alpha / 2) (1 + cos(pi (t - t_i) / (t_f - t_i)))     # RigL's cosine decay, window-relative
    n    = floor(f * K * N)                                       # RigL's per-layer drop count
    cap  = min(N, M - N)                                          # a block cannot swap more than this
    d_k  = how many of the layer's n smallest |W| among each block's `cap` smallest kept weights lie in
           block k (ties: lower block, then lower rank in the block)      # bame.nm.smallest_per_block
    B'   = in block k, drop the d_k smallest kept |W|, grow the d_k largest |G| among the pruned and the
           dropped ones (a dropped one may win its place back)            # bame.nm.drop_grow

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

from bame.methods import register
from bame.methods.bame import BlockEvolution, ScheduleOptions
from bame.nm import drop_grow, smallest_per_block
from bame.options import option

MODES = ("fraction", "every_block")


@dataclass
class RiglNmOptions(ScheduleOptions):
    alpha: float = option(0.3, "RigL-NM: initial drop fraction, cosine-decayed over the evolution window "
                               "(RigL's paper and rigl.gin)", low=0.0, high=1.0)
    mode: str = option("fraction", "RigL-NM: 'fraction' (RigL's layer-wide drop fraction) or 'every_block' "
                                   "(the aggressive reading: every block may swap at every update)", choices=MODES)


def drop_fraction(t: int, t_i: int, t_f: int, alpha: float) -> float:
    """RigL's cosine-decayed drop fraction ``(alpha/2)(1 + cos(pi (t - t_i)/(t_f - t_i)))``."""
    if t_f <= t_i:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * (t - t_i) / (t_f - t_i)))


def fraction_rule(
    weight_blocks: torch.Tensor, grad_blocks: torch.Tensor, mask_blocks: torch.Tensor, n: int, fraction: float
) -> torch.Tensor:
    """``mode="fraction"``: the layer's ``floor(f K N)`` smallest |W| kept weights, at most ``min(N, M - N)``
    per block, give way to the largest |G| of their blocks (``(K, M)`` blocks in and out)."""
    k, m = mask_blocks.shape
    cap = min(n, m - n)
    total = min(math.floor(fraction * k * n), k * cap)
    if total <= 0:
        return mask_blocks.bool().clone()
    counts = smallest_per_block(weight_blocks.abs(), mask_blocks, cap, total)  # (K,)
    return drop_grow(mask_blocks, weight_blocks.abs(), grad_blocks.abs(), counts)


def every_block_rule(weight_blocks: torch.Tensor, grad_blocks: torch.Tensor, mask_blocks: torch.Tensor) -> torch.Tensor:
    """``mode="every_block"``: in every block the smallest-|W| kept weight gives way to the largest-|G| pruned
    one where that |G| is strictly larger than the dropped weight's |G|."""
    old, g = mask_blocks.bool(), grad_blocks.abs()
    if bool(old.all()):
        return old.clone()
    drop = torch.where(old, weight_blocks.abs(), math.inf).argsort(dim=-1, stable=True)[:, :1]  # (K, 1)
    grow = torch.where(old, -math.inf, g).argsort(dim=-1, descending=True, stable=True)[:, :1]  # (K, 1)
    counts = (g.gather(-1, grow) > g.gather(-1, drop)).view(-1).long()  # (K,) 1 where the swap pays
    return drop_grow(old, weight_blocks.abs(), g, counts)


@register
class RiglNm(BlockEvolution):
    name = "rigl_nm"
    order = 4
    description = "RigL-NM: BAME's schedule with RigL's |W| drop / |G| grow inside blocks (Table 4 'RigL')"
    paper = "Evci et al., ICML 2020; N:M form as in BAME (Yang et al., ICML 2025), Table 4"
    Options = RiglNmOptions

    def propose(self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor, lr: float) -> torch.Tensor:
        if self.options.mode == "every_block":
            return every_block_rule(w, g, old)
        return fraction_rule(w, g, old, self.n, drop_fraction(t, self.t_i, self.t_f, self.options.alpha))

    def proposal_stats(self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor,
                       lr: float) -> dict[str, float]:
        return {}  # not LMA's scores
