"""Which layers become N:M sparse, and why the others stay dense (SPEC section 1).

The default policy matches the paper's code:

* Linear and (non-transposed) convolution layers are candidates;
* the classifier head stays dense: the layers a model names in ``model.bame_dense_layers``, or else
  the last Linear/conv layer in registration order;
* an ImageNet-style stem or a ViT patch embedding stays dense: listed in ``bame_dense_layers``, and in
  any case the first convolution when its stride is above 1 (a CIFAR 3x3 stride-1 stem is sparse only
  if its grouping axis divides by M, which with 3 input channels it never does);
* a depthwise conv, a grouped conv whose per-group input channels do not divide by M, and a layer
  whose grouping axis does not divide by M stay dense.

Where the policy keeps a layer dense, its reason is the policy's, even when the layer could not be N:M
anyway: a ViT's patch embedding is dense because it is the patch embedding, not because its 3 input
channels happen not to divide by 4 (with ``group_axis="kflat"`` they would).

A user can force layers out (``exclude``) or in (``include``) by name or shell-style pattern, or replace
the policy with a ``layer_filter(name, module) -> bool``; structural impossibilities always win.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from bame.errors import ConfigError
from bame.nm import blocking_problem

LayerFilter = Callable[[str, nn.Module], bool]


@dataclass
class Candidate:
    """A weight layer and the policy's verdict on it."""

    name: str  # module name, as in named_modules()
    module: nn.Module
    reason: str | None  # why it stays dense; None if it becomes sparse


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
        ):
            layers.append((name, module))
    return layers


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def structural_problem(module: nn.Module, m: int, group_axis: str) -> str | None:
    """Why this layer can never be N:M sparse with blocks of M, or None."""
    weight = module.weight
    if not weight.requires_grad:
        return "weight is not trainable"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        per_group = module.in_channels // module.groups
        if per_group == 1:
            return "depthwise conv"
        if per_group % m != 0:
            return f"grouped conv: {per_group} input channels per group not divisible by M={m}"
    return blocking_problem(weight.shape, m, group_axis)


def _default_dense(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """The policy's dense layers and why: the model's declared ones (or else the last layer), and a strided
    first convolution (a stem or patch embedding) whether declared or not."""
    declared = getattr(model, "bame_dense_layers", None)
    first, last = (layers[0][0], layers[-1][0]) if layers else (None, None)
    dense: dict[str, str] = {}
    if declared is not None:
        for name in declared:
            role = "classifier head" if name == last else "stem / patch embedding" if name == first else "head / stem"
            dense[name] = f"{role} (the model's bame_dense_layers)"
    elif last is not None:
        dense[last] = "classifier head"
    convs = [(n, mod) for n, mod in layers if isinstance(mod, nn.modules.conv._ConvNd)]
    if convs and max(convs[0][1].stride) > 1:
        dense.setdefault(convs[0][0], "stem / patch embedding (the first convolution, strided)")
    return dense


def select_layers(
    model: nn.Module,
    m: int,
    group_axis: str,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    layer_filter: LayerFilter | None = None,
) -> list[Candidate]:
    """Apply the layer policy; returns every weight layer with its verdict, in model order."""
    include, exclude = tuple(include), tuple(exclude)
    layers = _weight_layers(model)
    policy_dense = {} if layer_filter is not None else _default_dense(model, layers)
    candidates = []
    for name, module in layers:
        problem = structural_problem(module, m, group_axis)
        forced_in = _matches(name, include)
        if problem is not None and forced_in and name in include:
            raise ConfigError(f"layer {name!r} was asked to be sparse but cannot be: {problem}")
        if problem is not None and not forced_in and name in policy_dense:
            problem = policy_dense[name]  # the policy decides; the structure would only have agreed
        elif problem is None and _matches(name, exclude):
            problem = "excluded by the user"
        elif problem is None and not forced_in:
            if layer_filter is not None and not layer_filter(name, module):
                problem = "excluded by the layer filter"
            elif name in policy_dense:
                problem = policy_dense[name]
        candidates.append(Candidate(name, module, problem))
    return candidates
