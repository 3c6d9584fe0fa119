"""The one out-of-memory helper (nnethics.models.errors.halving) and every loop that uses it: the engine's chunk
loop (tests/test_store.py), the patching engine's rows per forward, heads' rows per forward and its attention
sessions. Each test plants an out-of-memory error where the real one would come from and checks that the work is
finished, nothing twice, with the numbers of a run that had the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnethics.models.errors import halving


def test_halving_halves_down_to_the_floor_then_raises_the_real_error():
    tried = []

    def loop(size):
        tried.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return size

    assert halving(20, loop) == 2 and tried == [20, 10, 5, 2]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        halving(20, loop, floor=4)
    assert tried == [20, 10, 5, 4]
    tried.clear()

    def bug(size):
        tried.append(size)
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        halving(8, bug)
    assert tried == [8]  # no retry on another error


def test_each_forward_packs_the_rest_smaller_after_out_of_memory_and_keeps_every_value():
    from types import SimpleNamespace

    from nnethics.analyses.patching.engine import Row, each_forward

    enc = SimpleNamespace(lengths=[4] * 6)
    groups = [[Row(seq=g)] + [Row(seq=g) for _ in range(7)] for g in range(3)]  # source + 7 rows each
    truth = [[10 * g + j for j in range(8)] for g in range(3)]
    sizes, seen = [], []

    def forward(chunk, local, seqs, limit=None):
        sizes.append(len(chunk))
        if limit is not None and len(chunk) > limit:
            raise RuntimeError("CUDA error: out of memory")
        seen.append(len(chunk))
        return torch.tensor([float(truth[g][j]) for g, j in chunk])

    plenty = each_forward(enc, groups, 4 * 64, False, forward)
    assert plenty == truth and len(seen) == 1  # 24 rows, one forward
    sizes.clear()
    seen.clear()
    tight = each_forward(enc, groups, 4 * 64, False, lambda c, loc, s: forward(c, loc, s, limit=5))
    assert tight == truth  # every row's value, from forwards of at most 5 rows once the first one failed
    assert sizes[:4] == [24, 8, 8, 8] and max(seen) <= 5 and sum(seen) >= 24
    with pytest.raises(RuntimeError, match="out of memory"):  # 2 rows (a source and one row) is the floor
        each_forward(enc, groups, 4 * 64, False, lambda c, loc, s: forward(c, loc, s, limit=1))


@pytest.fixture()
def llama(tiny_models):
    return tiny_models("llama")


def test_heads_rows_halved_on_out_of_memory_give_the_same_effects(llama, prompt_set, monkeypatch):
    from nnethics.analyses.heads import HeadsOptions, head_patching
    from nnethics.analyses.heads import engine as heads_engine

    pairs = list(prompt_set.pairs[:2])
    options = HeadsOptions(top_heads=2)
    plenty = head_patching(llama, pairs, options)
    real, sizes = heads_engine._trace_block, []

    def tight(model, inputs, layers, start, resid, z, seqs, *rest):
        sizes.append(len(seqs))
        if len(seqs) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, inputs, layers, start, resid, z, seqs, *rest)

    monkeypatch.setattr(heads_engine, "_trace_block", tight)
    halved = head_patching(llama, pairs, options)
    assert max(sizes) > 3 and sizes[-1] <= 3
    assert (halved["forward_path"] == "kv_cache").all()
    np.testing.assert_allclose(halved["patched_logit_diff"], plenty["patched_logit_diff"], rtol=0, atol=1e-5)


def test_heads_attention_sessions_halved_on_out_of_memory_give_the_same_weights(llama, prompt_set, monkeypatch):
    from nnethics.analyses.heads import HeadsOptions
    from nnethics.analyses.heads import attention as heads_attention
    from nnethics.models.handle import ModelHandle

    pairs = list(prompt_set.pairs[:3])
    options = HeadsOptions(top_heads=2)
    chosen = [(0, 0), (1, 1)]
    chunks = [(pairs[:2], chosen, True), (pairs[2:], chosen, True)]
    plenty = heads_attention.fallback_attention(llama, chunks, options, None)
    real, calls = ModelHandle.session, []

    def tight(self, fn, *args):
        n = len(args[0]) if fn.__name__ == "_sessions" else args[2]  # chunks in one session, or pairs in a chunk
        calls.append((fn.__name__, n))
        if n > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, fn, *args)

    monkeypatch.setattr(ModelHandle, "session", tight)
    halved = heads_attention.fallback_attention(llama, chunks, options, None)
    assert calls[0] == ("_sessions", 2) and ("_attention_session", 1) in calls
    for a, b in zip(plenty, halved):
        assert a.shape[:3] == b.shape[:3]
        width = min(a.shape[-1], b.shape[-1])
        np.testing.assert_allclose(b[..., :width], a[..., :width], rtol=0, atol=1e-6)
