"""The one-token rows of the KV-cache path: every row reads a prefix cache it shares with other rows.

:class:`SharedPrefixCache` lets ``R`` one-token rows attend to the cached prefix of their own sequence without
growing or copying the prefix cache; :func:`inputs_token` makes the inputs of such a forward.

Two ways for the rows to attend. By default the cache hands the attention the keys and values of each row
(its prefix's, gathered, plus its own): the model's own attention runs, so a row gives the bits of the same row in
any other one-token forward (the patching sweep keeps its bits this way). With ``shared=True`` the cache hands over
only the row's own key and value, and :func:`shared_prefix_attention` (switched on for one trace by
:class:`shared_attention`) attends each group of rows that share a prefix to that prefix with one matrix product
per group. Measured on the built-in model's head-patching rows (138 rows over 6 prefixes of ~100 tokens, one CPU
thread): the gather and torch's SDPA took 0.65 + 3.4 ms per layer, the grouped products 1.3 ms; the values differ
from SDPA's in the last bits only (another order of summation), checked per family in tests/test_prefix_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .common import Encoded

ATTENTION = "nnethics_shared_prefix"  # the name of shared_prefix_attention in transformers' attention registry
_PENDING: list = []  # the prefix of the layer whose attention runs next (set by update, taken by the attention)
_WEIGHTS: list = []  # [True] while shared_attention(weights=True) is on: the attention returns its weights too


@dataclass
class Prefix:
    """The key/value cache of every distinct (sequence, noise) over all tokens but the last."""

    cache: DynamicCache
    index: dict            # (seq, noise) -> row of the cache
    width: int             # cached positions (left-padded width - 1)
    sigma: dict            # group -> noise std used


def cut_prefix(cache: Any) -> bool:
    """A trace's key/value cache of every row, cut to all tokens but the last, in place (the prefix that one-token
    rows read; the same bits as a forward of the prefix alone, checked by the tests). Only a plain cache of
    full-attention layers is cut (False for others, e.g. Gemma's sliding-window layers, whose bookkeeping is not
    just the keys: the rows then run a prefix forward of their own)."""
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers or \
            any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return False
    for layer in layers:  # contiguous: the one-token rows gather from it once per layer and forward
        layer.keys = layer.keys[..., :-1, :].contiguous()
        layer.values = layer.values[..., :-1, :].contiguous()
    return True


def trace_prefix(cache: Any, n_rows: int, width: int) -> Prefix | None:
    """The :class:`Prefix` of a trace's ``n_rows`` rows of left-padded ``width`` (its cache cut by
    :func:`cut_prefix`; row ``s`` is sequence ``s``, unnoised), or None where the cache cannot be cut."""
    if cache is None or not cut_prefix(cache):
        return None
    return Prefix(cache, {(s, None): s for s in range(n_rows)}, width - 1, {})


class SharedPrefixCache(DynamicCache):
    """A read-only view of a prefix cache of ``n`` sequences for ``R`` rows: row ``r`` attends to
    prefix row ``rows[r]``. It never grows, so one prefix serves any number of one-token forwards,
    and the per-row keys/values exist for one layer at a time (``shared``: never; see the module)."""

    def __init__(self, prefix: DynamicCache, rows: torch.Tensor, shared: bool = False):  # noqa: D107
        self.__dict__.update(prefix.__dict__)
        self._rows = rows
        self._buffers: dict = {}
        self._shared = shared
        self._groups: dict = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        rows = self._rows if self._rows.device == layer.keys.device else self._rows.to(layer.keys.device)
        if self._shared:
            _PENDING[:] = [(layer_idx, layer.keys, layer.values, self.groups(rows))]
            return key_states, value_states
        return self._gather("k", layer.keys, rows, key_states), self._gather("v", layer.values, rows, value_states)

    def groups(self, rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(prefix row, the rows reading it)`` for each prefix row read, computed once per device."""
        key = rows.device
        if key not in self._groups:
            ids = rows.tolist()
            self._groups[key] = [(p, torch.tensor([r for r, q in enumerate(ids) if q == p], device=rows.device))
                                 for p in sorted(set(ids))]
        return self._groups[key]

    def _gather(self, name: str, prefix: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``cat([prefix[rows], new], dim=-2)``, the same values bit for bit, written once into a buffer that the
        next layer reuses (without gradients nothing keeps a layer's keys after its attention). Measured on CPU
        for the 3 x 90 patched rows of 3 pairs: ``index_select`` + ``cat`` took 1.0 of their 2.1 s; a fresh
        buffer per layer still paid page faults in about half the runs (0.06 vs 0.5 s); the reused one does not."""
        t = prefix.shape[-2]
        shape = (rows.shape[0], *prefix.shape[1:-2], t + new.shape[-2], prefix.shape[-1])
        key = (name, shape, new.dtype, new.device)
        out = self._buffers.get(key) if not torch.is_grad_enabled() else None
        if out is None:
            out = new.new_empty(shape)
            if not torch.is_grad_enabled():
                self._buffers = {k: v for k, v in self._buffers.items() if k[0] != name}
                self._buffers[key] = out
        if out.device.type == "cpu":
            torch.index_select(prefix, 0, rows, out=out[..., :t, :])
        else:  # index_select's out= into a strided slice is not promised on every device
            out[..., :t, :] = prefix.index_select(0, rows)
        out[..., t:, :] = new
        return out


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            softcap: float | None = None, position_bias: torch.Tensor | None = None,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature for one-token rows over a :class:`SharedPrefixCache` with
    ``shared=True``: ``query [R, H, 1, d]``, ``key``/``value`` the rows' own ``[R, H_kv, 1, d]``; each row attends to
    its prefix's keys and its own, as eager attention does (scale, soft-cap, additive or boolean mask over the
    ``prefix + 1`` keys, softmax in float32, query heads sharing key/value heads in order). Returns ``[R, 1, H, d]``
    and, under ``shared_attention(weights=True)``, the weights ``[R, H, 1, prefix + 1]`` as eager attention does
    (else None, as SDPA)."""
    if not _PENDING:
        raise RuntimeError("shared-prefix attention runs only over a SharedPrefixCache(shared=True)")
    layer_idx, pk, pv, groups = _PENDING.pop()
    if getattr(module, "layer_idx", layer_idx) != layer_idx:
        raise RuntimeError(f"shared-prefix attention of layer {module.layer_idx} got layer {layer_idx}'s prefix")
    if query.shape[2] != 1:
        raise ValueError(f"shared-prefix attention is for one-token rows, got {query.shape[2]} query tokens")
    if dropout and module.training:
        raise ValueError("shared-prefix attention has no dropout: run the model in eval mode")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("shared-prefix attention does not take attention sinks")
    R, H, _, d = query.shape
    kv = key.shape[1]
    g = H // kv
    t = pk.shape[-2]
    scaling = d ** -0.5 if scaling is None else scaling
    if attention_mask is not None and attention_mask.shape[-1] != t + 1:
        raise ValueError(f"shared-prefix attention: a mask over {attention_mask.shape[-1]} keys for a prefix of {t}")
    q = query.reshape(R, kv, g, d)
    out = query.new_empty(R, kv, g, value.shape[-1])
    weights = query.new_empty(R, kv, g, t + 1) if _WEIGHTS else None
    for p, idx in groups:
        m = idx.shape[0]
        qp = q.index_select(0, idx)                                                    # [m, kv, g, d]
        s = torch.matmul(qp.transpose(0, 1).reshape(kv, m * g, d), pk[p].transpose(-1, -2))  # [kv, m g, t]
        s = torch.cat([s.view(kv, m, g, t).transpose(0, 1),
                       (qp * key.index_select(0, idx)).sum(-1, keepdim=True)], dim=-1) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if position_bias is not None:
            s = s + position_bias.index_select(0, idx).reshape(m, kv, g, t + 1)
        if attention_mask is not None:
            mask = attention_mask.index_select(0, idx).reshape(m, 1, 1, t + 1)
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        w = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
        o = torch.matmul(w[..., :t].transpose(0, 1).reshape(kv, m * g, t), pv[p])      # [kv, m g, d_v]
        o = o.view(kv, m, g, -1).transpose(0, 1) + w[..., t:] * value.index_select(0, idx)
        out.index_copy_(0, idx, o)
        if weights is not None:
            weights.index_copy_(0, idx, w)
    return out.reshape(R, 1, H, -1), None if weights is None else weights.reshape(R, H, 1, t + 1)


class shared_attention:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Switch the model to :func:`shared_prefix_attention` for one trace (registered with transformers under
    :data:`ATTENTION`, its mask the SDPA one), then back; ``weights``: the attention modules return their weights
    (``output[1]``). Like :func:`.heads.attention.eager_attention` it runs where the trace runs: locally, or inside
    the remote session on the server's model."""

    def __init__(self, model, weights: bool = False):
        self.config = model.lm._module.config
        self.old = None
        self.weights = weights

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, shared_prefix_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        self.old = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION
        _WEIGHTS[:] = [True] if self.weights else []
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old
        _PENDING.clear()
        _WEIGHTS.clear()
        return False


def inputs_token(enc: Encoded, seqs: list[int], prefix_width: int, cache: DynamicCache, rows: list[int],
                 shared: bool = False) -> dict:
    device = enc.input_ids.device
    return {
        "input_ids": enc.input_ids[seqs][:, -1:],
        "attention_mask": enc.attention_mask[seqs][:, -(prefix_width + 1):],
        "position_ids": enc.position_ids[seqs][:, -1:],
        "cache": SharedPrefixCache(cache, torch.tensor(rows, dtype=torch.long, device=device), shared),
    }
