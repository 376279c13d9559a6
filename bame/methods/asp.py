"""ASP, NVIDIA's Automatic SParsity (Mishra et al., "Accelerating sparse deep neural networks", 2021;
code ``NVIDIA/apex``, ``apex/contrib/sparsity``), METHODS section 5.

The recipe (apex README "Generate a Sparse Network"):

1. train densely with the normal recipe, ``[0, prune_at)``;
2. before the forward of iteration ``prune_at``, prune once: ``B = top-N |W|`` per block (apex's
   ``m4n2_1d`` picks the pattern maximising the kept |W|, which is top-N; other N:M are the general
   ``mn_1d_best``, a generalisation, since apex ships only the 2:4 names); pruned weights and their
   optimizer state become zero;
3. fine-tune with the fixed mask for as long again, ``[prune_at, T)``: gradients are masked before each
   step and weights re-masked after it (apex patches ``optimizer.step`` the same way), and the
   optimizer and the LR schedule restart at ``prune_at`` (:meth:`Asp.restart_steps`), as a new run from
   the dense checkpoint would.

So ASP trains twice the nominal epochs (``schedule_factor = 2``): T counts both halves and the default
``prune_at = T/2``. No channel permutation (the 2020 ASP that BAME cites had none).

``layer_policy="reference"`` replaces bame's layer policy with apex's rule: every Linear/Conv2d whose
weight has ``dim0 % 8 == 0`` and ``dim1 % 16 == 0`` (so a large classifier such as ResNet-50's
1000x2048 fc is pruned too); layers bame cannot block stay dense either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bame.contract import Method, Step
from bame.errors import ConfigError
from bame.methods import register
from bame.options import Options, option
from bame.schedules import resolve_step

LAYER_POLICIES = ("bame", "reference")


@dataclass
class AspOptions(Options):
    prune_at: int | float = option(0.5, "ASP: the one-shot prune (an iteration, or a fraction of the run; T counts "
                                        "dense + fine-tune epochs, which apex makes equal: T/2)", step=True)
    layer_policy: str = option("bame", "ASP: 'bame' (one policy for every method keeps comparisons fair, METHODS "
                                       "0.2) or 'reference' (apex's dim0 % 8, dim1 % 16 rule)",
                               choices=LAYER_POLICIES)


def apex_eligible(name: str, module: nn.Module) -> bool:
    """apex's whitelist rule: a trainable Linear/Conv2d weight with ``dim0 % 8 == 0 and dim1 % 16 == 0``."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not module.weight.requires_grad:
        return False
    shape = module.weight.shape
    return shape[0] % 8 == 0 and shape[1] % 16 == 0


@register
class Asp(Method):
    name = "asp"
    order = 2
    description = "ASP: dense training, one-shot magnitude N:M prune, fine-tuning with the fixed mask"
    paper = "NVIDIA ASP (Nvidia, 2020; Mishra et al., 2021)"
    Options = AspOptions
    schedule_factor = 2.0  # fine-tunes for as many epochs as it trained densely
    backward_note = "dense until the prune; then sparse dX (W*B) and dW (masked)"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.prune_step = resolve_step(options.prune_at, self.total_steps, "prune_at")
        if self.total_steps is not None and self.prune_step >= self.total_steps:
            raise ConfigError(f"prune_at={self.prune_step} leaves no fine-tuning in {self.total_steps} steps")

    def plan(self, t: int) -> Step:
        if t < self.prune_step:
            return Step("dense", keep=self.m, grad="dense")
        return Step("finetune", keep=self.n, select=t == self.prune_step, zero="pruned", zeroed=True)

    def layer_filter(self):
        return apex_eligible if self.options.layer_policy == "reference" else None

    def resolved_options(self) -> dict:
        return {**super().resolved_options(), "prune_at": self.prune_step}

    def restart_steps(self) -> list[int]:
        return [self.prune_step] if self.prune_step > 0 else []
