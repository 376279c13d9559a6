"""Static sparse training: a random N:M mask at initialisation, never changed (the paper's Table 4
"Static")."""

from __future__ import annotations

import torch

from bame.methods import register
from bame.methods.base import Method
from bame.nm import random_mask


@register
class Static(Method):
    name = "static"
    description = "random N:M mask at init, fixed (Table 4 'Static')"
    paper = "BAME (Yang et al., ICML 2025), Table 4"
    backward_note = "sparse dX (W*B) and dW (masked)"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        # One CPU generator seeded identically on every rank: every process draws the same masks.
        self.generator = torch.Generator().manual_seed(self.seed)

    def init_layer(self, layer, ctx) -> None:
        mask = random_mask(layer.num_blocks, self.m, self.n, self.generator, layer.mask.device)
        layer.set_mask(layer.unblocks(mask), ctx, zero="pruned")
        layer.par.weights_pruned = True  # zeroed here; masked gradients and apply-after-step keep them zero

    def after_step(self, t: int, ctx) -> None:
        for layer in ctx.layers:  # re-zeroed unless the optimizer provably keeps zero entries at zero
            layer.apply_mask(ctx)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
