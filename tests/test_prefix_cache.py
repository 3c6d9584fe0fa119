"""The one-token rows' attention over a shared prefix (:mod:`nnethics.analyses.prefix_cache`) against eager
attention over the gathered keys (transformers' formula, written out here): grouped query heads, left padding as
a boolean or an additive mask, a soft-cap, the weights; and its refusals. The per-family end-to-end checks are in
tests/test_heads.py (every head against the plain-hook reference, attention against ``output_attentions``)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from nnethics.analyses import prefix_cache as pc

N_PREFIX, KV, GROUPS, T, D = 3, 2, 3, 7, 5
ROWS = [0, 0, 1, 2, 2, 2, 1, 0]


class _Attn(torch.nn.Module):
    def __init__(self, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx
        self.eval()


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = len(ROWS)
    prefix = DynamicCache()
    pk, pv = (torch.randn(N_PREFIX, KV, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    prefix.update(pk, pv, 0)
    q = torch.randn(r, KV * GROUPS, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(r, KV, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(r, 1, 1, T + 1, dtype=torch.bool)
    for row, pad in enumerate([0, 2, 0, 1, 3, 0, 4, 1]):  # left padding per row
        keep[row, ..., :pad] = False
    return prefix, pk, pv, q, k, v, keep


def _eager(pk, pv, q, k, v, mask, scaling, softcap):
    """transformers' eager attention over each row's gathered keys: prefix row ROWS[r], then its own (float64
    but for the softmax, so that one float32 ulp is the tolerance)."""
    rows = torch.tensor(ROWS)
    keys = torch.cat([pk[rows], k], dim=2).repeat_interleave(GROUPS, dim=1)
    values = torch.cat([pv[rows], v], dim=2).repeat_interleave(GROUPS, dim=1)
    s = q @ keys.transpose(2, 3) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s + mask
    w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)  # as transformers: the softmax in float32
    return (w @ values).transpose(1, 2), w


def _shared(prefix, q, k, v, mask, scaling, softcap, weights=True, layer=0):
    cache = pc.SharedPrefixCache(prefix, torch.tensor(ROWS), shared=True)
    k2, v2 = cache.update(k, v, 0)
    assert k2 is k and v2 is v  # the row's own key and value only: nothing gathered
    pc._WEIGHTS[:] = [True] if weights else []
    try:
        return pc.shared_prefix_attention(_Attn(layer), q, k, v, mask, scaling=scaling, softcap=softcap)
    finally:
        pc._WEIGHTS.clear()
        pc._PENDING.clear()


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_equals_eager_attention_over_the_gathered_keys(softcap, mask_kind):
    prefix, pk, pv, q, k, v, keep = _case()
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    mask = keep if mask_kind == "bool" else additive
    out, w = _shared(prefix, q, k, v, mask, 0.7, softcap)
    want_out, want_w = _eager(pk, pv, q, k, v, additive, 0.7, softcap)
    assert out.shape == (len(ROWS), 1, KV * GROUPS, D) and w.shape == (len(ROWS), KV * GROUPS, 1, T + 1)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-7)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-7)
    assert (w[~keep.expand_as(w)] == 0).all()  # padding gets no weight
    assert _shared(prefix, q, k, v, mask, 0.7, softcap, weights=False)[1] is None  # as SDPA: no weights unasked


def test_without_a_mask_every_key_is_read():
    prefix, pk, pv, q, k, v, keep = _case(1)
    out, w = _shared(prefix, q, k, v, None, 0.4, None)
    want_out, want_w = _eager(pk, pv, q, k, v, torch.zeros(keep.shape, dtype=torch.float64), 0.4, None)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-7)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-7)


def test_refusals():
    prefix, pk, pv, q, k, v, keep = _case()
    with pytest.raises(RuntimeError, match="SharedPrefixCache"):
        pc.shared_prefix_attention(_Attn(), q, k, v, keep)
    with pytest.raises(RuntimeError, match="layer 1"):
        _shared(prefix, q, k, v, keep, 0.7, None, layer=1)
    with pytest.raises(ValueError, match="mask over 7 keys"):
        _shared(prefix, q, k, v, keep[..., 1:], 0.7, None)
