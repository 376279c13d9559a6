"""The training-FLOPs ledger: count what a run executed (SPEC section 7).

Per weight layer (Linear / convolution) and per iteration, three products are counted separately:
the forward product, the input gradient ``dX`` and the weight gradient ``dW``, each as *dense FLOPs of
that product* x *the density the method declares for it on that iteration* (:meth:`Method.charge`).
Two charging rules are kept side by side: rule "paper" (the convention of the paper's tables, the
headline ``train_flops_ratio``) and rule "nm-hardware" (``train_flops_ratio_hw``: only what N:M
hardware can accelerate).

Dense FLOPs of one product are ``2 x MACs`` for one sample, traced once with a forward pass. The input
gradient of a layer whose input needs no gradient (the stem) is not computed by autograd, so it is
not counted. Everything else is counted dense, by this rule:

* matrix products outside weight layers (attention's ``QK^T`` and ``AV``), as counted by
  :mod:`torch.utils.flop_counter`: forward once, backward twice;
* normalization modules (BatchNorm, LayerNorm, GroupNorm): 4 FLOPs per output element forward, 8 backward;
* activation and pooling modules: 1 FLOP per output element forward, 1 backward.

Ratios are against dense training of the same model for the run's *nominal* length (ASP, which trains
twice as long, comes to about 1.5x at 2:4, as in the paper).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bame.methods.base import Charge

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_CHEAP = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
          nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PRODUCTS = ("fwd", "dx", "dw")
_DENSE = Charge.dense()


@dataclass
class LayerCost:
    """Dense FLOPs of one weight layer's products for one sample."""

    name: str  # weight name, as in the model's state_dict
    fwd: float
    needs_dx: bool  # False for a layer whose input needs no gradient (dX is never computed)


@dataclass
class ModelCost:
    """Dense per-sample FLOPs of a model: its weight layers and everything else."""

    layers: dict[str, LayerCost]
    other_fwd: float
    other_bwd: float

    def dense_train(self) -> float:
        per = sum(c.fwd * (2 + c.needs_dx) for c in self.layers.values())
        return per + self.other_fwd + self.other_bwd

    def dense_forward(self) -> float:
        return sum(c.fwd for c in self.layers.values()) + self.other_fwd


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    if isinstance(module, nn.Linear):
        return float(out.numel() // out.shape[-1]) * module.in_features * module.out_features
    kernel = module.weight[0].numel()  # cin/groups * prod(kernel)
    return float(out.numel()) * kernel


def measure(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """Trace one sample through ``model`` and return its dense per-sample FLOPs.

    Args:
        model: the model (sparsified or not: the count is of dense products).
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
    """
    device = next(model.parameters()).device
    names = {id(mod): name for name, mod in model.named_modules()}
    layers: dict[str, LayerCost] = {}
    elementwise = [0.0, 0.0]

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = names[id(module)]
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            flops = 2.0 * _macs(module, args[0], out)
            layers[f"{name}.weight"] = LayerCost(f"{name}.weight", flops, bool(args[0].requires_grad))
        elif isinstance(module, _NORMS):
            elementwise[0] += 4.0 * out.numel()
            elementwise[1] += 8.0 * out.numel()
        elif isinstance(module, _CHEAP):
            elementwise[0] += 1.0 * out.numel()
            elementwise[1] += 1.0 * out.numel()

    watched = (nn.Linear, nn.modules.conv._ConvNd, *_NORMS, *_CHEAP)
    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, watched)]
    was_training = model.training
    model.eval()  # no batch statistics update from the tracing sample
    try:
        x = torch.zeros((1, *input_shape), device=device)
        with FlopCounterMode(display=False) as counter:
            model(x)
        total_matmul = float(counter.get_total_flops())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    attention = max(0.0, total_matmul - sum(c.fwd for c in layers.values()))
    return ModelCost(layers, attention + elementwise[0], 2 * attention + elementwise[1])


@dataclass
class Ledger:
    """Accumulates a run's training FLOPs, per iteration, from the method's declared charges."""

    cost: ModelCost
    batch_size: int  # global samples per iteration
    nominal_steps: int  # the dense baseline's iterations (without ASP's extra fine-tuning)
    train_flops: float = 0.0
    train_flops_hw: float = 0.0
    steps: int = 0
    by_phase: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))

    def add(self, charges: dict[str, Any], phase: str = "train") -> None:
        """Count one iteration, given ``{weight name: Charge}`` for that iteration."""
        paper = hw = 0.0
        bucket = self.by_phase[phase]
        for name, cost in self.cost.layers.items():
            c = charges.get(name)
            if c is None:  # a layer the sparsifier does not know: dense
                c = _DENSE
            dx = cost.fwd if cost.needs_dx else 0.0
            parts = (cost.fwd * c.fwd, dx * c.dx, cost.fwd * c.dw)
            paper += sum(parts)
            hw += cost.fwd * c.fwd_hw + dx * c.dx_hw + cost.fwd * c.dw_hw
            for product, value in zip(PRODUCTS, parts):
                bucket[product] += value * self.batch_size
        other = self.cost.other_fwd + self.cost.other_bwd
        bucket["other"] += other * self.batch_size
        bucket["steps"] += 1
        self.train_flops += (paper + other) * self.batch_size
        self.train_flops_hw += (hw + other) * self.batch_size
        self.steps += 1

    def dense_train_flops(self) -> float:
        return self.cost.dense_train() * self.batch_size * self.nominal_steps

    def summary(self) -> dict[str, Any]:
        dense = self.dense_train_flops()
        return {
            "train_flops": self.train_flops,
            "train_flops_hw": self.train_flops_hw,
            "dense_train_flops": dense,
            "train_flops_ratio": self.train_flops / dense if dense else float("nan"),
            "train_flops_ratio_hw": self.train_flops_hw / dense if dense else float("nan"),
            "flops_by_phase": {k: dict(v) for k, v in self.by_phase.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self.train_flops, "train_flops_hw": self.train_flops_hw, "steps": self.steps,
                "by_phase": {k: dict(v) for k, v in self.by_phase.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_flops = float(state["train_flops"])
        self.train_flops_hw = float(state["train_flops_hw"])
        self.steps = int(state["steps"])
        self.by_phase.clear()
        for phase, values in state["by_phase"].items():
            self.by_phase[phase].update(values)


def inference_flops_ratio(cost: ModelCost, densities: dict[str, float]) -> float:
    """Inference FLOPs of the sparse model against the dense one, given each layer's forward density."""
    sparse = sum(c.fwd * densities.get(name, 1.0) for name, c in cost.layers.items()) + cost.other_fwd
    return sparse / cost.dense_forward()
