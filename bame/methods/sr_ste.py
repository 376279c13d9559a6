"""SR-STE (Zhou et al., "Learning N:M fine-grained structured sparse neural networks from scratch",
ICLR 2021; code ``aojunzz/NM-sparsity``), METHODS section 1.

* Forward mask: ``B = top-N |W|`` per block, re-chosen before every forward. Pruned weights are never
  zeroed: they keep training and can come back by magnitude.
* Weight gradient: straight-through and dense (the STE of BAME's Eq. 2), plus SR-STE's
  sparse-refined term::

      grad_W = G + lambda_w * (1 - B) * W          # G = dL/d(W*B)

  added exactly once, to the already averaged (all-reduced, unscaled) gradient. The released ImageNet
  script adds it on each of 8 ranks before an all-reduce *sum*, so its effective value is 8 x 2e-4;
  that is a known difference from the released runs, not something to copy (METHODS 0.4). The term
  goes to the gradient, not the loss, so momentum and weight decay act on it; with Adam it is rescaled.
* Input gradient: ordinary autograd through ``W*B`` (its transpose is not N:M along the output axis);
  the paper's tables charge it dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bame import native
from bame.contract import Method, Step
from bame.methods import register
from bame.options import Options, option


@dataclass
class SrSteOptions(Options):
    lambda_w: float = option(2e-4, "SR-STE's decay lambda_w*(1-B)*W added to the gradient of pruned weights "
                                   "(paper Sec. 4, every released config)", low=0.0)


@torch.no_grad()
def add_sr_ste_decay(grad: torch.Tensor, layer, lambda_w: float) -> None:
    """``grad += lambda_w * (1 - B) * W`` in place: one pass of the native kernel over float32 CPU tensors,
    else one product with the cached float copy of ``1 - B``.

    SR-STE's sparse-refined term (no sign: L2-shaped). Bitwise equal to ``grad + lambda_w * (1 - B) * W``
    either way (products with 0/1 are exact), without weight-sized bool conversions.
    """
    weight, mask = layer.weight.detach(), layer.mask
    if native.ready(grad, weight, masks=(mask,)):
        native.srste_decay_(grad, weight, mask, lambda_w)  # one pass, the same floats
        return
    keep = layer.par.mask_as(grad)  # cached 0/1 copy of B; the forward of this iteration made it already
    grad.addcmul_(weight, torch.sub(1.0, keep), value=lambda_w)


@register
class SrSte(Method):
    name = "sr_ste"
    order = 3
    description = "SR-STE: top-N |W| every iteration, dense straight-through gradient + sparse-refined decay"
    paper = "Zhou et al., ICLR 2021"
    Options = SrSteOptions
    backward_note = "dense dX (W*B, not N:M along outputs); dense STE dW + lambda_w*(1-B)*W"
    dense_every_step = "re-chooses its masks from the dense weight and steps with the dense gradient every iteration"
    dx_charge = "dense"

    def plan(self, t: int) -> Step:
        # t = 0 prunes the attached all-ones mask; from then on every re-selection's flips are counted
        return Step("sparse", keep=self.n, select=True, record="every" if t > 0 else "none", grad="dense")

    def on_grad(self, t: int, layer, grad: torch.Tensor, ctx) -> None:
        add_sr_ste_decay(grad, layer, self.options.lambda_w)
