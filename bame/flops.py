"""The training-FLOPs ledger: count what a run executed (SPEC section 7).

Per weight layer (Linear / convolution) and per iteration, three products are counted separately:
the forward product, the input gradient ``dX`` and the weight gradient ``dW``, each as *dense FLOPs of
that product* x *the density the method charges for it on that iteration* (a :class:`Charge`)::

    flops(t) = B * sum_l [F_l c_fwd(t, l) + F_l need_dx_l c_dx(t, l) + F_l c_dw(t, l)] + B * other

with B the global batch and F_l = 2 x MACs of layer l's forward for one sample (dX and dW are products of
the same size). Two charging rules are kept side by side: rule "paper" (the convention of the paper's
tables, the headline ``train_flops_ratio``, the numbers a :class:`Charge` holds) and rule "nm-hardware"
(``train_flops_ratio_hw``: a product costs N/M only where its sparse operand is N:M along that product's
reduction axis; :func:`hardware` derives it from the structure a :class:`Charge` records).

Everything that is not a weight layer's product ("other") is counted dense, per sample, by tracing the
model at batch 2 and at batch 1 and taking the difference, so that work done once per iteration on the
weights (applying masks: ``W * B``) is not mistaken for per-sample work:

* matrix products outside weight layers (attention's ``QK^T`` and ``AV``): forward once, backward twice;
* normalisation (batch / layer / group norm, softmax): 4 FLOPs per output element forward, 8 backward;
* every other pointwise op (activations, residual additions, scaling): 1 per output element, 1 backward;
* pooling and mean reductions: 1 FLOP per *input* element forward, 1 backward;
* data movement (views, copies, padding, concatenation) and the weight-layer biases: not counted.

The input gradient of a layer whose input needs no gradient (the stem) is never computed by autograd,
so it is not counted. Ratios are against dense training of the same model for the run's *nominal* length
(ASP, which trains twice as long, comes to about 1.5x at 2:4, as in the paper).

:func:`bame.predict.predict` runs the same ledger over a whole schedule without training (``bame flops``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import astuple, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

PRODUCTS = ("fwd", "dx", "dw")
_NORM_OPS = ("batch_norm", "layer_norm", "group_norm", "softmax")
_POOL_OPS = ("pool", "mean", "sum")
_MOVES = {"clone", "copy", "copy_", "_to_copy", "lift_fresh_copy", "alias", "detach", "fill_", "zero_"}
#: (forward, backward) FLOPs per element of each kind of "other" op (see the module docstring).
OTHER_RULE = {"norm": (4.0, 8.0), "pointwise": (1.0, 1.0), "pool": (1.0, 1.0)}
_MEMO_LIMIT = 4096  # distinct per-iteration charge vectors kept; a schedule has a few dozen


@dataclass(frozen=True)
class Charge:
    """Densities charged to one layer's three products on one iteration, by keyword (SPEC section 7).

    ``fwd``, ``dx`` and ``dw`` follow rule "paper" (the convention of the paper's tables). The other fields
    record the structure rule "nm-hardware" needs (:func:`hardware`): the pattern's density ``nm`` = N/M,
    the share of the forward weight's blocks that are N:M (keep at most N), and whether the input gradient
    runs through a mask that is N:M along the output axis (a backward mask). The default is a dense layer.
    """

    fwd: float = 1.0
    dx: float = 1.0
    dw: float = 1.0
    nm: float = 1.0
    nm_blocks: float = 0.0
    nm_dx: bool = False


_DENSE = Charge()


def hardware(charge: Charge) -> tuple[float, float, float]:
    """Rule "nm-hardware": the ``(fwd, dx, dw)`` densities N:M hardware can actually deliver.

    A product costs N/M only where its sparse operand is N:M along that product's reduction axis, else 1:

    * forward ``y = x (W*B)^T`` reduces over the inputs, along which B's blocks run: each N:M block costs
      N/M, every other block (a gradual budget k > N, a block LBC or MaxQ still keeps dense) costs 1;
    * input gradient ``dX = dY (W*B)`` reduces over the outputs: N/M only through a backward mask that is
      N:M along them (BAME-dagger, Bi-Mask), else 1;
    * weight gradient: computed only at kept entries it costs its kept fraction, as under rule "paper".
    """
    fwd = charge.nm_blocks * charge.nm + (1.0 - charge.nm_blocks)
    return fwd, charge.nm if charge.nm_dx else 1.0, charge.dw


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

    def dense_products(self) -> dict[str, float]:
        """Per-sample dense FLOPs of each product summed over the weight layers."""
        fwd = sum(c.fwd for c in self.layers.values())
        return {"fwd": fwd, "dx": sum(c.fwd for c in self.layers.values() if c.needs_dx), "dw": fwd}

    def dense_train(self) -> float:
        per = sum(c.fwd * (2 + c.needs_dx) for c in self.layers.values())
        return per + self.other_fwd + self.other_bwd

    def dense_forward(self) -> float:
        return sum(c.fwd for c in self.layers.values()) + self.other_fwd


# -- measuring -------------------------------------------------------------------------------------------


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    if isinstance(module, nn.Linear):
        return float(out.numel() // out.shape[-1]) * module.in_features * module.out_features
    kernel = module.weight[0].numel()  # cin/groups * prod(kernel)
    return float(out.numel()) * kernel


def _sdpa_flops(args: tuple) -> float:
    """``2 L S E + 2 L S Ev`` per (batch, head) for scaled dot-product attention (QK^T, then AV)."""
    q, k, v = args[:3]
    rows = q.numel() // q.shape[-1]  # batch * heads * L
    return 2.0 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])


class _OtherCounter(TorchDispatchMode):
    """Counts the elements of every op outside weight layers by the kinds of :data:`OTHER_RULE`."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[str, float] = defaultdict(float)
        self.attention = 0.0  # attention matmuls the FlopCounterMode registry does not know (CPU SDPA)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        first = out[0] if isinstance(out, (tuple, list)) else out
        if "scaled_dot_product" in name:
            if func._overloadpacket not in flop_registry:
                self.attention += _sdpa_flops(args)
            self.elements["norm"] += args[0].numel() // args[0].shape[-1] * args[1].shape[-2]  # softmax
        elif any(key in name for key in _NORM_OPS):
            self.elements["norm"] += first.numel()
        elif any(key in name for key in _POOL_OPS):
            self.elements["pool"] += args[0].numel()
        elif torch.Tag.pointwise in func.tags and name not in _MOVES and isinstance(first, torch.Tensor):
            self.elements["pointwise"] += first.numel()
        return out


def _trace(
    model: nn.Module, input_shape: tuple[int, ...], batch: int
) -> tuple[dict[str, LayerCost], float, float]:
    """Trace one batch; returns (weight layers per sample, other forward, other backward) for the batch."""
    names = {id(mod): name for name, mod in model.named_modules()}
    layers: dict[str, LayerCost] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = f"{names[id(module)]}.weight"
        flops = 2.0 * _macs(module, args[0], out) / batch
        layers[name] = LayerCost(name, flops, bool(args[0].requires_grad))

    weighted = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, weighted)]
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False) as counter, _OtherCounter() as other:
            model(torch.zeros((batch, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    matmul = float(counter.get_total_flops()) + other.attention
    attention = matmul - batch * sum(c.fwd for c in layers.values())
    fwd = attention + sum(OTHER_RULE[k][0] * n for k, n in other.elements.items())
    bwd = 2 * attention + sum(OTHER_RULE[k][1] * n for k, n in other.elements.items())
    return layers, fwd, bwd


def measure(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """Trace ``model`` and return its dense per-sample FLOPs.

    Args:
        model: the model (sparsified or not: the count is of dense products).
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
    """
    was_training = model.training
    model.eval()  # no batch statistics update from the tracing samples
    try:
        layers, fwd1, bwd1 = _trace(model, input_shape, 1)
        _, fwd2, bwd2 = _trace(model, input_shape, 2)
    finally:
        model.train(was_training)
    # batch 2 minus batch 1: per-sample work only (masking the weights happens once per iteration)
    return ModelCost(layers, max(0.0, fwd2 - fwd1), max(0.0, bwd2 - bwd1))


# -- the ledger ------------------------------------------------------------------------------------------


class Increment(NamedTuple):
    """One iteration's FLOPs: the totals under both rules and the per-product values."""

    paper: float
    hw: float
    products: tuple[tuple[str, float], ...]


def _bucket() -> defaultdict:
    return defaultdict(float)


@dataclass
class Ledger:
    """Accumulates a run's training FLOPs, per iteration, from the method's declared charges.

    ``by_phase[phase]`` holds, for the iterations of that phase, the FLOPs of each product under rule
    "paper" (``fwd``, ``dx``, ``dw``) and rule "nm-hardware" (``fwd_hw``, ``dx_hw``, ``dw_hw``), the
    dense ``other`` FLOPs, and the number of ``steps``.
    """

    cost: ModelCost
    batch_size: int  # global samples per iteration
    nominal_steps: int  # the dense baseline's iterations (without ASP's extra fine-tuning)
    train_flops: float = 0.0
    train_flops_hw: float = 0.0
    steps: int = 0
    by_phase: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(_bucket))
    _memo: dict[tuple, Increment] = field(default_factory=dict, repr=False, compare=False)

    def add(self, charges: dict[str, Any], phase: str = "train") -> None:
        """Count one iteration, given ``{weight name: Charge}`` for that iteration (missing: dense)."""
        self.count(self.increment(charges), phase)

    def increment(self, charges: dict[str, Any]) -> Increment:
        """One iteration's FLOPs under these charges (memoised: the same charges recur for thousands
        of iterations)."""
        key = tuple(astuple(charges.get(name) or _DENSE) for name in self.cost.layers)
        inc = self._memo.get(key)
        if inc is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            inc = self._memo[key] = self._compute(key)
        return inc

    def count(self, inc: Increment, phase: str) -> None:
        """Add one iteration's :meth:`increment` to the totals and to its phase."""
        bucket = self.by_phase[phase]
        for product, value in inc.products:
            bucket[product] += value
        bucket["steps"] += 1
        self.train_flops += inc.paper
        self.train_flops_hw += inc.hw
        self.steps += 1

    def _compute(self, key: tuple[tuple[Any, ...], ...]) -> Increment:
        """``B * sum_l F_l * c(l)`` per product and rule, plus the dense ``other`` FLOPs."""
        sums = dict.fromkeys(("fwd", "dx", "dw", "fwd_hw", "dx_hw", "dw_hw"), 0.0)
        for cost, values in zip(self.cost.layers.values(), key, strict=True):
            charge = Charge(*values)
            fwd, dx, dw = charge.fwd, charge.dx, charge.dw
            fwd_hw, dx_hw, dw_hw = hardware(charge)
            dense_dx = cost.fwd if cost.needs_dx else 0.0
            sums["fwd"] += cost.fwd * fwd
            sums["dx"] += dense_dx * dx
            sums["dw"] += cost.fwd * dw
            sums["fwd_hw"] += cost.fwd * fwd_hw
            sums["dx_hw"] += dense_dx * dx_hw
            sums["dw_hw"] += cost.fwd * dw_hw
        other = self.cost.other_fwd + self.cost.other_bwd
        paper = (sums["fwd"] + sums["dx"] + sums["dw"] + other) * self.batch_size
        hw = (sums["fwd_hw"] + sums["dx_hw"] + sums["dw_hw"] + other) * self.batch_size
        sums["other"] = other
        products = tuple((k, v * self.batch_size) for k, v in sums.items())
        return Increment(paper, hw, products)

    def dense_train_flops(self) -> float:
        return self.cost.dense_train() * self.batch_size * self.nominal_steps

    def by_product(self) -> dict[str, float]:
        """Totals of each product (both rules) and of ``other`` over the whole run."""
        out: dict[str, float] = defaultdict(float)
        for bucket in self.by_phase.values():
            for key, value in bucket.items():
                if key != "steps":
                    out[key] += value
        return dict(out)

    def product_ratios(self) -> dict[str, float]:
        """Each product's total against the same product in dense training, e.g. ``dw`` 0.4 = 40 %."""
        dense = self.cost.dense_products()
        scale = self.batch_size * self.nominal_steps
        totals = self.by_product()
        out = {}
        for product in PRODUCTS:
            for suffix in ("", "_hw"):
                base = dense[product] * scale
                out[product + suffix] = totals.get(product + suffix, 0.0) / base if base else float("nan")
        return out

    def summary(self) -> dict[str, Any]:
        dense = self.dense_train_flops()
        return {
            "train_flops": self.train_flops,
            "train_flops_hw": self.train_flops_hw,
            "dense_train_flops": dense,
            "train_flops_ratio": self.train_flops / dense if dense else float("nan"),
            "train_flops_ratio_hw": self.train_flops_hw / dense if dense else float("nan"),
            "flops_by_phase": {k: dict(v) for k, v in self.by_phase.items()},
            "flops_by_product": self.by_product(),
            "product_ratio": self.product_ratios(),
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
