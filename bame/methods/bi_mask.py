"""Bi-Mask (Zhang et al., "Bi-directional masks for efficient N:M sparse training", ICML 2023; code
``zyxxmu/Bi-Mask``), METHODS section 4.

* Forward mask and weight gradient: SR-STE's (:mod:`bame.methods.sr_ste`): ``B_f = top-N |W|`` every
  iteration, dense straight-through dW plus ``lambda_w * (1 - B_f) * W``.
* Input gradient: ``dX = dY (W * B_b)`` with a backward mask that is N:M along the *output* axis::

      B_b = B_f AND unpermute(top-N of (|W| * B_f)[pi] in each group of M consecutive permuted outputs)

  recomputed every iteration from the current weights and the stored permutation pi
  (:func:`bame.nm.backward_mask`).
* Permutation search, at t = 0 and every ``perm_interval`` iterations: ``candidates`` uniformly random
  output-channel permutations (the identity is not one), each scored by the number of forward-kept
  weights its backward mask keeps; the strictly best wins (the earlier one on ties). The permutations
  come from one seeded CPU generator consumed in the fixed layer order, so every rank draws the same
  ones (the reference uses NumPy's global RNG).

Layers whose output channels do not divide by M (or that cannot route a custom input gradient) get no
backward mask (the sparsifier decides, for every method with ``backward_masks``): their dX uses ``W * B_f``
and is charged dense, and ``layer.bwd_note`` says so.

Group axis: Bi-Mask's code groups the forward mask along the row-major flattened kernel (``kflat``);
bame keeps the user's ``group_axis`` (default ``cin``) so that every method is compared on one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bame.methods import register
from bame.methods.sr_ste import SrSte, SrSteOptions
from bame.nm import backward_mask
from bame.options import option


@dataclass
class BiMaskOptions(SrSteOptions):
    perm_interval: int = option(100, "Bi-Mask: iterations between permutation searches (its `iter` option)", low=1)
    candidates: int = option(10, "Bi-Mask: random permutations scored per search (`greedy_num`: options.py "
                                 "and the CIFAR commands; its ImageNet README uses 100)", low=1)


def permutation_score(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, perm: torch.Tensor) -> int:
    """Forward-kept weights that the backward mask under ``perm`` keeps (Bi-Mask's search score)."""
    return int(backward_mask(weight, mask, n, m, perm).sum())


def best_permutation(
    weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, candidates: list[torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """The highest-scoring candidate permutation and its score; the earlier one wins ties (strict >).

    Candidates are scored one at a time, so the search needs one weight-sized buffer, not G of them.
    """
    best, best_score = candidates[0], permutation_score(weight, mask, n, m, candidates[0])
    for perm in candidates[1:]:
        score = permutation_score(weight, mask, n, m, perm)
        if score > best_score:
            best, best_score = perm, score
    return best, best_score


def random_permutations(size: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` uniformly random non-identity permutations of ``range(size)`` (size >= 2), drawn on
    the CPU from ``generator``."""
    identity = torch.arange(size)
    perms = []
    while len(perms) < count:
        perm = torch.randperm(size, generator=generator)
        if not torch.equal(perm, identity):
            perms.append(perm)
    return perms


@register
class BiMask(SrSte):
    name = "bi_mask"
    order = 8
    description = "Bi-Mask: SR-STE forward/dW, N:M backward mask along outputs from a permutation search"
    paper = "Zhang et al., ICML 2023"
    Options = BiMaskOptions
    backward_note = "N:M dX (W*B_b along outputs, permuted); dense STE dW + lambda_w*(1-B_f)*W"
    backward_masks = True

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        # One CPU stream, identical on every rank, consumed in the sparsifier's fixed layer order.
        self.generator = torch.Generator().manual_seed(self.seed)

    def layer_state(self, layer) -> dict[str, torch.Tensor]:
        return {"perm": torch.arange(layer.shape[0])} if layer.has_bwd_mask else {}  # the searched pi

    def select(self, t: int, layer, keep: int) -> torch.Tensor:
        mask = super().select(t, layer, keep)  # (K, M) top-N |W|
        if t % self.options.perm_interval == 0 and layer.has_bwd_mask:  # search with the new forward mask
            weight = layer.weight.detach()
            perms = random_permutations(layer.shape[0], self.options.candidates, self.generator)
            best, _ = best_permutation(weight, layer.unblocks(mask), self.n, self.m,
                                       [p.to(weight.device) for p in perms])
            layer.state("perm").copy_(best)
        return mask

    def backward_perm(self, layer) -> torch.Tensor | None:
        return layer.state("perm") if layer.has_bwd_mask else None
