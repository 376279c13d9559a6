"""``bame.sparsify``: the one line that makes a model's training N:M sparse.

The factory is the only place where a method *name* becomes a method object (through the registry) and
where the optional pieces (sparse kernels) are attached; :class:`bame.sparsifier.Sparsifier` itself
imports no registry and drives any object with the method protocol.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bame import methods
from bame.errors import ConfigError
from bame.kernels import enable_sparse_kernels
from bame.nm import GROUP_AXES, parse_nm
from bame.policy import LayerFilter
from bame.sparsifier import Sparsifier

KERNELS = ("dense", "sparse")
STORAGES = ("dense", "compressed")


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
    kernel: str | None = None,
    storage: str = "dense",
    verbose: bool = True,
    **options: Any,
) -> Sparsifier:
    """Make a model's training N:M sparse with one line.

    Args:
        model: the model, or its ``torch.compile`` wrapper; not a DistributedDataParallel wrapper (wrap the
            model after sparsifying it: the wrapper must hold the parameters bame attaches).
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
            N:M kernels of :mod:`bame.kernels` where a measured plan beats dense (same numbers). Default:
            ``"dense"`` with dense storage, ``"sparse"`` with compressed storage.
        storage: ``"dense"`` (every weight kept, pruned ones at zero) or ``"compressed"``: from the iteration
            the method's plan allows it on (BAME's t_i, static's first, ASP's prune), each sparse layer keeps
            only its kept values and their positions, and the optimizer updates only those
            (:mod:`bame.compressed`). Methods that need the dense weight every step refuse it.
        verbose: warn, in one line, which layers stay dense and why.
        **options: the method's own options (e.g. ``delta_t``, ``alpha``, ``t_i`` for BAME).

    Returns:
        The :class:`~bame.sparsifier.Sparsifier`.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):  # its reducer holds the weights bame replaces
        raise ConfigError("sparsify the model before wrapping it in DistributedDataParallel: "
                          "bame.sparsify(model, ...), then DistributedDataParallel(model)")
    instance = create_method(method, nm, total_steps, seed=seed, steps_per_epoch=steps_per_epoch, **options)
    if group_axis not in GROUP_AXES:
        raise ConfigError(f"unknown group_axis {group_axis!r}: choose one of {', '.join(GROUP_AXES)}")
    if storage not in STORAGES:
        raise ConfigError(f"storage must be 'dense' or 'compressed', not {storage!r}")
    kernel = kernel or ("sparse" if storage == "compressed" else "dense")
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be 'dense' or 'sparse', not {kernel!r}")
    sparsifier = Sparsifier(model, optimizer, instance, group_axis=group_axis, include=include, exclude=exclude,
                            layer_filter=layer_filter, storage=storage, kernel=kernel, verbose=verbose)
    if kernel == "sparse":
        enable_sparse_kernels(sparsifier)
    return sparsifier


def create_method(method: str, nm: str | tuple[int, int], total_steps: int | None, *, seed: int = 0,
                  steps_per_epoch: int | None = None, **options: Any) -> Any:
    """The method object for a name, an N:M pattern and its options, every value checked (no model needed).

    Raises:
        ConfigError: an unknown method or option, an invalid value, or options that do not fit T.
    """
    n, m = parse_nm(nm)
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps <= 0):
        raise ConfigError(f"total_steps must be a positive int, not {total_steps!r}")
    cls = methods.get(method)
    instance = cls(cls.make_options(**options), n=n, m=m, total_steps=total_steps, seed=seed,
                   steps_per_epoch=steps_per_epoch)
    problem = instance.schedule_problem()
    if problem is not None:  # loud, with the numbers (bame train refuses it: engine.check_schedule)
        warnings.warn(problem, stacklevel=3)
    return instance
