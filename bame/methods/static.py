"""Static sparse training: a random N:M mask at initialisation, never changed (the paper's Table 4
"Static")."""

from __future__ import annotations

import torch

from bame.contract import Method, Step
from bame.methods import register
from bame.nm import topn_mask


@register
class Static(Method):
    name = "static"
    order = 1
    description = "random N:M mask at init, fixed (Table 4 'Static')"
    paper = "BAME (Yang et al., ICML 2025), Table 4"
    backward_note = "sparse dX (W*B) and dW (masked)"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        # One CPU generator seeded identically on every rank: every process draws the same masks.
        self.generator = torch.Generator().manual_seed(self.seed)

    def plan(self, t: int) -> Step:
        return Step("sparse", keep=self.n, select=t == 0, zero="pruned", zeroed=True)

    def select(self, t: int, layer, keep: int) -> torch.Tensor:
        noise = torch.rand((layer.num_blocks, self.m), generator=self.generator)  # (K, M), on the CPU
        return topn_mask(noise, keep).to(layer.mask.device)
