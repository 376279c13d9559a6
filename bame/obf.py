"""OBF: oscillation-aware block freezing (paper Eq. 7-10, SPEC section 4).

Per layer a float vector O (one entry per block, starting at 0) tracks how often each block's mask
flips. At every update:

1. ``SAD_k = sum_m |B_old - B'|`` against the LMA *proposal* B' (Eq. 7; the paper's final mask would
   make the step circular).
2. ``O = gamma * O + (1 - gamma) * SAD`` (Eq. 8; gamma is missing from the paper, default 0.9).
3. A block is an *oscillator* if ``O_k`` is strictly greater than the floor(beta*K)-th largest value of
   O (none if floor(beta*K) = 0, and none while all O are equal).
4. A block is *heavy* if ``||W_k||_2`` is strictly greater than the floor(alpha*K)-th largest norm.
5. Frozen blocks keep B_old, the others take B'. ``rule="and"``: frozen = oscillator AND heavy (Eq. 10
   as printed, the default); ``rule="or"``: frozen = oscillator OR heavy (the text's reading).

A consequence: while fewer than floor(beta*K) blocks have ever proposed a change, the threshold of step
3 is 0, so every block with O > 0 is an oscillator. Under "or" no proposing block can then change at
all; under "and" only the lighter blocks adapt.
"""

from __future__ import annotations

import math

import torch

from bame import native
from bame.errors import ConfigError
from bame.nm import block_flips

RULES = ("and", "or")


def above_kth_largest(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Entries strictly greater than the floor(fraction*K)-th largest value.

    Args:
        values: ``(K,)``.
        fraction: in [0, 1].

    Returns:
        bool ``(K,)``; all False when floor(fraction*K) = 0.
    """
    k = len(values)
    rank = math.floor(fraction * k)
    if rank == 0:
        return torch.zeros(k, dtype=torch.bool, device=values.device)
    # The rank-th largest is the (K - rank + 1)-th smallest.
    if native.ready(values) and not torch.isnan(values.sum()):
        return values > native.kth_smallest(values, k - rank)  # a radix select: the same value
    threshold = torch.kthvalue(values.float(), k - rank + 1).values
    return values > threshold


def update_osc(old_mask: torch.Tensor, proposed: torch.Tensor, osc: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 7-8: ``gamma * O + (1 - gamma) * SAD(B_old, B')``, a new ``(K,)`` tensor."""
    sad = block_flips(old_mask, proposed).to(osc.dtype)  # (K,)
    return osc * gamma + sad * (1.0 - gamma)


def frozen_blocks(
    osc: torch.Tensor, weight_blocks: torch.Tensor, alpha: float, beta: float, rule: str = "and"
) -> torch.Tensor:
    """Steps 3-5: which blocks keep their old mask, bool ``(K,)``, from the updated O."""
    if rule not in RULES:
        raise ConfigError(f"unknown freeze rule {rule!r}: choose 'and' or 'or'")
    oscillator = above_kth_largest(osc, beta)
    heavy = above_kth_largest(weight_blocks.float().norm(dim=-1), alpha)
    return oscillator & heavy if rule == "and" else oscillator | heavy


def restrict_with_frozen(
    old_mask: torch.Tensor,
    proposed: torch.Tensor,
    weight_blocks: torch.Tensor,
    osc: torch.Tensor,
    gamma: float,
    alpha: float,
    beta: float,
    rule: str = "and",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`restrict`, also returning the bool ``(K,)`` vector of frozen blocks."""
    new_osc = update_osc(old_mask, proposed, osc, gamma)
    frozen = frozen_blocks(new_osc, weight_blocks, alpha, beta, rule)
    old_mask, proposed = old_mask.bool(), proposed.bool()
    word = _WORDS.get(old_mask.shape[-1])
    if word is not None and old_mask.is_contiguous() and proposed.is_contiguous():
        # A block of 2, 4 or 8 bool bytes is one integer: choosing whole blocks moves K words, not K*M bytes.
        as_words = [t.reshape(-1).view(word) for t in (old_mask, proposed)]  # (K,) each
        mask = torch.where(frozen, *as_words).view(torch.bool).view(old_mask.shape)  # (K, M)
    else:
        mask = torch.where(frozen[:, None], old_mask, proposed)  # (K, M)
    return mask, new_osc, frozen


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # block size in bytes -> an integer of that size


def restrict(
    old_mask: torch.Tensor,
    proposed: torch.Tensor,
    weight_blocks: torch.Tensor,
    osc: torch.Tensor,
    gamma: float,
    alpha: float,
    beta: float,
    rule: str = "and",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict an LMA proposal to the blocks OBF lets adapt (Eq. 7-10).

    Args:
        old_mask: ``(K, M)`` mask before this update, B_old.
        proposed: ``(K, M)`` LMA proposal B'.
        weight_blocks: ``(K, M)`` weights, for the block norms ``||W_k||_2``.
        osc: ``(K,)`` the oscillation EMA O before this update.
        gamma: EMA momentum.
        alpha: fraction for the heavy-block rank.
        beta: fraction for the oscillator rank.
        rule: ``"and"`` or ``"or"``.

    Returns:
        ``(mask, osc)``: the final bool ``(K, M)`` mask and the updated ``(K,)`` O.
    """
    mask, new_osc, _ = restrict_with_frozen(old_mask, proposed, weight_blocks, osc, gamma, alpha, beta, rule)
    return mask, new_osc
