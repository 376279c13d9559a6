"""bame: efficient N:M sparse training for PyTorch.

    import bame
    sparsifier = bame.sparsify(model, optimizer, method="bame", nm="1:16", total_steps=T)

See :func:`bame.sparsify` and ``bame.methods.available()``.
"""

from bame.errors import BameError
from bame.export import export, load_compressed
from bame.factory import sparsify
from bame.sparsifier import SparseLayer, Sparsifier

__version__ = "0.1.0"

__all__ = ["BameError", "export", "load_compressed", "SparseLayer", "Sparsifier", "__version__", "sparsify"]
