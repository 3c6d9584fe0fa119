"""Reference per-head activation patching and decision-position attention (plain PyTorch hooks, eager model).

One forward per head: a forward pre-hook on the layer's ``o_proj`` replaces the head's slice of its input at the
last position with the counterfactual's (recorded by another pre-hook on a counterfactual forward). Independent
of nnethics (no nnsight, no KV cache, no batching).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import parts


def _ld(model: nn.Module, input_ids: Tensor, ids: tuple[int, int]) -> float:
    last = model(input_ids=input_ids).logits[0, -1]
    return float(last[ids[0]] - last[ids[1]])


@torch.no_grad()
def head_sweep(model: nn.Module, base_ids: Tensor, cf_ids: Tensor, ids: tuple[int, int],
               layers: list[int] | None = None) -> Tensor:
    """``[L, H]`` LDs of the base run with head (l, h)'s o_proj input slice at the last position from the cf run
    (only ``layers``, when given; NaN elsewhere)."""
    p = parts(model)
    projs = [p.o_proj(layer) for layer in p.layers]
    cf_z: dict[int, Tensor] = {}
    handles = [proj.register_forward_pre_hook(lambda mod, args, i=i: cf_z.__setitem__(i, args[0][0, -1].clone()))
               for i, proj in enumerate(projs)]
    try:
        model(input_ids=cf_ids)
    finally:
        for h in handles:
            h.remove()
    n_heads = p.n_heads
    out = torch.full((len(projs), n_heads), float("nan"), dtype=torch.float64)
    for i, proj in enumerate(projs):
        if layers is not None and i not in layers:
            continue
        dh = cf_z[i].shape[-1] // n_heads
        for head in range(n_heads):
            def pre(mod, args, i=i, head=head, dh=dh):
                z = args[0].clone()
                z[0, -1, head * dh:(head + 1) * dh] = cf_z[i][head * dh:(head + 1) * dh]
                return (z, *args[1:])
            handle = proj.register_forward_pre_hook(pre)
            try:
                out[i, head] = _ld(model, base_ids, ids)
            finally:
                handle.remove()
    return out


@torch.no_grad()
def decision_attention(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[L, H, T]``: eager ``output_attentions=True`` weights of the last position to every token."""
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        att = model(input_ids=input_ids, output_attentions=True).attentions
    finally:
        cfg._attn_implementation = old
    return torch.stack([a[0, :, -1] for a in att])
