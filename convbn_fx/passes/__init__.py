"""Lowerings, one per file, registered by Mode on import."""

from . import deploy, eval, train, tune  # noqa: F401  (registers the four lowerings)
from .registry import get_lowering, get_lowerings, register_lowering, registry_version

__all__ = ["get_lowering", "get_lowerings", "register_lowering", "registry_version"]
