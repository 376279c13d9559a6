"""The sparsifier: attaches N:M masks to a model and runs a method's plan from the optimizer's step hooks.

    sparsifier = bame.sparsify(model, optimizer, method="bame", nm="1:16", total_steps=T)

The training loop stays as it was. The sparsifier registers a step pre-hook and a step post-hook on the
optimizer (no monkey-patching), so it acts exactly when the optimizer really steps: gradient
accumulation and AMP's GradScaler (which skips steps on overflow) work unchanged, and under
DistributedDataParallel it sees the all-reduced gradient, so every rank decides the same mask.

It drives any object with the method protocol (:class:`bame.contract.Method`): each iteration t it reads
the method's :class:`~bame.contract.Step` and does what it says, for every sparse layer, through one
mask-commit path (:meth:`Sparsifier.commit`): masks change in place, weights and optimizer state are zeroed
where the step says, flips are counted (on the device: no host sync for per-iteration re-selections), and
updates are recorded for ``updates.jsonl``.

Like ``torch.optim`` and ``torch.ao.pruning`` it offers ``state_dict()``/``load_state_dict()``,
``squash()`` (bake masks into plain weights), ``masks()`` and a per-layer report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bame import compressed, masking
from bame.contract import Method, Step
from bame.errors import CheckpointError, ConfigError
from bame.flops import Charge
from bame.kernels.slots import SlotStructure
from bame.nm import backward_mask, block_flips, blocking_problem, format_nm, from_blocks, to_blocks
from bame.policy import LayerFilter, select_layers

_STATE_VERSION = 2  # 2: the layers' statistics hold the per-iteration re-selection counters
#: Per-iteration re-selections are aggregated into one event per layer every ``ceil(T / EVENTS_PER_RUN)``
#: iterations (100 when T is unknown): a few hundred lines per layer over a whole run.
EVENTS_PER_RUN = 200

#: Optimizers whose update of an entry is exactly zero when its weight, gradient and state are all zero there
#: (every option of theirs: momentum, Nesterov, weight decay, AMSGrad, centered, decoupled decay ...), so a
#: pruned weight with a masked gradient and zeroed state stays exactly zero without a re-masking multiply.
#: Exact classes only: a subclass may change the update. tests/test_sparsifier.py checks each one.
ZERO_PRESERVING_OPTIMIZERS: frozenset[type] = frozenset({
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax,
})


class SparseLayer:
    """One sparse layer: its module, raw weight, mask, per-layer method state and statistics.

    Per-layer state tensors (the method's :meth:`~bame.contract.Method.layer_state`, ``sad`` for evolving
    methods) are buffers of the layer's parametrization, so they follow ``model.to(device)``; they are
    saved by :meth:`Sparsifier.state_dict`, not by ``model.state_dict()``.
    """

    def __init__(self, name: str, module: nn.Module, n: int, m: int, group_axis: str) -> None:
        self.name = name  # the weight's name in the original model's state_dict
        self.module_name = name.rsplit(".", 1)[0]
        self.module = module
        self.n, self.m, self.group_axis = n, m, group_axis
        self.shape = tuple(module.weight.shape)
        self.par = masking.attach(module, torch.ones(self.shape, dtype=torch.bool))
        self.num_blocks = module.weight.numel() // m
        self.state_names: list[str] = []
        self.bwd_note: str | None = None  # why a wanted backward mask is not used on this layer
        self.kernel_note: str | None = None  # which products run sparse kernels (kernel="sparse")
        self.kernel: Any = None  # the dense-storage sparse kernels' state (bame.kernels.attach), if attached
        self.storage_note: str | None = None  # why the layer stays in dense storage under storage="compressed"
        # Statistics of recorded selections (updates, flips), see Sparsifier.commit. Flips of per-iteration
        # re-selections stay on the device until read (``flips``).
        self.updates = 0
        self.frozen_fraction = 0.0
        self.par.register_buffer("flips", torch.zeros(3, dtype=torch.int64, device=self.mask.device),
                                 persistent=False)  # a buffer: it follows model.to(device), no host copies
        self.window = 0  # re-selections since the last aggregated event
        self.input_seen: tuple | None = None  # (shape, dtype, device) of the first training input (watch_input)
        self.forwards = 0  # training forwards since the sparsifier last counted them (watch_input, stored dense)
        self._watch: Any = None

    # -- tensors -----------------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        """The raw weight W (the parameter the optimizer updates)."""
        return masking.raw_weight(self.module)

    @property
    def mask(self) -> torch.Tensor:
        """The forward mask B (bool, the weight's shape); changed only through :meth:`Sparsifier.commit`."""
        return self.par.mask

    @property
    def has_bwd_mask(self) -> bool:
        """Whether the input gradient runs through a backward mask (N:M along the outputs)."""
        return self.par.bwd_mask is not None or getattr(self.par, "bwd_keep", None) is not None

    @property
    def flips(self) -> torch.Tensor:
        """The flip counters of recorded selections, on the mask's device: ``[total, last, since the last
        event]``."""
        return self.par.flips

    @property
    def compressed(self) -> compressed.CompressedNM | None:
        """The compressed structure once the layer is stored compressed, else None."""
        return self.par if isinstance(self.par, compressed.CompressedNM) else None

    def weight_blocks(self) -> torch.Tensor:
        """The weight W as ``(K, M)`` blocks (a scatter of the values when stored compressed)."""
        storage = self.compressed
        weight = self.weight.detach()
        return self.blocks(weight if storage is None else storage.dense(weight))

    @torch.no_grad()
    def compress(self, optimizer: torch.optim.Optimizer | None, indices: torch.Tensor | None = None,
                 plan_kernels: bool = False, plan: Any = None) -> None:
        """Switch to compressed storage (pruned weights must be zero); the layer's state moves along. With
        ``plan_kernels``, ``plan`` (else the one :meth:`planned_products` chooses) computes its products."""
        states = {name: self.state(name) for name in (*self.state_names, "flips")}
        backward = self.has_bwd_mask
        self.par = compressed.compress(self.module, self.mask, self.n, self.m, optimizer, indices, plan_kernels)
        for name, tensor in states.items():
            self.par.register_buffer(name, tensor, persistent=False)
        if backward:  # BAME-dagger: the backward mask becomes a subset of the slots
            self.par.bwd_keep = torch.zeros(self.par.indices.shape, dtype=torch.bool, device=self.mask.device)
        if plan_kernels:  # planned now (for the training input seen), so that a checkpoint holds the plan
            self.par.plan = self.planned_products() if plan is None else plan
        self.stop_watching()

    def planned_products(self) -> Any:
        """The plan of this layer's compressed products for the largest training input seen (None: no input
        seen yet, or only dense products can run): :func:`bame.compressed.choose_products`."""
        if self.input_seen is None:
            return None
        slots = SlotStructure(self.shape, self.n, self.m, None)
        return compressed.choose_products(slots, self.module, *self.input_seen)

    def keep_dense(self, plan: Any) -> None:
        """Stay in dense storage (masked) under ``storage="compressed"``: every product of the layer is faster
        dense, and at this density a scatter and a gather cost more than the optimizer work saved."""
        self.storage_note = f"dense storage: every product is faster dense ({plan.reason})"
        self.stop_watching()

    @torch.no_grad()
    def uncompress(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Back to dense storage (the inverse of :meth:`compress`): the weight and its optimizer state
        scattered, the layer's state moved to a dense-mode parametrization."""
        storage = self.compressed
        states = {name: self.state(name) for name in (*self.state_names, "flips")}
        mask = compressed.decompress(self.module, optimizer)
        self.par = masking.NMMask(mask.to(self.weight.device))
        for name, tensor in states.items():
            self.par.register_buffer(name, tensor, persistent=False)
        if storage.bwd_keep is not None:  # recomputed from the weights by the sparsifier's refresh
            self.par.set_bwd_mask(mask)
        self.module.parametrizations.weight[0] = self.par

    def take_forwards(self) -> int:
        """The training forwards since the last call (eager ones; a compiled forward is not counted)."""
        storage = self.compressed
        count = self.forwards + (storage.forwards if storage is not None else 0)
        self.forwards = 0
        if storage is not None:
            storage.forwards = 0
        return count

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def watch_input(self) -> None:
        """Record the largest training input seen before the switch (a hook, removed at the switch): the
        compressed products' plan is chosen for it at the switch, not at the next forward, so that a
        checkpoint between the two holds it. The largest, not the first: a FLOPs count traces the model on
        one or two samples, and an epoch's last batch may be short."""

        def hook(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and not torch.compiler.is_compiling() and args and not compressed.probing():
                self.forwards += 1
                x = args[0]
                if self.input_seen is None or x.numel() > math.prod(self.input_seen[0]):
                    self.input_seen = (tuple(x.shape), x.dtype, x.device)

        self._watch = self.module.register_forward_pre_hook(hook)

    def blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as its ``(K, M)`` block view."""
        return to_blocks(tensor, self.m, self.group_axis)

    def unblocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return from_blocks(blocks, self.shape, self.group_axis)

    def add_state(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Register a per-layer state tensor (saved by ``Sparsifier.state_dict``) and return it."""
        self.par.register_buffer(name, tensor.to(self.mask.device), persistent=False)
        if name not in self.state_names:
            self.state_names.append(name)
        return getattr(self.par, name)

    def state(self, name: str) -> torch.Tensor:
        return getattr(self.par, name)

    # -- statistics --------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """``updates``, ``last_flips``, ``total_flips`` (recorded selections) and OBF's ``frozen_fraction``."""
        total, last, _ = self.flips.tolist()
        return {"updates": self.updates, "last_flips": last, "total_flips": total,
                "frozen_fraction": self.frozen_fraction}

    def count(self, flips: torch.Tensor) -> None:
        """Add one recorded selection's flips (a 0-d tensor, on the device: no host sync)."""
        self.updates += 1
        self.flips[0] += flips
        self.flips[1] = flips
        self.flips[2] += flips

    # -- operations ----------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_grad(self) -> None:
        """Sparse weight gradient: ``grad *= B`` (skipped when the sparse kernels produced it masked, and when
        stored compressed: the values' gradient has no pruned entries)."""
        grad = self.weight.grad
        if grad is not None and not self.par.grad_is_masked(grad):
            grad.mul_(self.par.mask_as(grad))

    def apply_mask(self, optimizer_keeps_zeros: bool = False) -> None:
        """Set pruned weights to exactly zero; a no-op skipped when they are zero already and the optimizer
        keeps zero entries at zero (their gradient and state are zero there)."""
        if self.compressed is not None or (self.par.weights_pruned and optimizer_keeps_zeros):
            return
        with torch.no_grad():
            self.weight.mul_(self.par.mask_as(self.weight))

    def density(self) -> float:
        return int(torch.count_nonzero(self.mask)) / self.mask.numel()


class Sparsifier:
    """Runs one method's plan over the sparse layers of a model; see :func:`bame.sparsify`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        method: Method,
        *,
        group_axis: str,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        layer_filter: LayerFilter | None = None,
        storage: str = "dense",
        kernel: str = "dense",
        verbose: bool = True,
    ) -> None:
        self.model = model
        self.method = method
        self.storage = storage  # "dense", or "compressed" from the iteration the plan allows it on
        self.kernel = kernel  # "sparse": measured per-layer plans of sparse products (bame.kernels)
        self.n, self.m = method.n, method.m
        self.group_axis = group_axis
        self.step_count = 0  # iterations done: the index of the next one
        self.layers: list[SparseLayer] = []
        self.dense_layers: dict[str, str] = {}  # weight name -> why it stays dense
        self.events: list[dict[str, Any]] = []  # per-update, per-layer statistics (drained by the engine)
        self.step_callbacks: list[Callable[[int], None]] = []  # called with t after each step
        # called once the layers are stored compressed (at the switch, or loading a state saved after it):
        # whatever holds the old parameters (a DistributedDataParallel wrapper) must be rebuilt
        self.switch_callbacks: list[Callable[[], None]] = []
        self.record_every = math.ceil(method.total_steps / EVENTS_PER_RUN) if method.total_steps else 100
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_keeps_zeros = False
        self._hooks: list[Any] = []
        self._squashed = False
        self._plan_cache: tuple[int, Step] | None = None
        self._switched = False
        #: the most training forwards a sparse layer saw in the last step (0: not counted, e.g. compiled)
        self.forwards_per_step = 0
        self._select(include, exclude, layer_filter)
        if optimizer is not None:
            self.bind(optimizer)
        for layer in self.layers:
            self._init_layer(layer)
            if storage == "compressed":
                layer.watch_input()
        self._ddp_ignore_buffers()
        self.prepare(self.step_count)
        if verbose and self.dense_layers:  # a warning, not a log line: seen without configuring logging
            warnings.warn(self.dense_summary(), stacklevel=3)

    def dense_summary(self, shown: int = 6) -> str:
        """One line naming the weight layers that stay dense, and why."""
        items = [f"{name} ({reason})" for name, reason in self.dense_layers.items()]
        more = f"; and {len(items) - shown} more (sparsifier.dense_layers)" if len(items) > shown else ""
        return (f"bame: {len(items)} of {len(items) + len(self.layers)} weight layers stay dense: "
                + "; ".join(items[:shown]) + more)

    # -- construction ----------------------------------------------------------------------------------
    def _select(self, include: Iterable[str], exclude: Iterable[str], layer_filter: LayerFilter | None) -> None:
        inner = _unwrap(self.model)
        if layer_filter is None:
            layer_filter = self.method.layer_filter()
        candidates = select_layers(inner, self.m, self.group_axis, include, exclude, layer_filter)
        if self.storage == "compressed":  # refused before any layer is touched
            self._check_compressible([c for c in candidates if c.reason is None])
        self.all_layers = [(f"{c.name}.weight", c.module) for c in candidates]
        for cand in candidates:
            wname = f"{cand.name}.weight"
            if cand.reason is not None:
                self.dense_layers[wname] = cand.reason
            elif not self.method.uses_masks:
                self.dense_layers[wname] = f"method {self.method.name!r} trains densely"
            else:
                self.layers.append(SparseLayer(wname, cand.module, self.n, self.m, self.group_axis))
        if self.method.uses_masks and not self.layers:
            raise ConfigError(
                f"the model has no layer that can be made {format_nm(self.n, self.m)} sparse "
                f"(group_axis={self.group_axis}): " + "; ".join(f"{k}: {v}" for k, v in self.dense_layers.items())
            )

    def _check_compressible(self, candidates: list) -> None:
        """Refuse compressed storage, in one line, for a method or a layer that cannot have it."""
        reason = self.method.dense_every_step
        if reason:
            raise ConfigError(f"method {self.method.name!r} cannot train with storage='compressed': it {reason}")
        for cand in candidates:
            problem = compressed.storage_problem(cand.module, self.group_axis)
            if problem is not None:
                raise ConfigError(f"storage='compressed' for {cand.name}.weight: {problem}")

    @property
    def switched(self) -> bool:
        """Whether the switch to compressed storage happened (every layer is compressed then, except those
        whose products are all faster dense: :func:`bame.compressed.dense_is_faster`)."""
        return self._switched

    def _switch(self) -> None:
        """Store the sparse layers compressed (their pruned weights are zero now, the masks final)."""
        plan_kernels = self.kernel == "sparse"
        for layer in self.layers:
            plan = layer.planned_products() if plan_kernels else None
            if compressed.dense_is_faster(plan, self.n, self.m):
                layer.keep_dense(plan)
            else:
                layer.compress(self.optimizer, plan_kernels=plan_kernels, plan=plan)
        self._switched = True
        self._parameters_changed()

    def _settle_storage(self) -> None:
        """Layers switched before any training input was seen (static, t_i = 0) chose their plan at their first
        forward: those whose products are all faster dense go back to dense storage, at a step boundary."""
        back = [layer for layer in self.layers if layer.compressed is not None
                and compressed.dense_is_faster(layer.compressed.plan, self.n, self.m)]
        for layer in back:
            plan = layer.compressed.plan
            layer.uncompress(self.optimizer)
            layer.keep_dense(plan)
        if back:
            self._parameters_changed()

    def _index_groups(self) -> None:
        """Which param group holds each sparse weight, by group *index* (``optimizer.load_state_dict``
        replaces the group dicts, so they are looked up when needed)."""
        self._group_of: dict[int, int] = {}
        for index, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                self._group_of[id(p)] = index
        for layer in self.layers:
            if id(layer.weight) not in self._group_of:
                raise ConfigError(f"the optimizer does not update {layer.name}: pass the model's parameters to it")

    def _parameters_changed(self) -> None:
        """The sparse layers' parameters were replaced (compressed storage): re-read the optimizer's groups."""
        self._ddp_ignore_buffers()
        if self.optimizer is not None:
            self._index_groups()
        for callback in self.switch_callbacks:
            callback()

    def _init_layer(self, layer: SparseLayer) -> None:
        """Backward mask (where the method wants one and the layer allows it) and per-layer state."""
        if self.method.backward_masks:
            problem = masking.check_bidirectional_support(layer.module) or blocking_problem(layer.shape, self.m, "out")
            if problem is None:
                layer.par.set_bwd_mask(layer.mask)
            else:
                layer.bwd_note = f"backward mask off ({problem}): dX uses the forward mask"
        if self.method.evolves:  # flips per block over training (the paper's Figure 2)
            layer.add_state("sad", torch.zeros(layer.num_blocks, dtype=torch.int32))
        for name, tensor in self.method.layer_state(layer).items():
            layer.add_state(name, tensor)

    def _ddp_ignore_buffers(self) -> None:
        """Masks and method state are decided identically on every rank: DDP need not broadcast them."""
        inner = _unwrap(self.model)
        ignore = list(getattr(inner, "_ddp_params_and_buffers_to_ignore", []))
        for layer in self.layers:
            ignore += [f"{layer.module_name}.parametrizations.weight.0.{b}" for b, _ in layer.par.named_buffers()]
        inner._ddp_params_and_buffers_to_ignore = ignore

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach to an optimizer (again): e.g. after ASP's fine-tuning restart creates a new one."""
        for handle in self._hooks:
            handle.remove()
        self.optimizer = optimizer
        self.optimizer_keeps_zeros = type(optimizer) in ZERO_PRESERVING_OPTIMIZERS
        self._index_groups()
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # -- the plan, iteration by iteration ------------------------------------------------------------------
    def plan(self, t: int) -> Step:
        """The method's :class:`~bame.contract.Step` for iteration t (the last one is cached)."""
        cached = self._plan_cache
        if cached is None or cached[0] != t:
            cached = self._plan_cache = (t, self.method.plan(t))
        return cached[1]

    @torch.no_grad()
    def prepare(self, t: int) -> None:
        """Before iteration t's forward: the plan's selection, then the values derived from the masks.

        The optimizer's step post-hook calls it for the next iteration; replaying a schedule without
        training (``bame flops``) calls it directly.
        """
        step = self.plan(t)
        for layer in self.layers:
            if step.select:
                flips = self.commit(layer, self.method.select(t, layer, step.keep), step.zero,
                                    count=step.record != "none")
                self._record(t, layer, step.record, flips)
        if self.storage == "compressed" and not self.switched and step.zeroed and step.keep == self.n:
            self._switch()
        elif self.switched:
            self._settle_storage()
        for layer in self.layers:
            self._refresh(t, layer, step)
        if step.select and step.record == "every":
            self._flush_window(t)

    def _refresh(self, t: int, layer: SparseLayer, step: Step) -> None:
        storage = layer.compressed
        if storage is not None:
            storage.want_dense_grad = step.dense_wgrad
            storage.compact_grad = step.dense_wgrad and self._compact_update_gradient()
            if storage.bwd_keep is not None:  # BAME-dagger's backward mask, at the slots
                dense = storage.dense(layer.weight.detach())
                storage.bwd_keep.copy_(storage.gather(backward_mask(dense, layer.mask, self.n, self.m)))
            self.method.refresh(t, layer)
            return
        if layer.par.weights_pruned != step.zeroed:  # (a module attribute's assignment is slow: only changes)
            layer.par.weights_pruned = step.zeroed
        if layer.has_bwd_mask:
            perm = self.method.backward_perm(layer)
            layer.par.set_bwd_mask(backward_mask(layer.weight, layer.mask, self.n, self.m, perm))
        self.method.refresh(t, layer)
        if layer.kernel is not None:  # after the method's refresh: the masks and scales of iteration t
            layer.kernel.refresh(t)

    def _compact_update_gradient(self) -> bool:
        """Whether compressed layers keep only a compact update gradient this iteration: the method reads no
        more (``top_pruned_gradient``), one process (data-parallel ranks average the dense one), and the last
        step had one training forward per layer (micro-batches must add up dense gradients)."""
        return self.method.top_pruned_gradient and self.forwards_per_step == 1 and not compressed.distributed()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple | None:
        """The step pre-hook. A step given a closure (Lightning's automatic optimization) has no gradient yet:
        the closure runs here first, once, and the optimizer gets one that returns its loss."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self._on_gradients()
            return None
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigError("bame needs an optimizer that evaluates its closure once per step, not LBFGS")
        with torch.enable_grad():
            loss = closure()
        self._on_gradients()
        done = lambda: loss  # noqa: E731
        if "closure" in kwargs:
            return args, {**kwargs, "closure": done}
        return (args[0], done, *args[2:]), kwargs

    def _on_gradients(self) -> None:
        """The gradients of iteration t are final (accumulated, all-reduced, unscaled): evolve, then the
        method's gradient term, then the gradient mode."""
        t = self.step_count
        step = self.plan(t)
        if self.storage == "compressed":
            self.forwards_per_step = max((layer.take_forwards() for layer in self.layers), default=0)
            if step.evolve and any(layer.compressed is not None for layer in self.layers):
                compressed.release_freed_memory()  # the backward's activations, before the update's temporaries
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is None:  # the layer took no part in this iteration's loss
                continue
            if step.evolve:
                self.evolve(t, layer, grad)
            self.method.on_grad(t, layer, grad, self)
            if step.grad == "masked":
                layer.mask_grad()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t = self.step_count
        if self.plan(t).zeroed:
            with torch.no_grad():
                for layer in self.layers:
                    layer.apply_mask(self.optimizer_keeps_zeros)
        for callback in self.step_callbacks:
            callback(t)
        self.step_count = t + 1
        self.prepare(self.step_count)

    @torch.no_grad()
    def evolve(self, t: int, layer: SparseLayer, grad: torch.Tensor) -> None:
        """One evolution update of one layer from the dense gradient (LMA + OBF for BAME).

        Stored compressed, the dense gradient is the one the iteration's dense weight-gradient product handed
        to the storage; after the update the values' gradient is gathered from it at the new slots.
        """
        storage = layer.compressed
        if storage is not None:
            grad = compressed.dense_gradient(storage, layer.weight)
            if grad is None:
                return
        old = layer.blocks(layer.mask) if storage is None else storage.block_mask()  # (K, M); no cached dense mask
        w, g = layer.weight_blocks(), layer.blocks(grad)
        lr = self.lr_of(layer.weight)
        proposal = self.method.propose(t, layer, w, g, old, lr)
        extra = self.method.proposal_stats(t, layer, w, g, old, lr)
        new, frozen_fraction = self.method.restrict(t, layer, old, proposal, w)
        per_block = block_flips(old, new)  # (K,) int32
        proposed = torch.count_nonzero(proposal != old)  # before the commit: ``old`` views the mask it changes
        layer.state("sad").add_(per_block)
        layer.frozen_fraction = frozen_fraction
        layer.count(self.commit(layer, new, "changed", count=True))
        if storage is not None:
            layer.weight.grad = storage.gather(grad).to(layer.weight.dtype)
            storage.dense_grad = storage.compact = None
            del grad, w, g, old, proposal, new
            compressed.release_freed_memory()  # this layer's temporaries, before the next layer's
        stats = layer.stats
        self.events.append({
            "step": t, "layer": layer.name, "updates": stats["updates"], "last_flips": stats["last_flips"],
            "total_flips": stats["total_flips"], "proposed_flips": int(proposed),
            "changed_blocks": int(torch.count_nonzero(per_block)), "blocks": layer.num_blocks,
            "frozen_fraction": frozen_fraction, **extra,
        })

    # -- the one mask-commit path ---------------------------------------------------------------------------
    @torch.no_grad()
    def commit(self, layer: SparseLayer, new_mask: torch.Tensor, zero: str = "changed",
               count: bool = True) -> torch.Tensor | None:
        """Make ``new_mask`` the layer's mask, in place, and zero what ``zero`` says.

        Args:
            layer: the sparse layer.
            new_mask: bool, weight-shaped or ``(K, M)`` blocks.
            zero: ``"changed"`` (entries whose bit changed: pruned and regrown weights start at zero with
                zeroed optimizer state, SPEC section 3), ``"pruned"`` (every entry outside the new mask) or
                ``"none"``.
            count: return the number of changed entries.

        Returns:
            The changed entries as a 0-d int64 tensor on the mask's device (reading it syncs), or None.
        """
        storage = layer.compressed
        if storage is not None:
            # Slot-stable: rewritten slots start at zero with zeroed optimizer state. Entries outside the mask
            # are not stored, so every ``zero`` means the same here.
            blocks = new_mask if new_mask.shape != layer.shape else layer.blocks(new_mask)
            flips = compressed.update_slots(storage, layer.weight, blocks, self.optimizer)
            return flips if count else None
        if new_mask.shape != layer.shape:
            new_mask = layer.unblocks(new_mask)
        new_mask = new_mask.bool()
        changed = new_mask != layer.mask if count or zero == "changed" else None
        layer.mask.copy_(new_mask)
        if zero != "none":
            where = changed if zero == "changed" else ~new_mask
            layer.weight.masked_fill_(where, 0.0)
            self.zero_optimizer_state(layer.weight, where)
        return torch.count_nonzero(changed) if count else None

    def _record(self, t: int, layer: SparseLayer, record: str, flips: torch.Tensor | None) -> None:
        """Count a selection's flips; an ``"update"`` also becomes an event at once."""
        if record == "none":
            return
        layer.count(flips)
        if record == "update":
            stats = layer.stats
            self.events.append({"step": t, "layer": layer.name, "updates": stats["updates"],
                                "last_flips": stats["last_flips"], "total_flips": stats["total_flips"],
                                **self.method.event_fields(t, layer)})
            layer.flips[2] = 0
        else:
            layer.window += 1

    def _flush_window(self, t: int) -> None:
        """Every ``record_every`` per-iteration re-selections: one event per layer with their flips (one sync)."""
        if not self.layers or self.layers[0].window < self.record_every:
            return
        counts = torch.stack([layer.flips for layer in self.layers]).tolist()  # one host sync for all layers
        for layer, (total, _, window_flips) in zip(self.layers, counts, strict=True):
            self.events.append({"step": t, "layer": layer.name, "updates": layer.updates,
                                "last_flips": window_flips, "total_flips": total, "window": layer.window})
            layer.flips[2] = 0
            layer.window = 0

    # -- services for methods ------------------------------------------------------------------------------
    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The optimizer's param group that holds ``param`` (its lr, weight_decay, momentum ...)."""
        if self.optimizer is None:
            raise ConfigError("the sparsifier has no optimizer yet: call sparsifier.bind(optimizer)")
        return self.optimizer.param_groups[self._group_of[id(param)]]

    def lr_of(self, param: torch.Tensor) -> float:
        """The learning rate of the parameter's group at this step (eta of Eq. 5)."""
        lr = self.group_of(param)["lr"]
        return float(lr.item() if torch.is_tensor(lr) else lr)

    @torch.no_grad()
    def zero_optimizer_state(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero every optimizer-state tensor of ``param`` (momentum, Adam moments ...) at ``where``."""
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where, 0)

    def pop_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    # -- user API ------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Nothing to do: bame acts inside ``optimizer.step()`` (its hooks). Kept so that a loop written for
        ``torch.ao.pruning`` (``optimizer.step(); sparsifier.step()``) runs unchanged; warns once.
        Refused after :meth:`squash`."""
        if self._squashed:
            raise ConfigError("this sparsifier is detached: squash() baked its masks into plain weights and "
                              "removed its hooks; sparsify the model again to train it sparse")
        if not getattr(self, "_warned_step", False):
            warnings.warn("sparsifier.step() does nothing: bame updates masks inside optimizer.step(); "
                          "the iteration count is sparsifier.step_count", stacklevel=2)
            self._warned_step = True

    def masks(self) -> dict[str, torch.Tensor]:
        """Each sparse layer's weight name (as in the original model's state_dict) -> its bool mask."""
        return {layer.name: layer.mask for layer in self.layers}

    def charges(self, t: int) -> dict[str, Charge]:
        """Densities charged to each weight layer's products on iteration t (dense layers: 1)."""
        out = {name: Charge() for name in self.dense_layers}
        for layer in self.layers:
            out[layer.name] = self.method.charge(t, layer)
        return out

    def layer_report(self) -> list[dict[str, Any]]:
        """Per weight layer: name, shape, N:M, axis, density, frozen fraction, flips, or why dense."""
        sparse = {layer.name: layer for layer in self.layers}
        rows = []
        for name, module in self.all_layers:
            layer = sparse.get(name)
            if layer is None:
                rows.append({"name": name, "shape": list(module.weight.shape), "sparse": False,
                             "density": 1.0, "reason": self.dense_layers[name]})
                continue
            stats, storage = layer.stats, layer.compressed
            kernel = storage.note() if storage is not None else layer.storage_note or layer.kernel_note
            rows.append({
                "name": name, "shape": list(layer.shape), "sparse": True, "nm": format_nm(self.n, self.m),
                "group_axis": self.group_axis, "density": round(layer.density(), 6),
                "frozen_fraction": stats["frozen_fraction"], "last_flips": stats["last_flips"],
                "total_flips": stats["total_flips"], "updates": stats["updates"],
                "backward_mask": layer.has_bwd_mask, "note": layer.bwd_note, "kernel": kernel,
                "storage": "compressed" if layer.compressed is not None else "dense",
            })
        return rows

    def __repr__(self) -> str:
        head = f"Sparsifier(method={self.method.name}, nm={format_nm(self.n, self.m)}, step={self.step_count}"
        if self._squashed:  # its masks and statistics describe a model it no longer acts on
            return (f"{head}, detached: squash() baked the masks of {len(self.layers)} layers into plain weights; "
                    "it no longer steps)")
        lines = [head + ")"]
        for row in self.layer_report():
            if row["sparse"]:
                lines.append(f"  {row['name']:40s} {str(row['shape']):22s} sparse  density={row['density']:.4f}"
                             f" frozen={row['frozen_fraction']:.3f} flips={row['total_flips']}")
            else:
                lines.append(f"  {row['name']:40s} {str(row['shape']):22s} dense   ({row['reason']})")
        return "\n".join(lines)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step, masks, per-layer state and statistics, method state.

        Masks and per-layer state are saved here only (not in ``model.state_dict()``).
        """
        layers = {}
        for layer in self.layers:
            stats = {**layer.stats, "window": layer.window, "window_flips": int(layer.flips[2])}
            entry = {"mask": layer.mask.detach().cpu().clone(), "stats": stats}
            if layer.compressed is not None:  # the slot order, for a bit-exact resume of the optimizer state
                entry["indices"] = layer.compressed.indices.detach().cpu().clone()
                entry["plan"] = compressed.plan_state(layer.compressed.plan)  # the same products after a resume
            elif layer.storage_note is not None:
                entry["storage_note"] = layer.storage_note
            for name in layer.state_names:
                entry[name] = layer.state(name).detach().cpu().clone()
            layers[layer.name] = entry
        return {
            "version": _STATE_VERSION, "method": self.method.name, "nm": format_nm(self.n, self.m),
            "group_axis": self.group_axis, "step": self.step_count, "layers": layers,
            "method_state": self.method.state_dict(), "storage": self.storage, "switched": self.switched,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one from another method, N:M or model."""
        self._check_compatible(state)
        switched = bool(state.get("switched"))
        if self.switched and not switched:
            raise CheckpointError("the sparsifier state was saved before its layers were stored compressed, and "
                                  "these are compressed from the start: it is not from this run")
        changed = False
        for layer in self.layers:
            entry = state["layers"][layer.name]
            if layer.compressed is not None and "indices" not in entry:  # saved in dense storage (faster dense)
                layer.uncompress(self.optimizer)
                changed = True
            storage = layer.compressed
            if storage is not None:  # compressed from the start (static, t_i = 0): the saved slots
                storage.indices.copy_(entry["indices"].to(storage.indices.device))
                storage.load_pending(layer.weight)
            else:
                layer.mask.copy_(entry["mask"].to(layer.mask.device))
            layer.storage_note = entry.get("storage_note")
            for name in layer.state_names:
                if name not in entry:
                    raise CheckpointError(f"sparsifier state has no {name!r} for {layer.name}")
                layer.state(name).copy_(entry[name].to(layer.mask.device))
            stats = entry.get("stats", {})
            layer.updates = int(stats.get("updates", 0))
            layer.frozen_fraction = float(stats.get("frozen_fraction", 0.0))
            layer.window = int(stats.get("window", 0))
            layer.flips.copy_(torch.tensor([stats.get("total_flips", 0), stats.get("last_flips", 0),
                                            stats.get("window_flips", 0)]))
        self.step_count = int(state["step"])
        self.method.load_state_dict(state.get("method_state", {}))
        if switched:  # the model's weights are dense: gather them into the saved slots
            for layer in self.layers:
                entry = state["layers"][layer.name]
                if layer.compressed is None and "indices" in entry:
                    layer.compress(self.optimizer, entry["indices"].to(layer.mask.device),
                                   plan_kernels=self.kernel == "sparse", plan=compressed.load_plan(entry.get("plan")))
                    changed = True
                layer.stop_watching()
            self._switched = True
        if changed:
            self._parameters_changed()
        for layer in self.layers:
            if layer.compressed is not None and "plan" in state["layers"][layer.name]:
                layer.compressed.plan = compressed.load_plan(state["layers"][layer.name]["plan"])
        step = self.plan(self.step_count)
        for layer in self.layers:
            self._refresh(self.step_count, layer, step)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        mine = {"method": self.method.name, "nm": format_nm(self.n, self.m), "group_axis": self.group_axis,
                "storage": self.storage}
        state = {"storage": "dense", **state}  # states written before compressed storage existed are dense
        for key, value in mine.items():
            if state.get(key) != value:
                raise CheckpointError(f"sparsifier state is for {key}={state.get(key)!r}, this run has {value!r}")
        saved = state.get("layers", {})
        names = [layer.name for layer in self.layers]
        if sorted(saved) != sorted(names):
            missing = sorted(set(names) - set(saved))
            extra = sorted(set(saved) - set(names))
            raise CheckpointError(f"sparsifier state is for other layers (missing {missing[:3]}, extra {extra[:3]})")
        for layer in self.layers:
            if tuple(saved[layer.name]["mask"].shape) != layer.shape:
                raise CheckpointError(
                    f"sparsifier state has shape {tuple(saved[layer.name]['mask'].shape)} for {layer.name}, "
                    f"the model has {layer.shape}"
                )

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def squash(self) -> nn.Module:
        """Bake the masks into plain weights and remove every hook and parametrization.

        Afterwards every sparse layer is an ordinary ``nn.Conv2d``/``nn.Linear`` whose weight holds the
        effective (N:M) weight; the parameter objects are the same, so an optimizer still works.
        """
        if self._squashed:
            return self.model
        self.remove_hooks()
        for layer in self.layers:
            if layer.compressed is not None:  # back to a dense weight (and dense optimizer state) first
                layer.uncompress(self.optimizer)
            masking.detach(layer.module, bake=True)
        self._squashed = True
        return self.model


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel / DataParallel wrapper or a ``torch.compile``
    wrapper (``_orig_mod``), so names match the user's model."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile(model)
        else:
            return model
