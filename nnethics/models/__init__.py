"""Model loading, architecture adapters, the model registry and remote (NDIF) access."""

from .adapters import ADAPTERS, Adapter, UnsupportedArchitectureError, adapter_for, supported_families
from .builtin import BUILTIN_NAME, BuiltinModelMissing
from .errors import ModelLoadError
from .handle import ModelHandle
from .loading import load_model, wrap_model

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BUILTIN_NAME",
    "BuiltinModelMissing",
    "ModelHandle",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "load_model",
    "supported_families",
    "wrap_model",
]
