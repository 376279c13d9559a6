"""The sparsifier: attaches N:M masks to a model and drives a method from the optimizer's step hooks.

    sparsifier = bame.sparsify(model, optimizer, method="bame", nm="1:16", total_steps=T)

The training loop stays as it was. The sparsifier registers a step pre-hook and a step post-hook on the
optimizer (no monkey-patching), so it acts exactly when the optimizer really steps: gradient
accumulation and AMP's GradScaler (which skips steps on overflow) work unchanged, and under
DistributedDataParallel it sees the all-reduced gradient, so every rank decides the same mask.

Like ``torch.optim`` and ``torch.ao.pruning`` it offers ``state_dict()``/``load_state_dict()``,
``squash()`` (bake masks into plain weights), ``masks()`` and a per-layer report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bame import masking, methods
from bame.errors import CheckpointError, ConfigError
from bame.methods.base import Charge, Method
from bame.nm import GROUP_AXES, format_nm, from_blocks, parse_nm, to_blocks
from bame.policy import LayerFilter, select_layers

log = logging.getLogger("bame")

_STATE_VERSION = 1

#: Optimizers whose update of an entry is exactly zero when its weight, gradient and state are all zero there
#: (every option of theirs: momentum, Nesterov, weight decay, AMSGrad, centered, decoupled decay ...), so a
#: pruned weight with a masked gradient and zeroed state stays exactly zero without a re-masking multiply.
#: Exact classes only: a subclass may change the update. tests/test_sparsifier.py checks each one.
ZERO_PRESERVING_OPTIMIZERS: frozenset[type] = frozenset({
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax,
})


class SparseLayer:
    """One sparse layer: its module, raw weight, mask and per-layer method state.

    Per-layer state tensors (``osc`` and whatever a method adds with :meth:`add_state`) are buffers of
    the layer's parametrization, so they follow ``model.to(device)``.
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
        self.stats: dict[str, Any] = {"updates": 0, "last_flips": 0, "frozen_fraction": 0.0, "total_flips": 0}
        self.bwd_note: str | None = None  # why a wanted backward mask is not used on this layer
        self.kernel_note: str | None = None  # which products run sparse kernels (kernel="sparse")

    # -- tensors -----------------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        """The raw weight W (the parameter the optimizer updates)."""
        return masking.raw_weight(self.module)

    @property
    def mask(self) -> torch.Tensor:
        """The forward mask B (bool, the weight's shape); update it in place with :meth:`set_mask`."""
        return self.par.mask

    def blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as its ``(K, M)`` block view."""
        return to_blocks(tensor, self.m, self.group_axis)

    def unblocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return from_blocks(blocks, self.shape, self.group_axis)

    def add_state(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Register a per-layer state tensor (saved by ``state_dict``) and return it."""
        self.par.register_buffer(name, tensor.to(self.mask.device))
        if name not in self.state_names:
            self.state_names.append(name)
        return getattr(self.par, name)

    def state(self, name: str) -> torch.Tensor:
        return getattr(self.par, name)

    # -- operations ----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, new_mask: torch.Tensor, ctx: Sparsifier | None = None, zero: str = "changed") -> int:
        """Replace the mask in place; returns the number of entries that changed.

        Args:
            new_mask: bool, weight-shaped (or ``(K, M)`` blocks).
            ctx: the sparsifier, for zeroing optimizer state.
            zero: which weights and optimizer-state entries to set to zero: ``"changed"`` (pruned and
                regrown entries, SPEC section 3), ``"pruned"`` (every entry outside the new mask) or
                ``"none"``.
        """
        if new_mask.shape != self.shape:
            new_mask = self.unblocks(new_mask)
        new_mask = new_mask.bool()
        changed = new_mask != self.mask
        flips = int(torch.count_nonzero(changed))  # no int64 copy of a weight-sized bool, as .sum() makes
        self.mask.copy_(new_mask)
        if zero == "none":
            return flips
        where = changed if zero == "changed" else ~new_mask
        self.weight.masked_fill_(where, 0.0)
        if ctx is not None:
            ctx.zero_optimizer_state(self.weight, where)
        return flips

    @torch.no_grad()
    def mask_grad(self) -> None:
        """Sparse weight gradient: ``grad *= B`` (skipped when the sparse kernels produced it masked)."""
        grad = self.weight.grad
        if grad is not None and not self.par.grad_is_masked(grad):
            grad.mul_(self.par.mask_as(grad))

    @torch.no_grad()
    def apply_mask(self, ctx: Sparsifier | None = None) -> None:
        """Set pruned weights to exactly zero.

        Args:
            ctx: the sparsifier. When given, the multiply is skipped while it is a no-op: the method has
                declared the pruned weights exactly zero (``weights_pruned``) and the optimizer is one that
                leaves an entry at zero when its gradient and state are zero there
                (:attr:`Sparsifier.optimizer_keeps_zeros`).
        """
        if ctx is not None and self.par.weights_pruned and ctx.optimizer_keeps_zeros:
            return
        self.weight.mul_(self.par.mask_as(self.weight))

    def density(self) -> float:
        return int(torch.count_nonzero(self.mask)) / self.mask.numel()


class Sparsifier:
    """Drives one method over the sparse layers of a model; see :func:`sparsify`."""

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
        verbose: bool = True,
    ) -> None:
        self.model = model
        self.method = method
        self.n, self.m = method.n, method.m
        self.group_axis = group_axis
        self.step = 0  # index of the next iteration to run
        self.layers: list[SparseLayer] = []
        self.dense_layers: dict[str, str] = {}  # weight name -> why it stays dense
        self.events: list[dict[str, Any]] = []  # per-update, per-layer statistics (drained by the engine)
        self.step_callbacks: list[Callable[[int], None]] = []  # called with t after each step
        self._hooks: list[Any] = []
        self._squashed = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_keeps_zeros = False
        self._select(include, exclude, layer_filter)
        if optimizer is not None:
            self.bind(optimizer)
        for layer in self.layers:
            method.init_layer(layer, self)
        self._ddp_ignore_buffers()
        method.prepare(self.step, self)
        if verbose:
            for name, reason in self.dense_layers.items():
                log.info("%s stays dense: %s", name, reason)

    # -- construction ----------------------------------------------------------------------------------
    def _select(self, include: Iterable[str], exclude: Iterable[str], layer_filter: LayerFilter | None) -> None:
        inner = _unwrap(self.model)
        if layer_filter is None:
            layer_filter = self.method.layer_filter()
        candidates = select_layers(inner, self.m, self.group_axis, include, exclude, layer_filter)
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
        # Group *indices*: optimizer.load_state_dict replaces the group dicts, so look them up when needed.
        self._group_of: dict[int, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._group_of[id(p)] = index
        for layer in self.layers:
            if id(layer.weight) not in self._group_of:
                raise ConfigError(f"the optimizer does not update {layer.name}: pass the model's parameters to it")
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # -- hooks -------------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.method.before_step(self.step, self)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t = self.step
        self.method.after_step(t, self)
        for callback in self.step_callbacks:
            callback(t)
        self.step = t + 1
        self.method.prepare(self.step, self)

    # -- services for methods ------------------------------------------------------------------------------
    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The optimizer's param group that holds ``param`` (its lr, weight_decay, momentum ...)."""
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

    def record(self, t: int, layer: SparseLayer, **stats: Any) -> None:
        """Record one mask update of one layer (statistics for reports)."""
        layer.stats.update({k: v for k, v in stats.items()})
        self.events.append({"step": t, "layer": layer.name, **stats})

    def pop_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    # -- user API ------------------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Each sparse layer's weight name (as in the original model's state_dict) -> its bool mask."""
        return {layer.name: layer.mask for layer in self.layers}

    def charges(self, t: int) -> dict[str, Charge]:
        """Densities charged to each weight layer's products on iteration t (dense layers: 1)."""
        out = {name: Charge.dense() for name in self.dense_layers}
        for layer in self.layers:
            out[layer.name] = self.method.charge(t, layer)
        return out

    def layer_report(self) -> list[dict[str, Any]]:
        """Per weight layer: name, shape, N:M, axis, density, frozen fraction, last flips, or why dense."""
        sparse = {layer.name: layer for layer in self.layers}
        rows = []
        for name, module in self.all_layers:
            layer = sparse.get(name)
            if layer is None:
                rows.append({"name": name, "shape": list(module.weight.shape), "sparse": False,
                             "density": 1.0, "reason": self.dense_layers[name]})
                continue
            rows.append({
                "name": name, "shape": list(layer.shape), "sparse": True, "nm": format_nm(self.n, self.m),
                "group_axis": self.group_axis, "density": round(layer.density(), 6),
                "frozen_fraction": layer.stats["frozen_fraction"], "last_flips": layer.stats["last_flips"],
                "total_flips": layer.stats["total_flips"], "updates": layer.stats["updates"],
                "backward_mask": layer.par.bwd_mask is not None, "note": layer.bwd_note,
                "kernel": layer.kernel_note,
            })
        return rows

    def __repr__(self) -> str:
        lines = [f"Sparsifier(method={self.method.name}, nm={format_nm(self.n, self.m)}, step={self.step})"]
        for row in self.layer_report():
            if row["sparse"]:
                lines.append(f"  {row['name']:40s} {str(row['shape']):22s} sparse  density={row['density']:.4f}"
                             f" frozen={row['frozen_fraction']:.3f} flips={row['last_flips']}")
            else:
                lines.append(f"  {row['name']:40s} {str(row['shape']):22s} dense   ({row['reason']})")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step, masks, per-layer state, method state."""
        layers = {}
        for layer in self.layers:
            entry = {"mask": layer.mask.detach().cpu().clone(), "stats": dict(layer.stats)}
            for name in layer.state_names:
                entry[name] = layer.state(name).detach().cpu().clone()
            layers[layer.name] = entry
        return {
            "version": _STATE_VERSION, "method": self.method.name, "nm": format_nm(self.n, self.m),
            "group_axis": self.group_axis, "step": self.step, "layers": layers,
            "method_state": self.method.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one from another method, N:M or model."""
        self._check_compatible(state)
        for layer in self.layers:
            entry = state["layers"][layer.name]
            layer.mask.copy_(entry["mask"].to(layer.mask.device))
            for name in layer.state_names:
                if name not in entry:
                    raise CheckpointError(f"sparsifier state has no {name!r} for {layer.name}")
                layer.state(name).copy_(entry[name].to(layer.mask.device))
            layer.stats.update(entry.get("stats", {}))
        self.step = int(state["step"])
        self.method.load_state_dict(state.get("method_state", {}))
        self.method.refresh(self)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        mine = {"method": self.method.name, "nm": format_nm(self.n, self.m), "group_axis": self.group_axis}
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
            masking.detach(layer.module, bake=True)
        self._squashed = True
        return self.model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, so names match the user's model."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    method: str = "bame",
    nm: str | tuple[int, int] = "2:4",
    total_steps: int | None = None,
    *,
    group_axis: str = "cin",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    layer_filter: LayerFilter | None = None,
    seed: int = 0,
    steps_per_epoch: int | None = None,
    kernel: str = "dense",
    verbose: bool = True,
    **options: Any,
) -> Sparsifier:
    """Make a model's training N:M sparse with one line.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        optimizer: the optimizer that updates it; the sparsifier hooks its ``step``. None: attach the masks
            now and call :meth:`Sparsifier.bind` once the optimizer exists (frameworks that create it later).
        method: a registered method name (see :func:`bame.methods.available`).
        nm: the N:M pattern, e.g. ``"2:4"`` or ``"1:16"``.
        total_steps: the run's number of optimizer steps T (needed for fractional schedule options).
        group_axis: ``"cin"`` (M consecutive input channels) or ``"kflat"`` (row-major flattened kernel).
        include: layer names or patterns to make sparse regardless of the default policy.
        exclude: layer names or patterns to keep dense.
        layer_filter: ``(name, module) -> bool`` replacing the default policy.
        seed: seed of the method's random choices (identical on every rank).
        steps_per_epoch: optimizer steps per epoch, for methods with epoch-granular schedules (LBC, MaxQ).
        kernel: ``"dense"`` (masked dense products) or ``"sparse"``: Linear layers and 1x1 convs run the
            N:M kernels of :mod:`bame.kernels` where a measured plan beats dense (same numbers).
        verbose: log one line per layer left dense.
        **options: the method's own options (e.g. ``delta_t``, ``alpha``, ``t_i`` for BAME).

    Returns:
        The :class:`Sparsifier`.
    """
    n, m = parse_nm(nm)
    if group_axis not in GROUP_AXES:
        raise ConfigError(f"unknown group_axis {group_axis!r}: choose one of {', '.join(GROUP_AXES)}")
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
        raise ConfigError(f"total_steps must be a positive int, not {total_steps!r}")
    cls = methods.get(method)
    instance = cls(cls.make_options(**options), n=n, m=m, total_steps=total_steps, seed=seed,
                   steps_per_epoch=steps_per_epoch)
    if kernel not in ("dense", "sparse"):
        raise ConfigError(f"kernel must be 'dense' or 'sparse', not {kernel!r}")
    sparsifier = Sparsifier(model, optimizer, instance, group_axis=group_axis, include=include, exclude=exclude,
                            layer_filter=layer_filter, verbose=verbose)
    if kernel == "sparse":
        from bame.kernels import enable_sparse_kernels

        enable_sparse_kernels(sparsifier)
    return sparsifier
