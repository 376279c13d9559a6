"""The dense baseline: no masks; every layer is counted dense."""

from __future__ import annotations

from bame.methods import register
from bame.methods.base import Charge, Method


@register
class Dense(Method):
    name = "dense"
    description = "no masks: the dense baseline row"
    paper = "-"
    uses_masks = False
    backward_note = "dense dX and dW"

    def before_step(self, t: int, ctx) -> None:
        pass

    def phase_of(self, t: int) -> str:
        return "dense"

    def charge(self, t: int, layer) -> Charge:
        return Charge.dense()
