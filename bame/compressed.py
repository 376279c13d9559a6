"""Compressed N:M storage: a sparse layer keeps only its kept values and their in-block positions.

``bame.sparsify(..., storage="compressed")``. From the iteration on which a method's pruned weights are
exactly zero and its masks only change at known iterations (BAME, LMA, BAME-dagger and RigL-NM from t_i;
static from the start; ASP from its prune), every sparse layer is *switched* (:func:`compress`):

* its weight parameter is replaced, in the module and in the optimizer's parameter group, by a parameter
  holding the kept values ``(K, N)`` (K blocks of M along the input channels, N kept each), and a buffer
  holds their in-block positions (uint8 ``(K, N)``);
* the optimizer's state of that parameter (SGD's momentum, Adam's moments) is gathered into the slots,
  so the optimizer updates ``K * N`` values instead of ``K * M`` weights;
* the layer's products run on the values (:mod:`bame.kernels.compressed`): the weight gradient is
  computed at the kept slots only.

A mask update is slot-stable (:func:`update_slots`): a block that drops position p and grows q writes q
into p's slot and zeroes the slot's value and every optimizer-state entry, so no shape ever changes and the
optimizer, DDP and checkpoints stay valid. The dense gradient LMA scores on an update iteration comes from
one dense weight-gradient product of that iteration (``want_dense_grad``), handed to the storage. Where the
method reads G only at the kept entries and the largest pruned |G| of each block (LMA, RigL-NM:
``top_pruned_gradient``) and every step has one forward and backward, the storage keeps only those
(``compact_grad``): no layer's dense gradient outlives its backward, and the update iteration's peak memory
stays near an ordinary one's.

``module.weight`` stays the dense weight when read (a scatter of the values); ``model.state_dict()`` holds
the dense weight under its usual key, and loading a dense weight into a compressed layer gathers it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from bame import native
from bame.kernels import ops  # noqa: F401 (registers the bame:: operators the traced products call)
from bame.kernels.compressed import compressed_conv, compressed_linear, conv_geometry, time_layer_step
from bame.kernels.conv import ConvPlan, choose_conv_plan, native_conv_problem
from bame.kernels.packed import index_dtype
from bame.kernels.plan import Plan, choose_plan
from bame.kernels.slots import Slots
from bame.nm import from_blocks, kept_indices, to_blocks

__all__ = ["CompressedNM", "choose_products", "compress", "decompress", "dense_is_faster", "load_plan", "plan_state",
           "storage_problem", "update_slots"]


def storage_problem(module: nn.Module, group_axis: str) -> str | None:
    """Why a sparse layer cannot be stored compressed, or None."""
    if group_axis != "cin":
        return "compressed storage needs group_axis='cin' (N:M along the input channels)"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped convolution (groups={module.groups}) has no compressed product"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "compressed convolutions need explicit zero padding"
        return None
    return f"{type(module).__name__} has no compressed product (Linear and Conv2d have)"


class _DenseView(torch.autograd.Function):
    """The dense weight from the values (``module.weight`` read by a user): a scatter whose backward
    gathers at the slots, and hands the dense gradient to the storage on update iterations."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, storage: CompressedNM) -> Tensor:
        ctx.storage = storage
        return storage.dense(values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.storage.want_dense_grad:
            ctx.storage.stash(grad)
        return ctx.storage.gather(grad), None


class CompressedNM(Slots, nn.Module):
    """The parametrization of a compressed layer's weight: ``values (K, N) -> dense W`` (a scatter).

    Buffers (saved by the sparsifier's state, not the model's): ``indices``, uint8 ``(K, N)``, the in-block
    position of every slot (slots keep their place across mask updates, so positions are not sorted).
    """

    def __init__(self, shape: tuple[int, ...], n: int, m: int, indices: Tensor) -> None:
        super().__init__()
        self.shape, self.n, self.m = tuple(shape), n, m
        self.register_buffer("indices", indices.to(index_dtype(m)).contiguous(), persistent=False)
        self.register_buffer("bwd_keep", None, persistent=False)  # slots the input gradient uses (BAME-dagger)
        self.want_dense_grad = False  # this iteration's method needs the dense weight gradient
        self.dense_grad: Tensor | None = None  # that gradient, accumulated over the iteration's backwards
        #: keep only the kept entries' and each block's largest pruned gradients (one backward per step)
        self.compact_grad = False
        #: ``(kept (K, N), pruned positions (K, P), pruned gradients (K, P))`` of a compact update gradient
        self.compact: tuple[Tensor, Tensor, Tensor] | None = None
        self.forwards = 0  # training forwards since the sparsifier last counted them (one per step, or more)
        self.forward_impl: Any = None
        self.plan: Any = None  # the Linear kernels' plan (bame.kernels.choose_plan), chosen at the first forward
        self.pending: Tensor | None = None  # a dense weight loaded before the slots (see load_pending)
        self.plan_kernels = False
        self._inference: tuple[tuple, Tensor] | None = None
        self.kernel_grads: list = []
        self._cache: dict[str, tuple[int, Tensor]] = {}
        self.hooks: list[Any] = []  # the module's state-dict hooks of compressed storage (removed by decompress)

    # -- what the dense-mode parametrization offers, so the sparsifier treats both alike -----------------
    weights_pruned = True
    scale = None
    bwd_mask = None

    @property
    def mask(self) -> Tensor:
        """The forward mask B (bool, the weight's shape), from the slots (cached until they change)."""
        return self._cached("mask", lambda: from_blocks(self.block_mask(), self.shape, "cin").contiguous())

    def note(self) -> str:
        """What computes the layer's products, for the layer report."""
        if self.plan is not None:
            return f"compressed; {self.plan.reason}"
        if not self.plan_kernels:
            return "compressed; dense products on the scattered weight"
        return "compressed; sparse kernels: plan chosen at the first forward"

    def grad_is_masked(self, grad: Tensor) -> bool:
        return True  # the values' gradient has no pruned entries

    # -- values <-> dense (dense, gather, packed: bame.kernels.slots.Slots) ------------------------------
    @torch.no_grad()
    def inference_weight(self, values: Tensor) -> Tensor:
        """The dense weight for inference, kept until the values or the slots change."""
        key = (values.data_ptr(), values._version, self.indices._version)
        if self._inference is None or self._inference[0] != key:
            self._inference = (key, self.dense(values.detach()))
        return self._inference[1]

    @torch.no_grad()
    def load_pending(self, values: Tensor) -> None:
        """Gather a dense weight loaded by ``model.load_state_dict`` before the sparsifier state set the slots
        (either order of loading gives the same values)."""
        if self.pending is not None:
            values.copy_(self.gather(self.pending).to(values.dtype))
            self.pending = None

    def stash(self, grad: Tensor) -> None:
        """Accumulate this iteration's dense weight gradient (update iterations; micro-batches add up), or
        keep its compact form (``compact_grad``: one backward per iteration)."""
        grad = grad.detach().reshape(self.shape)
        if not self.compact_grad:
            self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad.add_(grad)
            return
        self._check_one_backward()
        self.compact = self._compact(to_blocks(grad, self.m, "cin").contiguous(), self.indices)

    def stash_product(self, dy: Tensor, x: Tensor) -> Tensor:
        """A Linear layer's compact update gradient from ``dY (T, out)`` and ``X (T, in)``: the dense product
        ``dY^T X`` in chunks of output rows (about 4 MB each; a block never straddles rows), each reduced to
        its kept and largest pruned entries at once, so no weight-sized gradient is ever allocated. Returns the
        kept values' gradient ``(K, N)``."""
        self._check_one_backward()
        out, in_ = self.shape
        per_row = in_ // self.m  # blocks per output row
        rows = max(1, (1 << 20) // in_)
        parts = []
        for r0 in range(0, out, rows):
            blocks = (dy[:, r0:r0 + rows].t() @ x).reshape(-1, self.m)  # (rows * per_row, M)
            parts.append(self._compact(blocks, self.indices[r0 * per_row:(r0 + rows) * per_row]))
        self.compact = tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[assignment]
        return self.compact[0].clone()  # the values' gradient: AMP's unscaling and clipping change it in place

    def _compact(self, blocks: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(K, M)`` gradient blocks held by ``slots`` as ``(kept, pruned positions, pruned gradients)``."""
        return blocks.gather(1, slots.long()), *top_pruned(blocks, slots, self.n)

    def _check_one_backward(self) -> None:
        if self.compact is not None:
            raise RuntimeError("bame: a second backward on a mask-update iteration of a compressed layer whose "
                               "previous step had one: compressed storage keeps a compact update gradient when "
                               "steps have one forward and backward each; keep the number of forwards per step "
                               "steady (gradient accumulation from the first step on)")

    def compact_dense_grad(self) -> Tensor | None:
        """The dense gradient the compact one stands for: the kept and the largest pruned entries of every
        block, zero elsewhere (the proposal reads no other entry)."""
        if self.compact is None:
            return None
        kept, where, pruned = self.compact
        blocks = torch.zeros(kept.shape[0], self.m, dtype=kept.dtype, device=kept.device)
        blocks.scatter_(1, self.indices.long(), kept).scatter_(1, where.long(), pruned)
        return from_blocks(blocks, self.shape, "cin").contiguous()

    def forward(self, values: Tensor) -> Tensor:
        return _DenseView.apply(values, self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in ("mask", "osc", "sad")]:
            del state_dict[key]  # entries of the dense-mode parametrization (older model state dicts)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _product(storage: CompressedNM) -> Any:
    """The forward of a compressed module (installed as the parametrization's ``forward_impl``): its
    products call the native kernels, and on update iterations its weight gradient feeds the storage's mask
    update. Under ``torch.compile`` the products are custom operators (:func:`_traced_product`)."""

    def forward(module: nn.Module, x: Tensor) -> Tensor:
        values = module.parametrizations.weight.original
        if torch.compiler.is_compiling():
            return _traced_product(module, storage, x, values)
        return eager(module, x, values)

    @torch.compiler.disable
    def eager(module: nn.Module, x: Tensor, values: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not probing():
            storage.forwards += 1
        if not torch.is_grad_enabled() and (storage.plan is None or storage.plan.fwd == "dense"):
            weight = storage.inference_weight(values).to(x.dtype)  # scattered once per change of W or B
            if isinstance(module, nn.Linear):
                return torch.nn.functional.linear(x, weight, module.bias)
            return module._conv_forward(x, weight, module.bias)
        if storage.plan is None and storage.plan_kernels and not probing():
            storage.plan = choose_products(storage, module, x.shape, x.dtype, x.device)
        if isinstance(module, nn.Linear):
            return compressed_linear(x, values, storage, module.bias, storage.plan)
        return compressed_conv(x.contiguous(), values, storage, module.bias, module.stride, module.padding,
                               module.dilation, storage.plan)

    forward.eager = eager  # type: ignore[attr-defined]
    return forward


def dense_is_faster(plan: Any, n: int, m: int) -> bool:
    """Whether a layer trains faster in dense storage (masked) than compressed: its timed plan computes every
    product dense, and at density N/M of at least 1/2 the scatter of the values and the gather of the weight
    gradient a compressed layer adds to dense products (about 3.5 ms on a 4096 x 1024 layer here) cost more
    than the optimizer work it saves (half a pass: about 2.5 ms). Such a layer stays dense, named in the layer
    report; ``kernel="dense"`` (dense products on the scattered weight, no plan) always compresses."""
    return plan is not None and plan.is_dense and 2 * n >= m


def probing() -> bool:
    """True inside a probe of the model (a FLOPs count's ``FlopCounterMode``, any ``TorchDispatchMode``):
    such a forward, often on one sample, neither chooses a layer's plan (dense products serve it) nor counts
    as the training input the plan is chosen for."""
    return is_in_torch_dispatch_mode()


def choose_products(storage: CompressedNM, module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> Any:
    """The plan of a compressed layer's products for inputs of ``shape``: timed sparse formulations against
    dense ones (:func:`bame.kernels.choose_plan`, :func:`bame.kernels.conv.choose_conv_plan`); None where
    only dense products can run (a CUDA tensor, no native kernels)."""
    if isinstance(module, nn.Linear):
        out, in_ = storage.shape
        tokens = math.prod(shape) // in_
        with torch.enable_grad():  # the switch happens inside optimizer.step, and the timing runs backwards
            return _agreed(choose_plan(out, in_, storage.n, storage.m, tokens, dtype, device,
                                       layer_timer=time_layer_step))
    if native_conv_problem(torch.empty(0, dtype=dtype, device=device), module.stride) is not None:
        return None
    geo = conv_geometry(storage, torch.empty(shape, dtype=dtype, device="meta"), module.padding, module.dilation,
                        module.stride)
    return _agreed(choose_conv_plan(geo, storage.n, storage.m, shape[0], dtype, device))


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Called around a mask update of compressed layers: glibc's mmap threshold adapts upwards once a large
    block is freed, so a backward's activations and the update's (K, M) temporaries (16 MB each for a
    4096 x 1024 layer) come from its heap, and freed heap pages stay resident; without this the update's
    temporaries land on top of the backward's peak. Before the update and after each layer's, once per
    ``delta_t`` iterations: a trim takes about a millisecond, and the next step faults its pages back in
    (about 20 ms for the 1:16 MLP of ``benchmarks/bench_compressed.py``, 0.2 ms per step amortised).
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def distributed() -> bool:
    """Whether this process is one of several data-parallel ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agreed(plan: Any) -> Any:
    """Rank 0's plan on every rank: plans are chosen by timing, and ranks that timed differently would
    sum in different orders and drift apart (every rank chooses its plans at the same forward)."""
    if not distributed():
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def plan_state(plan: Any) -> dict[str, Any] | None:
    """A chosen plan as plain data (the sparsifier's state): a resumed run computes with the same
    formulations, so it sums in the same order and stays bit-exact, whatever timing says that day."""
    if plan is None:
        return None
    return {"kind": "conv" if isinstance(plan, ConvPlan) else "linear", **dataclasses.asdict(plan)}


def load_plan(state: dict[str, Any] | None) -> Any:
    """The inverse of :func:`plan_state`."""
    if state is None:
        return None
    fields = {k: v for k, v in state.items() if k != "kind"}
    return ConvPlan(**fields) if state["kind"] == "conv" else Plan(**fields)


def _traced_product(module: nn.Module, storage: CompressedNM, x: Tensor, values: Tensor) -> Tensor:
    """Under ``torch.compile``: the products as custom operators (:mod:`bame.kernels.ops`), one graph node
    each. Iterations that hand the dense weight gradient to the storage (BAME's updates, one per delta_t)
    and the first forward, which chooses the plan by timing, run eagerly (a graph break on those only)."""
    if storage.want_dense_grad or (storage.plan is None and storage.plan_kernels and _plannable(module, x)):
        return storage.forward_impl.eager(module, x, values)  # (an eager function: a graph break here)
    fwd, dx, dw = ("dense",) * 3 if storage.plan is None else (storage.plan.fwd, storage.plan.dx, storage.plan.dw)
    if isinstance(module, nn.Linear):
        out, in_ = storage.shape
        return torch.ops.bame.compressed_linear(x, values, storage.indices, module.bias, storage.bwd_keep, out, in_,
                                                storage.n, storage.m, fwd, dx, dw)
    return torch.ops.bame.compressed_conv(x, values, storage.indices, module.bias, storage.bwd_keep,
                                          list(storage.shape), storage.n, storage.m, list(module.stride),
                                          list(module.padding), list(module.dilation), fwd, dx, dw)


def _plannable(module: nn.Module, x: Tensor) -> bool:
    """Whether a plan will be chosen for this layer (Linear layers always; convolutions the native kernels
    can compute)."""
    return isinstance(module, nn.Linear) or native_conv_problem(x, module.stride) is None


def _state_dict_hook(storage: CompressedNM):
    """``model.state_dict()`` keeps the dense weight under ``...parametrizations.weight.original``."""

    def hook(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
        key = prefix + "original"
        if key in state and state[key].shape != storage.shape:
            state[key] = storage.dense(state[key])

    return hook


def _load_pre_hook(storage: CompressedNM):
    """Loading a dense weight (the form ``state_dict`` writes) into a compressed layer gathers its slots."""

    def hook(state: dict, prefix: str, *args: Any) -> None:
        key = prefix + "original"
        if key in state and tuple(state[key].shape) == storage.shape:
            storage.pending = state[key].to(storage.indices.device)  # until the slots are loaded, if they come after
            state[key] = storage.gather(storage.pending)

    return hook


@torch.no_grad()
def compress(module: nn.Module, mask: Tensor, n: int, m: int, optimizer: torch.optim.Optimizer | None,
             indices: Tensor | None = None, plan_kernels: bool = False) -> CompressedNM:
    """Switch a masked layer (dense-mode parametrization, pruned weights zero) to compressed storage.

    Args:
        module: the sparse module (parametrized).
        mask: its bool mask (the weight's shape), N per block.
        n: N.
        m: M.
        optimizer: the optimizer holding the weight; its state is gathered into the slots.
        indices: the slot order to use (a resumed run's), else the kept positions in ascending order.
        plan_kernels: choose, by timing at the first forward, sparse or dense products for each product of a
            Linear layer (:func:`bame.kernels.choose_plan`); else dense products on the scattered weight.

    Returns:
        The new parametrization.
    """
    plist = module.parametrizations.weight
    weight = plist.original
    shape = tuple(weight.shape)
    if indices is None:
        indices = kept_indices(to_blocks(mask, m, "cin"), n)  # (K, N)
    storage = CompressedNM(shape, n, m, indices.to(mask.device))
    storage.plan_kernels = plan_kernels
    values = storage.gather(weight.detach())
    values_param = nn.Parameter(values.contiguous(), weight.requires_grad)
    swap_parameter(optimizer, weight, values_param, storage.gather)
    plist.original = values_param
    storage.forward_impl = _product(storage)
    plist[0] = storage
    storage.hooks = [plist._register_state_dict_hook(_state_dict_hook(storage)),
                     plist._register_load_state_dict_pre_hook(_load_pre_hook(storage))]
    return storage


@torch.no_grad()
def decompress(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> Tensor:
    """Back to a dense weight (``squash``): the values scattered, the optimizer state too. Returns the mask."""
    plist = module.parametrizations.weight
    storage: CompressedNM = plist[0]
    weight = plist.original
    mask = storage.mask.clone()
    dense = nn.Parameter(storage.dense(weight.detach()).contiguous(), weight.requires_grad)
    swap_parameter(optimizer, weight, dense, lambda v: storage.dense(v).contiguous())
    plist.original = dense
    for handle in storage.hooks:  # the weight is dense again: state dicts hold and load it as it is
        handle.remove()
    return mask


def swap_parameter(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, new: nn.Parameter,
                   convert: Any) -> None:
    """Put ``new`` in ``old``'s place in the optimizer's parameter group, with ``old``'s state converted
    (``convert`` maps every state tensor shaped like ``old``; scalars such as Adam's step stay)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {k: convert(v).contiguous() if torch.is_tensor(v) and v.shape == old.shape else v
                                for k, v in state.items()}


@torch.no_grad()
def update_slots(storage: CompressedNM, values: Tensor, new_blocks: Tensor,
                 optimizer: torch.optim.Optimizer | None) -> Tensor:
    """Make ``new_blocks`` the mask, slot-stably: a block that drops position p and grows q writes q into p's
    slot; the value and every optimizer-state entry of a rewritten slot become zero.

    Args:
        storage: the layer's compressed structure.
        values: the values parameter ``(K, N)``.
        new_blocks: bool ``(K, M)``, N per block.
        optimizer: the optimizer holding ``values``.

    Returns:
        The changed mask entries (dropped plus grown) as a 0-d tensor: the dense-mode flip count.
    """
    old = storage.indices.long()  # (K, N)
    new_blocks = new_blocks.bool()
    stays = new_blocks.gather(1, old)  # (K, N): the slot's position is still kept
    freed = ~stays
    grown = new_blocks & ~storage.block_mask()  # (K, M): as many per block as it frees
    # The r-th freed slot of a block (in slot order) takes the block's r-th grown position (ascending): both
    # lists come out of nonzero() in row-major order, block by block, so they pair up one to one. Only the
    # changed entries (about 1% of blocks per update) are listed: no (K, M) sort.
    new = old.clone()
    slot, position = freed.nonzero(), grown.nonzero()
    if slot.shape != position.shape:
        raise ValueError(f"a mask update must keep {storage.n} per block: {slot.shape[0]} slots freed, "
                         f"{position.shape[0]} positions grown")
    new[slot[:, 0], slot[:, 1]] = position[:, 1]
    values.masked_fill_(freed, 0.0)
    state = optimizer.state.get(values, {}) if optimizer is not None else {}
    for value in state.values():
        if torch.is_tensor(value) and value.shape == values.shape:
            value.masked_fill_(freed, 0)
    storage.indices.copy_(new)
    storage._cache.clear()  # what was derived from the old slots goes now, not when next rebuilt
    return 2 * torch.count_nonzero(freed)


@torch.no_grad()
def top_pruned(blocks: Tensor, indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``min(N, M - N)`` largest-|G| entries of every ``(K, M)`` block that its slots ``indices`` do not
    hold (NaN as +inf, ties to the lower position): positions (uint8) and gradients, ``(K, P)`` each."""
    m = blocks.shape[-1]
    p = min(n, m - n)
    if native.ready(blocks) and m <= 64 and indices.dtype == torch.uint8 and indices.is_contiguous():
        return native.top_pruned(blocks, indices, p)
    mag = torch.nan_to_num(blocks.abs(), nan=math.inf, posinf=math.inf)
    mag.scatter_(1, indices.long(), -1.0)  # held entries are never chosen
    order = torch.sort(mag, dim=1, descending=True, stable=True).indices[:, :p]
    return order.to(torch.uint8), blocks.gather(1, order)


@torch.no_grad()
def dense_gradient(storage: CompressedNM, values: Tensor) -> Tensor | None:
    """This iteration's dense weight gradient, as the optimizer will see the values' gradient: averaged over
    data-parallel ranks (as DDP averages the values'), and scaled as the values' gradient was since the
    backward (AMP's unscaling, clipping)."""
    grad = storage.dense_grad if storage.compact is None else storage.compact_dense_grad()
    if grad is None:
        return None
    if storage.compact is None and distributed():
        dist.all_reduce(grad)
        grad.div_(dist.get_world_size())
    if values.grad is not None:
        at_slots = storage.gather(grad)
        norm = torch.dot(at_slots.flatten(), at_slots.flatten())
        if bool(norm > 0):
            grad.mul_(torch.dot(values.grad.flatten().to(grad.dtype), at_slots.flatten()) / norm)
    return grad
