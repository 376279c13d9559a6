"""MaxQ, Multi-Axis Query (Xiang et al., "MaxQ: multi-axis query for N:M sparsity network", CVPR 2024;
code ``JingyangXiang/MaxQ``, default ``SoftMaxQConv2DBNV2Pro``), METHODS section 3.

Before every iteration, from the current |W|:

1. hard mask with incremental sparsity: ``B = top-N |W|`` per block, except that the share p(e) of the
   blocks with the *smallest* L1 norm stays dense (``incremental="blocks"``, the default variant; the
   largest blocks become N:M first). p falls from 1 to 0 over the window ``[decay_start, decay_end)``
   (:func:`dense_share`). ``incremental="per_block"`` (``..._v2_pro_NM``) instead prunes
   ``floor((M - N)(1 - p))`` entries of every block.
2. soft scores along two axes, ``s = hard * sigmoid((|W| - thr) / tau)`` (:func:`axis_soft`): filter-wise
   (each output filter a row) and kernel-wise (each kernel position across the layer; only for convs
   with more than one kernel position; a Linear layer has the filter axis only, MaxQ being CNN-only).
3. the forward uses ``W * B ((1 + s_f) + s_k)`` (mask values 0 or in [1, 3]; summed in the code's order,
   ``mask_local * (1 + mask_filter + mask_position)``, whose float rounding ``1 + (s_f + s_k)`` would not
   reproduce on a 3x3 convolution); the following norm layer absorbs the amplification, and ``squash``
   bakes it into the weight (still N:M).

Evaluation, as in the code: its training forward recomputes the mask, its evaluation forward reuses the
last one, and after each epoch ``show_zero_num_and_update_mask`` recomputes it from the trained weights
with the epoch's p(e) before validating. The sparsifier prepares iteration t+1 after the step of t, with
p(e+1) where an epoch ends; so a model in eval mode (``model.eval()``) uses the mask of the iteration just
trained, p(t-1) from the current weights, when that differs (at an epoch boundary inside the window),
and the training forward of t+1 uses p(e+1). At the end of the run (t = T) both are the final N:M mask:
the evaluated model is the one saved. (The code requires ``decay_end`` before the last epoch, where the
two always agree.)

Weight gradient: pure straight-through, ``dL/dW = dL/d(W*mask)``, dense, plus SR-STE's decay
``lambda * (1 - clamp(mask, 0, 1)) * W`` (blocks held dense get none) added once, after unscaling.

p is evaluated per epoch, as in the code, when the run's ``steps_per_epoch`` is known (the engine
passes it); with ``granularity="iteration"`` or an unknown epoch length it changes every iteration.
``decay_start``/``decay_end`` are iterations (or fractions of T) either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bame.contract import Method, Step
from bame.errors import ConfigError
from bame.flops import Charge
from bame.methods import register
from bame.methods.sr_ste import add_sr_ste_decay
from bame.nm import sorted_blocks, topn_mask
from bame.options import Options, option, same_kind_order
from bame.schedules import resolve_step

SCHEDULES = ("linear", "cubic", "cos", "exp")
INCREMENTAL = ("blocks", "per_block")
GRANULARITIES = ("epoch", "iteration")
EXP_RATE = 0.05  # b of the reference's exp schedule


@dataclass
class MaxqOptions(Options):
    decay_start: int | float = option(0, "MaxQ: the N:M share of blocks starts growing here (ImageNet scripts: "
                                         "epoch 0 of 120)", step=True)
    decay_end: int | float = option(0.25, "MaxQ: every block is N:M from here on (ImageNet scripts: epoch 30 of "
                                          "120, a quarter of the run)", step=True)
    schedule: str = option("linear", "MaxQ: how the share grows (args.py and the ImageNet scripts: linear; cubic, "
                                     "cos and exp are the CIFAR sweeps')", choices=SCHEDULES)
    incremental: str = option("blocks", "MaxQ: 'blocks' (whole blocks become N:M, largest L1 first: the default "
                                        "v2_pro variant) or 'per_block' (every block prunes gradually)",
                              choices=INCREMENTAL)
    tau: float = option(0.01, "MaxQ: sigmoid temperature of the soft scores, absolute (as in the code)", above=0.0)
    lambda_w: float = option(2e-4, "MaxQ: SR-STE's decay (decay_type v1)", low=0.0)
    granularity: str = option("epoch", "LBC/MaxQ: evaluate the schedule per 'epoch' (as the reference code, when "
                                       "the epoch length is known) or per 'iteration'", choices=GRANULARITIES)

    def __post_init__(self) -> None:
        super().__post_init__()
        same_kind_order("decay_start", self.decay_start, "decay_end", self.decay_end)


def dense_share(e: float, s: float, t: float, schedule: str = "linear") -> float:
    """p(e), the share of blocks kept dense at epoch e, over the window ``[s, t)``.

    linear ``1 - (e-s)/(t-s)``; cubic ``(1 - (e-s)/(t-s))^3``; cos ``cos(pi/2 (e-s)/(t-s))``;
    exp ``1 - q(e-s)/q(t-s-1)`` with ``q(i) = 1 - exp(-0.05 i)`` (reaches 0 already at e = t-1).
    All are 1 before s and 0 from t on; ``s = t`` means no incremental phase.
    """
    if e >= t:
        return 0.0
    if e < s:
        return 1.0
    x = (e - s) / (t - s)
    if schedule == "linear":
        return min(1.0, max(0.0, 1.0 - x))
    if schedule == "cubic":
        return min(1.0, max(0.0, (1.0 - x) ** 3))
    if schedule == "cos":
        return math.cos(math.pi / 2 * x)
    if schedule == "exp":
        q = lambda i: 1.0 - math.exp(-EXP_RATE * i)  # noqa: E731
        return max(0.0, 1.0 - q(e - s) / q(t - s - 1))
    raise ConfigError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def axis_soft(x: torch.Tensor, n: int, m: int, tau: float) -> torch.Tensor:
    """MaxQ's soft score along one axis: ``hard * sigmoid((x - thr) / tau)`` ``(rows, L)``.

    Each row keeps its ``L - n_prune`` largest entries, ``n_prune = floor((M-N) L / M)`` (exact integer
    arithmetic), and ``thr`` is the midpoint between the largest pruned and the smallest kept value. With
    ``n_prune = 0`` (a short row) nothing is pruned and every score is 1 (the reference gets NaN).

    Args:
        x: ``(rows, L)`` magnitudes, one query per row.
    """
    length = x.shape[-1]
    n_prune = (m - n) * length // m
    if n_prune == 0:
        return torch.ones_like(x)
    keep = length - n_prune
    # One stable descending sort gives both the kept set (the first `keep`, ties to the lower index, as
    # topn_mask) and the threshold between the smallest kept and the largest pruned value.
    ordered, order = sorted_blocks(x)  # (rows, L), descending
    thr = (ordered[:, keep] + ordered[:, keep - 1]) / 2  # (rows,)
    hard = torch.zeros_like(x).scatter_(-1, order[:, :keep], 1.0)  # (rows, L) 0/1 in x's dtype
    return hard * torch.sigmoid((x - thr[:, None]) / tau)


def soft_scores(weight: torch.Tensor, n: int, m: int, tau: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(s_f, s_k)``, weight-shaped: the filter-wise score and, for a conv with more than one kernel
    position, the kernel-wise one (each kernel position a row across ``out * cin``), else None."""
    a = weight.detach().abs()
    s_f = axis_soft(a.reshape(a.shape[0], -1), n, m, tau).reshape(a.shape)  # rows: output filters
    positions = math.prod(a.shape[2:])
    if a.dim() <= 2 or positions == 1:
        return s_f, None
    out, cin = a.shape[:2]
    by_position = a.reshape(out, cin, positions).permute(2, 0, 1).reshape(positions, out * cin)
    s_k = axis_soft(by_position, n, m, tau).reshape(positions, out, cin).permute(1, 2, 0)
    return s_f, s_k.reshape(a.shape)


def mask_values(hard: torch.Tensor, s_f: torch.Tensor, s_k: torch.Tensor | None) -> torch.Tensor:
    """The forward's mask values ``hard * ((1 + s_f) + s_k)``: 0, or in [1, 3].

    Summed left to right as the code's ``mask_local * (1 + mask_filter + mask_position)``: float addition is
    not associative, and ``1 + (s_f + s_k)`` differs in the last bit, a difference training accumulates.
    """
    total = 1.0 + s_f
    if s_k is not None:
        total = total + s_k
    return hard * total


def incremental_mask(
    weight_blocks: torch.Tensor, n: int, share: float, incremental: str = "blocks"
) -> torch.Tensor:
    """The hard mask ``(K, M)``: top-N |W|, with the share ``p`` of smallest-L1 blocks kept dense
    (``"blocks"``) or ``floor((M-N)(1-p))`` pruned in every block (``"per_block"``)."""
    a = weight_blocks.abs()
    k, m = a.shape
    if incremental == "per_block":
        return topn_mask(a, m - math.floor((m - n) * (1.0 - share)))
    mask = topn_mask(a, n)
    n_dense = math.floor(share * k)
    if n_dense > 0:
        lightest = sorted_blocks(a.sum(dim=-1).view(1, -1), descending=False).indices[0, :n_dense]  # smallest L1
        mask[lightest] = True
    return mask


def _show_scale_of_mode(par: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a MaxQ layer's parametrization: in eval mode its product uses the scale of the
    iteration just trained (:meth:`Maxq.eval_mask`), in train mode the next iteration's.

    It runs wherever the effective weight is computed (the layer's forward, ``module.weight``); the two
    scales live on the parametrization (not saved: :meth:`Maxq.refresh` recomputes them after a load), so
    the hook holds no reference and goes with the parametrization on ``squash``.
    """
    scales = par.__dict__.get("maxq_scales")
    if scales is None:
        return
    show_eval = not par.training
    if show_eval != par.__dict__.get("maxq_showing_eval", False):
        par.scale.copy_(scales[1] if show_eval else scales[0])
        par.maxq_showing_eval = show_eval


def _set_eval_scale(par: torch.nn.Module, eval_scale: torch.Tensor | None) -> None:
    """Keep ``eval_scale`` (and a copy of the train scale just set) for :func:`_show_scale_of_mode`."""
    if not par.__dict__.get("maxq_hooked", False):
        par.register_forward_pre_hook(_show_scale_of_mode)
        par.maxq_hooked = True
    par.maxq_scales = None if eval_scale is None else (par.scale.clone(), eval_scale)
    par.maxq_showing_eval = False


@register
class Maxq(Method):
    name = "maxq"
    order = 10
    description = "MaxQ: top-N mask times multi-axis soft scores; N:M share of blocks grows over a window"
    paper = "Xiang et al., CVPR 2024"
    Options = MaxqOptions
    backward_note = "dX through W*mask(t) (soft); dense STE dW + lambda*(1-B)*W"
    dense_every_step = "scales every weight by its soft scores and steps with the dense gradient every iteration"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        o = options
        self.decay_start = resolve_step(o.decay_start, self.total_steps, "decay_start")
        self.decay_end = resolve_step(o.decay_end, self.total_steps, "decay_end")
        s, t = self._window()
        if t < s:
            raise ConfigError(f"decay_end={self.decay_end} comes before decay_start={self.decay_start}")
        if t == s and s > 0 and o.schedule in ("linear", "cubic"):
            raise ConfigError(f"an empty window at {s} > 0 is undefined for the {o.schedule} schedule")
        if o.schedule == "exp" and 0 < t - s <= 1:
            raise ConfigError("the exp schedule needs a window longer than one epoch (or iteration)")

    def resolved_options(self) -> dict:
        return {**super().resolved_options(), "decay_start": self.decay_start, "decay_end": self.decay_end}

    # -- schedule ------------------------------------------------------------------------------------------
    def _epoch_length(self) -> int:
        """Iterations per schedule step: the run's epoch (granularity "epoch", when known) or 1."""
        if self.options.granularity == "epoch" and self.steps_per_epoch:
            return self.steps_per_epoch
        return 1

    def _window(self) -> tuple[float, float]:
        spe = self._epoch_length()
        return self.decay_start / spe, self.decay_end / spe

    def share(self, t: int) -> float:
        """p at iteration t: the share of blocks kept dense."""
        return dense_share(t // self._epoch_length(), *self._window(), self.options.schedule)

    def _kept_per_block(self, p: float) -> int:
        """The most entries a block keeps at share p (every block, for ``incremental="per_block"``)."""
        if self.options.incremental == "per_block":
            return self.m - math.floor((self.m - self.n) * (1.0 - p))
        return self.m if p > 0.0 else self.n

    def plan(self, t: int) -> Step:
        p = self.share(t)
        return Step("incremental" if p > 0.0 else "nm", keep=self._kept_per_block(p), select=True,
                    record="every" if t > 0 else "none", grad="dense")

    # -- per layer -------------------------------------------------------------------------------------------
    def select(self, t: int, layer, keep: int) -> torch.Tensor:
        return incremental_mask(layer.blocks(layer.weight.detach()), self.n, self.share(t), self.options.incremental)

    def refresh(self, t: int, layer) -> None:
        weight = layer.weight.detach()
        s_f, s_k = soft_scores(weight, self.n, self.m, self.options.tau)
        layer.par.set_scale(mask_values(layer.mask, s_f, s_k).to(weight.dtype))  # 0 or in [1, 3]
        evaluated = self.eval_mask(t, layer)
        _set_eval_scale(layer.par, None if evaluated is None else mask_values(evaluated, s_f, s_k).to(weight.dtype))

    def eval_mask(self, t: int, layer) -> torch.Tensor | None:
        """The hard mask an evaluation before iteration t uses, where it is not t's: the incremental mask of
        the iteration just trained (p(t-1)) from the current weights, when p changed at t (an epoch boundary
        inside the window). None elsewhere, and at the end of the run (t = T), whose mask is the final one."""
        if t == 0 or (self.total_steps is not None and t >= self.total_steps):
            return None
        share = self.share(t - 1)
        if share == self.share(t):
            return None
        return layer.unblocks(incremental_mask(layer.blocks(layer.weight.detach()), self.n, share,
                                               self.options.incremental))

    def on_grad(self, t: int, layer, grad: torch.Tensor, ctx) -> None:
        add_sr_ste_decay(grad, layer, self.options.lambda_w)  # straight-through: the dense G, plus the decay

    def charge(self, t: int, layer) -> Charge:
        p, r = self.share(t), self.r
        if self.options.incremental == "per_block":
            kept = self._kept_per_block(p)
            d, nm_blocks = kept / self.m, float(kept == self.n)
        else:
            n_dense = math.floor(p * layer.num_blocks)
            d = (n_dense + (layer.num_blocks - n_dense) * r) / layer.num_blocks  # p + (1 - p) r, per layer
            nm_blocks = (layer.num_blocks - n_dense) / layer.num_blocks
        return Charge(fwd=d, dx=d, dw=1.0, nm=r, nm_blocks=nm_blocks)
