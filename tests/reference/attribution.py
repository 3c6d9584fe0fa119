"""Reference direct logit attribution (DLA) with a frozen final-norm scale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .arch import Parts, norm_eps, parts
from .hooks import record


def _rms_scale(v: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(v.pow(2).mean() + eps)


def _unembed_dir(p: Parts, ids: tuple[int, int]) -> tuple[Tensor, float]:
    """(W_U[id1] - W_U[id2], lm_head bias difference) in float64."""
    w = p.lm_head.weight.detach().double()
    b = getattr(p.lm_head, "bias", None)
    db = 0.0 if b is None else float(b[ids[0]].double() - b[ids[1]].double())
    return w[ids[0]] - w[ids[1]], db


def contribution_fn(p: Parts, x: Tensor, ids: tuple[int, int]) -> tuple[Callable[[Tensor], float], float]:
    """Linear map c -> LD contribution with the final-norm scale frozen at residual ``x``.

    Returns (fn, bias_term) where bias_term is the norm-bias (+ lm_head bias) part.
    """
    x = x.detach().double()
    d_w, d_b = _unembed_dir(p, ids)
    w = p.final_norm.weight.detach().double()
    if p.norm_kind == "rms":
        s, gain, centre = _rms_scale(x, p.eps), w, False
    elif p.norm_kind == "rms_offset":
        s, gain, centre = _rms_scale(x, p.eps), 1.0 + w, False
    elif p.norm_kind == "layer":
        s, gain, centre = torch.rsqrt(x.var(unbiased=False) + p.eps), w, True
    else:
        raise ValueError(p.norm_kind)
    direction = s * gain * d_w

    def fn(c: Tensor) -> float:
        c = c.detach().double()
        if centre:
            c = c - c.mean()
        return float(c @ direction)

    bias = d_b
    if p.norm_kind == "layer" and getattr(p.final_norm, "bias", None) is not None:
        bias += float(p.final_norm.bias.detach().double() @ d_w)
    return fn, bias


def head_vectors(p: Parts, layer: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head o_proj outputs [H, d] and the o_proj bias [d] from o_proj input z [H*dh]."""
    proj = p.o_proj(layer)
    w = proj.weight.detach().double()
    z = z.detach().double()
    dh = z.shape[-1] // p.n_heads
    heads = []
    for h in range(p.n_heads):
        sl = slice(h * dh, (h + 1) * dh)
        heads.append(z[sl] @ w[sl, :] if p.conv1d else z[sl] @ w[:, sl].T)
    bias = getattr(proj, "bias", None)
    b = torch.zeros(heads[0].shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return torch.stack(heads), b


def expert_vectors(model: nn.Module, moe_in: Tensor, gate_out: Any, moe: nn.Module, row: int) -> Tensor:
    """Each expert's weighted output [E, d] for token ``row`` recomputed from fused weights."""
    from transformers.activations import ACT2FN

    act = ACT2FN[model.config.hidden_act]
    _, top_w, top_i = gate_out
    h = moe_in.reshape(-1, moe_in.shape[-1])[row].double()
    gate_up = moe.experts.gate_up_proj.detach().double()
    down = moe.experts.down_proj.detach().double()
    out = torch.zeros(gate_up.shape[0], h.shape[0], dtype=torch.float64)
    for k in range(top_i.shape[-1]):
        e = int(top_i[row, k])
        gate, up = (gate_up[e] @ h).chunk(2, dim=-1)
        out[e] += float(top_w[row, k]) * (down[e] @ (act(gate) * up))
    return out


@torch.no_grad()
def moe_expert_vectors(model: nn.Module, input_ids: Tensor, position: int = -1) -> tuple[Tensor, Tensor]:
    """(experts [L, E, d], real MoE block output [L, d]) at ``position`` (mixtral only)."""
    p = parts(model)
    moes = {str(i): p.moe_block(lay) for i, lay in enumerate(p.layers)}
    gates = {str(i): m.gate for i, m in moes.items()}
    with record(moes, inputs=True) as ins, record(moes) as outs, record(gates, raw=True) as g:
        model(input_ids)
    row = position % input_ids.shape[1]
    ex = torch.stack([expert_vectors(model, ins[k], g[k], moes[k], row) for k in moes])
    real = torch.stack([outs[k][0, row].double() for k in moes])
    return ex, real


@torch.no_grad()
def dla(model: nn.Module, input_ids: Tensor, ids: tuple[int, int]) -> dict[str, Any]:
    """Direct logit attribution of LD at the last position.

    Keys: embed, attn[L], mlp[L], heads[L, H], attn_bias[L], norm_bias, logit_diff,
    softcap (and experts[L, E] for mixtral). embed + sum(attn) + sum(mlp) + norm_bias
    + softcap reproduces logit_diff up to float error (nothing is forced).
    """
    p = parts(model)
    L = p.n_layers
    attn_m = {str(i): p.attn(lay) for i, lay in enumerate(p.layers)}
    mlp_m = {str(i): p.mlp(lay) for i, lay in enumerate(p.layers)}
    oproj_m = {str(i): p.o_proj(lay) for i, lay in enumerate(p.layers)}
    moe = p.family == "mixtral"
    gate_m = {str(i): p.moe_block(lay).gate for i, lay in enumerate(p.layers)} if moe else {}
    moe_m = {str(i): p.moe_block(lay) for i, lay in enumerate(p.layers)} if moe else {}
    with (
        record({"e": p.resid0, "head": p.lm_head}) as r,
        record(attn_m) as a,
        record(mlp_m) as m,
        record(oproj_m, inputs=True) as z,
        record(oproj_m) as o,
        record({"norm": p.final_norm}, inputs=True) as fin,
        record(gate_m, raw=True) as g,
        record(moe_m, inputs=True) as moe_in,
    ):
        logits = model(input_ids).logits
    t = input_ids.shape[1] - 1
    fn, bias = contribution_fn(p, fin["norm"][0, t], ids)

    heads = torch.zeros(L, p.n_heads, dtype=torch.float64)
    attn_bias = torch.zeros(L, dtype=torch.float64)
    for i, layer in enumerate(p.layers):
        hv, b = head_vectors(p, layer, z[str(i)][0, t])
        pn = p.post_attn_norm(layer)
        if pn is not None:  # Gemma: freeze the post-attention norm scale from the real o_proj output
            scale = _rms_scale(o[str(i)][0, t].double(), norm_eps(pn)) * (1.0 + pn.weight.detach().double())
            hv, b = hv * scale, b * scale
        heads[i] = torch.tensor([fn(v) for v in hv], dtype=torch.float64)
        attn_bias[i] = fn(b)

    def ld(x: Tensor) -> float:
        return float(x[0, t, ids[0]].double() - x[0, t, ids[1]].double())

    out: dict[str, Any] = {
        "embed": fn(r["e"][0, t]),
        "attn": torch.tensor([fn(a[str(i)][0, t]) for i in range(L)]).float(),
        "mlp": torch.tensor([fn(m[str(i)][0, t]) for i in range(L)]).float(),
        "heads": heads.float(),
        "attn_bias": attn_bias.float(),
        "norm_bias": bias,
        "logit_diff": ld(logits),
        "softcap": ld(logits) - ld(r["head"]),
    }
    if moe:
        out["experts"] = torch.stack(
            [torch.tensor([fn(v) for v in expert_vectors(model, moe_in[k], g[k], moe_m[k], t)]) for k in moe_m]
        ).float()
    return out
