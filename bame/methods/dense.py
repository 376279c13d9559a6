"""The dense baseline: no masks; every layer is counted dense."""

from __future__ import annotations

from bame.contract import Method, Step
from bame.methods import register


@register
class Dense(Method):
    name = "dense"
    order = 0
    description = "no masks: the dense baseline row"
    paper = "-"
    uses_masks = False
    backward_note = "dense dX and dW"
    dense_every_step = "has no masks"

    def plan(self, t: int) -> Step:
        return Step("dense", keep=self.m, grad="dense")
