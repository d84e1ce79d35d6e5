"""Layer 3, passes: one lowering per Mode, one per file, registered by Mode on import.

A lowering is `fn(graph, block) -> Node` and reads only the `Block` record, so one lowering
serves module, functional and aten graphs alike (registry.py). Imports the vocabulary and
kernels.
"""

from . import deploy, eval, train, tune  # noqa: F401  (registers the four lowerings)
from .registry import get_lowering, get_lowerings, register_lowering, registry_version

__all__ = ["get_lowering", "get_lowerings", "register_lowering", "registry_version"]
