"""Model registry: several models by key, unload frees the weights, memory info."""

from __future__ import annotations

import pytest

from nnethics.models.registry import ModelRegistry, model_bytes


def test_load_two_models_and_unload(tiny_model_dir):
    reg = ModelRegistry()
    a = reg.load("a", str(tiny_model_dir))
    b = reg.load("b", str(tiny_model_dir))
    assert reg.load("a", str(tiny_model_dir)) is a  # already loaded: reused
    info = reg.memory_info()
    expected = sum(p.numel() * p.element_size() for p in a.lm._module.parameters())
    assert info["models"]["a"] >= expected > 0 and info["models"]["b"] == info["models"]["a"]
    assert info["rss_bytes"] > 0
    reg.unload("a")
    assert reg.keys() == ["b"]
    # even though the caller still holds the handle, its weights are gone
    assert model_bytes(a) == 0
    assert all(p.device.type == "meta" for p in a.lm._module.parameters())
    assert model_bytes(b) > 0
    with pytest.raises(KeyError, match="not loaded"):
        reg.get("a")
