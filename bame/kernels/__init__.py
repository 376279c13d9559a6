"""N:M sparse kernels: the packed weight form, sparse formulations of a Linear layer's three products,
their autograd Function, and the per-layer planner that times them against dense.

>>> packed = pack(weight, mask, n=1, m=16)
>>> plan = choose_plan(out, in_, 1, 16, batch_tokens=256)
>>> y = nm_linear(x, weight, packed, bias=bias, plan=plan)
"""

from bame.kernels.attach import enable_sparse_kernels, kernel_problem
from bame.kernels.linear import NMLinearFunction, nm_linear, scatter_values
from bame.kernels.packed import Packed, pack, unpack
from bame.kernels.plan import Plan, choose_plan, clear_plan_cache, random_nm_mask

__all__ = [
    "NMLinearFunction",
    "Packed",
    "Plan",
    "choose_plan",
    "clear_plan_cache",
    "enable_sparse_kernels",
    "kernel_problem",
    "nm_linear",
    "pack",
    "random_nm_mask",
    "scatter_values",
    "unpack",
]
