"""bame inside the training frameworks people already use: one callback each.

* :mod:`bame.integrations.lightning` - ``BameCallback`` for Lightning's ``Trainer`` (``pip install 'bame[lightning]'``);
* :mod:`bame.integrations.huggingface` - ``BameCallback`` for transformers' ``Trainer`` (``pip install 'bame[hf]'``).

Nothing is imported here, so ``import bame`` never pulls a framework in; import the module you need.
"""
