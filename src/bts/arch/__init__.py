"""Architecture adapters: the only way into a constituent's embeddings, blocks, rotary tables,
final norm and head, keyed by its decoder-layer class (as transformers' attention backends are
keyed by name). An adapter also owns how the batched kernels group a block's weights.

A new family is one file in this package: a subclass of `Adapter` decorated with `register`.
Every module here is imported on first import of the package, so it registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from bts.arch.base import (
    REGISTRY,
    SHAPE_FIELDS,
    Adapter,
    adapter,
    check_compatible,
    config_value,
    layer_types,
    mismatch,
    register,
    stack_groups,
    supported,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "REGISTRY", "SHAPE_FIELDS", "Adapter", "adapter", "check_compatible", "config_value",
    "layer_types", "mismatch", "register", "stack_groups", "supported",
]
