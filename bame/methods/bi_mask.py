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
backward mask: their dX uses ``W * B_f`` and is charged dense, and ``layer.bwd_note`` says so.

Group axis: Bi-Mask's code groups the forward mask along the row-major flattened kernel (``kflat``);
bame keeps the user's ``group_axis`` (default ``cin``) so that every method is compared on one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bame.errors import ConfigError
from bame.masking import check_bidirectional_support
from bame.methods import register
from bame.methods.base import Charge
from bame.methods.sr_ste import SrSte, SrSteOptions, magnitude_mask
from bame.nm import backward_mask, blocking_problem


@dataclass
class BiMaskOptions(SrSteOptions):
    perm_interval: int = 100  # Bi-Mask's `iter` option (options.py default, CIFAR and ImageNet commands)
    candidates: int = 10  # `greedy_num`: options.py default and the CIFAR commands (ImageNet README: 100)


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
    description = "Bi-Mask: SR-STE forward/dW, N:M backward mask along outputs from a permutation search"
    paper = "Zhang et al., ICML 2023"
    Options = BiMaskOptions
    backward_note = "N:M dX (W*B_b along outputs, permuted); dense STE dW + lambda_w*(1-B_f)*W"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        if not isinstance(options.perm_interval, int) or options.perm_interval < 1:
            raise ConfigError(f"perm_interval must be a positive integer, not {options.perm_interval!r}")
        if not isinstance(options.candidates, int) or options.candidates < 1:
            raise ConfigError(f"candidates must be a positive integer, not {options.candidates!r}")
        # One CPU stream, identical on every rank, consumed in the sparsifier's fixed layer order.
        self.generator = torch.Generator().manual_seed(self.seed)

    def wants_bwd_mask(self) -> bool:
        return True

    def init_layer(self, layer, ctx) -> None:
        problem = check_bidirectional_support(layer.module) or blocking_problem(layer.shape, self.m, "out")
        if problem is not None:
            layer.bwd_note = f"backward mask off ({problem}): dX uses the forward mask"
            return
        layer.add_state("perm", torch.arange(layer.shape[0]))  # the searched output permutation pi
        layer.par.set_bwd_mask(layer.mask)

    @torch.no_grad()
    def prepare(self, t: int, ctx) -> None:
        for layer in ctx.layers:
            layer.mask.copy_(magnitude_mask(layer, self.n))
            if t % self.options.perm_interval == 0 and layer.par.bwd_mask is not None:
                self._search(layer)
        self._set_backward_masks(ctx)

    def refresh(self, ctx) -> None:
        super().refresh(ctx)
        self._set_backward_masks(ctx)

    @torch.no_grad()
    def _search(self, layer) -> None:
        weight, mask = layer.weight.detach(), layer.mask
        perms = random_permutations(layer.shape[0], self.options.candidates, self.generator)
        best, _ = best_permutation(weight, mask, self.n, self.m, [p.to(weight.device) for p in perms])
        layer.state("perm").copy_(best)

    @torch.no_grad()
    def _set_backward_masks(self, ctx) -> None:
        for layer in ctx.layers:
            if layer.par.bwd_mask is not None:
                perm = layer.state("perm")
                layer.par.set_bwd_mask(backward_mask(layer.weight, layer.mask, self.n, self.m, perm))

    def charge(self, t: int, layer) -> Charge:
        r = self.r
        dx = r if layer.par.bwd_mask is not None else 1.0
        return Charge(r, dx, 1.0, r, dx, 1.0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
