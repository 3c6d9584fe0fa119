"""A registry of loaded models by key (the seed's ModelManager): load several, unload, memory info."""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

from .handle import ModelHandle
from .loading import load_model


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def model_bytes(handle: ModelHandle) -> int:
    """Bytes held by the model's parameters and buffers (0 for a remote/meta model)."""
    module = handle.lm._module
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total


class ModelRegistry:
    """Keeps loaded models by key so a multi-model run can load, use and free them in turn."""

    def __init__(self) -> None:
        self._models: dict[str, ModelHandle] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[str]:
        return list(self._models)

    def load(self, key: str, spec: str | None = None, **kwargs: Any) -> ModelHandle:
        """Load ``spec`` (default: ``key`` itself, e.g. a config key) under ``key``; reuse if already loaded."""
        if key not in self._models:
            self._models[key] = load_model(spec or key, **kwargs)
        return self._models[key]

    def add(self, key: str, handle: ModelHandle) -> ModelHandle:
        self._models[key] = handle
        return handle

    def get(self, key: str) -> ModelHandle:
        try:
            return self._models[key]
        except KeyError:
            raise KeyError(f"model {key!r} is not loaded; loaded: {self.keys()}") from None

    def unload(self, key: str) -> None:
        """Drop every reference the registry holds and return the memory to the allocator."""
        handle = self._models.pop(key)
        module = handle.lm._module
        # Move weights to meta so memory is freed even if a caller still holds the handle.
        try:
            module.to_empty(device="meta")
        except (RuntimeError, NotImplementedError, ValueError):
            pass
        del handle, module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unload_all(self) -> None:
        for key in self.keys():
            self.unload(key)

    def memory_info(self) -> dict[str, Any]:
        """Parameter bytes per loaded model, process RSS and (if present) CUDA allocation."""
        info: dict[str, Any] = {"models": {k: model_bytes(h) for k, h in self._models.items()}, "rss_bytes": _rss_bytes()}
        if torch.cuda.is_available():
            info["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            info["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return info
