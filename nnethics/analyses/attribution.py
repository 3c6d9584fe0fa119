"""Direct logit attribution (DLA): what each layer, head and expert writes straight into the answer logits.

At the decision position (every prompt's last token) the final residual is a sum of parts: the
embedding, each layer's attention output, each layer's MLP output. The final norm is linear in its
input once its scale is frozen at the value of the actual run, so the label logits split exactly into
one term per part, plus the norm's bias (LayerNorm) and the lm_head bias as constant terms:

    logit(o) = s · Σ_parts part · (W_U[o] ⊙ gain)  +  bias_o              (RMSNorm; Gemma: gain = 1 + w)
    logit(o) = s · Σ_parts part · centre(W_U[o] ⊙ gain)  +  W_U[o]·b + b_U  (LayerNorm: s = rsqrt(var + eps))

Centring the direction is the same as centring every part (LayerNorm subtracts the mean). Attention
outputs split further by head through the o_proj input (Gemma: through its post-attention norm with
that norm's scale frozen from the actual o_proj output), plus the o_proj bias; Mixtral MLPs split by
expert (each expert recomputed from the fused weights × its routing weight). Gemma-2's final-logit
soft-cap is not linear, so ``softcap = true LD − pre-softcap LD`` is its own term and everything sums
exactly to the model's logit difference.

Everything for a chunk of pairs comes from ONE trace over all base and counterfactual rows, and the
projections happen inside it, next to the weights (on the NDIF server for a remote model): the label
directions (W_U rows ⊙ final-norm gain) come from the envoys' weights, every part at the last position is
dotted with them there, and each head's o_proj input with the direction pulled back through that
layer's o_proj. Only numbers per row come back: the frozen final-norm scale, the projections ``[L, 2,
O]``, the heads ``[L, H, O]`` and the experts ``[L, k, O]`` (about 13 KB per prompt for an 80-layer,
64-head model in bfloat16, see :func:`wire_bytes`); the scaling and the sums happen afterwards in float64.
Heads travel in float32, or float16 when the model computes in a 16-bit dtype (finer than its own
activations). A remote run whose per-option heads would exceed :data:`HEAD_BYTES_PER_ROW` brings back only
the label-1-minus-label-2 direction per head: ``head_contribution`` without ``head_logit_contribution``
(``AttributionOptions.head_options`` overrides the choice).

Stored as ``store/<slug>/attribution.nc``. Dims ``prompt``, ``side`` (base, cf), ``layer``,
``component`` (attn, mlp), ``option`` (the labels), ``head`` (read it as ``ds["head"]``: ``ds.head``
is xarray's method), and ``expert`` for MoE models.

* ``logit_contribution (prompt, side, layer, component, option)``; ``diff_contribution`` is option 1
  minus option 2 ``(prompt, side, layer, component)``.
* ``head_contribution (prompt, side, layer, head)`` and ``head_logit_contribution (…, option)``
  (with heads on; the latter only with per-option heads, see above); ``attn_bias_contribution (prompt,
  side, layer)`` (o_proj bias):
  ``head_contribution.sum("head") + attn_bias_contribution == diff_contribution.sel(component="attn")``.
* ``expert_contribution (prompt, side, layer, expert)`` (MoE): its sum over ``expert`` is the mlp part.
* ``embed_contribution``, ``bias_contribution`` (final-norm bias + lm_head bias), ``softcap_contribution``,
  ``other_layers_contribution`` (the layers not stored when ``layers`` was restricted, else 0), all
  ``(prompt, side)``, each with a per-option ``*_logit_contribution``. Then
  ``embed + bias + softcap + other_layers + diff_contribution.sum(("layer", "component")) == logit_diff``.
* ``logit_diff``/``label_logit``: the model's actual values; ``final_norm_scale``; ``attn_mlp_ratio
  (prompt, side, layer)`` = |attn| / (|attn| + |mlp|) of ``diff_contribution`` (NaN when both are 0).
* attr ``complete_layers``: ``"true"`` when every layer is stored.

The seed's CSV columns, for a layer ``L`` and label ``"1"``::

    attn_to_1  = ds.logit_contribution.sel(layer=L, component="attn", option="1")
    mlp_to_1   = ds.logit_contribution.sel(layer=L, component="mlp", option="1")
    total_to_1 = ds.logit_contribution.sel(layer=L, option="1").sum("component")
    attn_mlp_ratio = ds.attn_mlp_ratio.sel(layer=L)   # on the label-1-minus-label-2 difference;
    # the seed's ratio on the label-1 logit itself: abs(attn_to_1) / (abs(attn_to_1) + abs(mlp_to_1))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ..models.adapters import final_norm_eps, get_path
from ..prompts import SIDES, PromptPair
from .common import encode_pairs
from .spec import AnalysisSpec

COMPONENTS = ("attn", "mlp")
F64 = torch.float64


@dataclass(frozen=True)
class AttributionOptions:
    labels: tuple[str, ...] = ("1", "2")
    chat: bool | None = None
    layers: tuple[int, ...] | None = None  # store only these layers (the seed's target_layers); None = all
    heads: bool = True
    # per-option heads (head_logit_contribution); None: yes, unless a remote run exceeds HEAD_BYTES_PER_ROW
    head_options: bool | None = None


HEAD_BYTES_PER_ROW = 12 * 1024  # per-option heads above this, per prompt, come back as the difference only


@dataclass
class Readout:
    """The linear readout of the label logits from the final residual, float64 on CPU.

    ``direction [O, d]``: W_U rows ⊙ final-norm gain (centred for LayerNorm); ``const [O]``: norm
    bias + lm_head bias; ``head_dir [L, O, H·dh]``: the direction (⊙ Gemma's post-attention gain)
    pulled back through each o_proj; ``attn_bias [L, O]``: the o_proj bias on that direction.
    """

    direction: Tensor
    const: Tensor
    head_dir: Tensor
    attn_bias: Tensor
    eps: float
    centre: bool
    n_heads: int
    post_eps: tuple[float, ...] | None  # Gemma: each layer's post-attention norm epsilon


@dataclass
class Projections:
    """What the trace brings back: every part already dotted with the label directions (rows first).

    Per row, unscaled (multiply by ``scale``): ``embed [N, O]``, ``layers [N, L, 2, O]`` (attn, mlp; every
    layer, for the sum). For the ``kept`` layers only: ``heads [N, K, H, O']`` (O' = O, or 1 for the
    label-1-minus-label-2 direction; float32, float16 for 16-bit models), ``post [N, K]`` (Gemma: the
    frozen post-attention norm scale, applies to heads and o_proj bias), ``experts [N, K, k, O]`` (routing
    weight applied) with ``expert_idx [N, K, k]``. Per row: ``scale [N]`` (frozen final-norm scale),
    ``pre_logits``/``logits [N, O]`` (before / after the soft-cap). Per chunk: ``const [O]`` (norm bias +
    lm_head bias), ``attn_bias [K, O]`` (o_proj bias on the direction, Gemma's post gain folded in).
    """

    scale: Tensor
    embed: Tensor
    layers: Tensor
    const: Tensor
    attn_bias: Tensor
    pre_logits: Tensor
    logits: Tensor
    kept: tuple[int, ...]
    heads: Tensor | None = None
    post: Tensor | None = None
    experts: Tensor | None = None
    expert_idx: Tensor | None = None

    def per_row_bytes(self) -> float:
        """Bytes of the per-row results divided by the rows (what :func:`wire_bytes` predicts)."""
        per_row = [self.scale, self.embed, self.layers, self.pre_logits, self.logits, self.heads, self.post,
                   self.experts, self.expert_idx]
        return sum(t.numel() * t.element_size() for t in per_row if t is not None) / self.scale.shape[0]


def wire_bytes(n_layers: int, n_heads: int, n_options: int = 2, kept: int | None = None, heads: bool = True,
               head_options: bool = True, half: bool = False, top_k: int = 0, post: bool = False) -> dict[str, int]:
    """Bytes per prompt (row) of each result the attribution trace brings back, before compression.

    ``kept``: layers stored (default all); ``half``: a 16-bit model (heads travel in float16); ``top_k``:
    MoE experts per token; ``post``: Gemma's post-attention norm. Everything else is float64. The
    per-chunk ``const``/``attn_bias`` and the container's overhead are not included. For an 80-layer,
    64-head bfloat16 model with difference-only heads: 12,856 bytes; with ``heads=False``: 2,616.
    """
    kept = n_layers if kept is None else kept
    out = {"scale": 8, "embed": 8 * n_options, "layers": 8 * n_layers * 2 * n_options,
           "pre_logits": 8 * n_options, "logits": 8 * n_options}
    if heads:
        out["heads"] = kept * n_heads * (n_options if head_options else 1) * (2 if half else 4)
    if post:
        out["post"] = 8 * kept
    if top_k:
        out["experts"] = 8 * kept * top_k * n_options
        out["expert_idx"] = 4 * kept * top_k
    return out


def _is_half(model: Any) -> bool:
    return str(getattr(model, "dtype", "")).endswith("16")  # bfloat16, float16, 4bit/bfloat16


def per_option_heads(model: Any, options: AttributionOptions, n_kept: int, remote: Any) -> bool:
    """Whether heads come back per option: always locally; remotely while they fit :data:`HEAD_BYTES_PER_ROW`."""
    if options.head_options is not None:
        return options.head_options
    size = wire_bytes(model.n_layers, model.n_heads, len(options.labels), n_kept, half=_is_half(model))["heads"]
    return not remote or size <= HEAD_BYTES_PER_ROW


def dense_weight(weight: Any, state: Any = None) -> Tensor:
    """A linear layer's weight as a dense ``[out, in]`` tensor (conv1d: ``[in, out]``), detached.

    bitsandbytes keeps it packed: 4-bit (``Params4bit``, possibly repacked for the CPU kernel after a
    first forward) is dequantized with its quant state (on a copy: the layer keeps its packing); int8
    (``Int8Params``) is multiplied by its row scales (``SCB``, on the weight or the layer's ``state``).
    Called inside traces; plain Python and torch, so it ships to a server by value.
    """
    kind = type(weight).__name__
    if kind == "Params4bit":
        import copy

        from bitsandbytes import functional as bnbf

        data, qs = weight.data, weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            data, qs = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
        return bnbf.dequantize_4bit(data, qs).detach()
    if kind == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(state, "SCB", None)
        if scb is None:
            raise ValueError("an int8 weight without row scales (SCB): run one forward first")
        return (weight.data.float() * (scb.float()[:, None] / 127.0)).detach()
    return weight.detach()


def readout(model: Any, label_ids: Sequence[int], remote: Any = None) -> Readout:
    """The readout weights for ``label_ids``, computed from the envoys' weights in one early-stopped trace.

    :func:`direct_logit_attribution` does not need it (its trace computes the same directions next to
    the weights); use it to project activations of your own. Only the small projections come back;
    ``remote`` overrides the handle's setting (``"local"`` dry-runs nnsight's serialization). The nnethics
    helpers the body calls (:func:`dense_weight`) ship by value (``nnsight.register``).
    """
    lm, ad = model.lm, model.adapter
    L, ids = model.n_layers, [int(i) for i in label_ids]
    head, norm = lm.lm_head, lm.model.norm
    o_projs = [model.o_proj(i) for i in range(L)]
    post = [get_path(model.layer(i), ad.attn_post_norm) for i in range(L)] if ad.attn_post_norm else None
    offset, centre, conv1d = ad.norm == "rms_offset", ad.norm == "layer", ad.o_proj_conv1d
    tiny = {"input_ids": torch.tensor([ids[:1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    kw = {} if remote is None else {"remote": remote}
    with torch.no_grad(), model.trace(tiny, **kw) as tracer:
        u = head.weight[ids].double()
        nw = getattr(norm, "weight", None)
        gain = u.new_ones(u.shape[-1]) if nw is None else nw.double().to(u.device)
        direction = u * (gain + 1.0 if offset else gain)
        if centre:  # LayerNorm: centring the direction == centring every part
            direction = direction - direction.mean(-1, keepdim=True)
        const = u.new_zeros(len(ids))
        nb, hb = getattr(norm, "bias", None), getattr(head, "bias", None)
        if nb is not None:
            const = const + u @ nb.double().to(u.device)
        if hb is not None:
            const = const + hb[ids].double().to(u.device)
        got = nnsight.save({"direction": direction.cpu(), "const": const.cpu(), "head_dir": [], "attn_bias": []})
        for i in range(L):
            w = dense_weight(o_projs[i].weight, getattr(o_projs[i], "state", None)).double()
            d_i = direction.to(w.device)
            if post is not None:
                d_i = d_i * (post[i].weight.double().to(w.device) + 1.0)
            got["head_dir"].append((d_i @ (w.T if conv1d else w)).cpu())  # [O, H*dh]
            b = getattr(o_projs[i], "bias", None)
            got["attn_bias"].append((d_i @ b.double()).cpu() if b is not None else d_i.new_zeros(len(ids)).cpu())
        tracer.stop()
    post_eps = tuple(final_norm_eps(ad, p._module) for p in post) if post else None
    return Readout(direction=got["direction"], const=got["const"], head_dir=torch.stack(got["head_dir"]),
                   attn_bias=torch.stack(got["attn_bias"]), eps=final_norm_eps(ad, norm._module), centre=centre,
                   n_heads=model.n_heads, post_eps=post_eps)


def collect(model: Any, inputs: dict[str, Tensor], label_ids: Sequence[int], heads: bool = True,
            kept: Sequence[int] | None = None, per_option: bool = True, remote: Any = None) -> Projections:
    """One trace over every row that projects inside the trace and brings back only :class:`Projections`.

    Reads in forward order. The body refers only to envoys and Python numbers and lists, detaches what it
    reads (servers may run with autograd on) and returns fresh tensors (no views of large storage), so it
    is the same code locally, in nnsight's ``remote="local"`` dry run and on NDIF.
    """
    lm, ad = model.lm, model.adapter
    L, H, ids = model.n_layers, model.n_heads, [int(i) for i in label_ids]
    keep = list(range(L)) if kept is None else [int(i) for i in kept]
    n_rows = int(inputs["input_ids"].shape[0])
    head, norm, first_layer = lm.lm_head, lm.model.norm, model.layer(0)
    o_projs = [model.o_proj(i) for i in range(L)]
    attn_outs = [model.attn_out(i) for i in range(L)]
    mlp_outs = [model.mlp_out(i) for i in range(L)]
    post_norms = [get_path(model.layer(i), ad.attn_post_norm) for i in range(L)] if ad.attn_post_norm else []
    post_eps = [final_norm_eps(ad, p._module) for p in post_norms]
    eps = final_norm_eps(ad, norm._module)
    post, moe, attn_tuple, conv1d = bool(post_norms), ad.moe, ad.attn_out_is_tuple, ad.o_proj_conv1d
    offset, centre, half = ad.norm == "rms_offset", ad.norm == "layer", _is_half(model)
    kw = {} if remote is None else {"remote": remote}
    with torch.no_grad(), model.trace(inputs, **kw):
        # The label directions, from the weights where they live: W_U rows ⊙ final-norm gain.
        u = head.weight[ids].detach().double()  # [O, d]
        nw = getattr(norm, "weight", None)
        gain = u.new_ones(u.shape[-1]) if nw is None else nw.detach().double().to(u.device)
        direction = u * (gain + 1.0 if offset else gain)
        if centre:  # LayerNorm: centring the direction == centring every part
            direction = direction - direction.mean(-1, keepdim=True)
        const = u.new_zeros(len(ids))
        nb, hb = getattr(norm, "bias", None), getattr(head, "bias", None)
        if nb is not None:
            const = const + u @ nb.detach().double().to(u.device)
        if hb is not None:
            const = const + hb[ids].detach().double().to(u.device)
        x0 = first_layer.inputs[0][0][:, -1].detach().double()
        embed = (x0.to(direction.device) @ direction.T).cpu()
        parts, head_parts, biases, post_parts, expert_parts, expert_idx = [], [], [], [], [], []
        for i in range(L):
            if i in keep:
                proj = o_projs[i]
                w = dense_weight(proj.weight, getattr(proj, "state", None))  # bitsandbytes: dequantized
                d_i = direction.to(w.device)
                if post:  # Gemma: heads pass through the post-attention norm's gain (its scale frozen below)
                    d_i = d_i * (post_norms[i].weight.detach().double().to(w.device) + 1.0)
                b = getattr(proj, "bias", None)
                biases.append((d_i @ b.detach().double()).cpu() if b is not None else d_i.new_zeros(len(ids)).cpu())
                if heads:  # each head's o_proj input · the direction pulled back through o_proj
                    d_h = d_i if per_option else d_i[:1] - d_i[1:2]
                    pulled = d_h @ (w.double().T if conv1d else w.double())  # [O', H*dh]
                    z = proj.input[:, -1].detach().double()
                    h = torch.einsum("nhk,ohk->nho", z.reshape(n_rows, H, -1), pulled.reshape(pulled.shape[0], H, -1))
                    head_parts.append((h.half() if half else h.float()).cpu())
                if post:
                    o = proj.output[:, -1].detach().double()
                    post_parts.append(torch.rsqrt(o.pow(2).mean(-1) + post_eps[i]).cpu())
            a = attn_outs[i].output
            a = (a[0] if attn_tuple else a)[:, -1].detach().double()
            a = (a.to(direction.device) @ direction.T).cpu()
            if moe and i in keep:
                # Recompute every expert at the last position from the fused weights; keep the routed top-k.
                block = mlp_outs[i]
                hid = block.input[:, -1].detach()
                gate_out = block.gate.output
                k = gate_out[1].shape[-1]
                weight = gate_out[1].reshape(n_rows, -1, k)[:, -1].detach()
                idx = gate_out[2].reshape(n_rows, -1, k)[:, -1].detach()
                gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
                gate, up = torch.einsum("eod,nd->neo", gate_up, hid).chunk(2, dim=-1)
                out = torch.einsum("edi,nei->ned", down, block.experts.act_fn(gate) * up)
                routed = out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1])).double() * weight.double()[..., None]
                expert_parts.append((routed.to(direction.device) @ direction.T).cpu())
                expert_idx.append(idx.to(torch.int32).cpu())
            m = mlp_outs[i].output
            m = (m[0] if isinstance(m, tuple) else m)[:, -1].detach().double()
            parts.append(torch.stack([a, (m.to(direction.device) @ direction.T).cpu()], dim=1))  # [N, 2, O]
        x = norm.input[:, -1].detach().double()
        var = x.var(-1, unbiased=False) if centre else x.pow(2).mean(-1)
        got = nnsight.save({
            "scale": torch.rsqrt(var + eps).cpu(), "embed": embed, "layers": torch.stack(parts, dim=1),
            "const": const.cpu(), "attn_bias": torch.stack(biases),
            "heads": torch.stack(head_parts, dim=1) if head_parts else None,
            "post": torch.stack(post_parts, dim=1) if post_parts else None,
            "experts": torch.stack(expert_parts, dim=1) if expert_parts else None,
            "expert_idx": torch.stack(expert_idx, dim=1) if expert_idx else None,
            "pre_logits": head.output[:, -1, ids].detach().double().cpu(),
            "logits": lm.output.logits[:, -1, ids].detach().double().cpu(),
        })
    return Projections(kept=tuple(keep), **got)


def contributions(p: Projections, n_experts: int | None = None) -> dict[str, Tensor]:
    """Per-row contributions to each label logit, float64, rows first.

    Returns ``scale [N]``, ``embed``/``const``/``softcap``/``logits``/``pre_logits [N, O]``, ``layers
    [N, L, 2, O]`` (attn, mlp; every layer), and for the kept layers ``attn_bias [N, K, O]``, ``heads [N, K,
    H, O']`` and ``experts [N, K, E, O]`` when the projections carry them.
    """
    s = p.scale.to(F64)

    def scaled(t: Tensor) -> Tensor:
        return t.to(F64) * s.view(-1, *([1] * (t.dim() - 1)))

    n, K = s.shape[0], len(p.kept)
    row = (torch.ones(n, K, dtype=F64) if p.post is None else p.post.to(F64)) * s[:, None]  # [N, K]
    pre, logits = p.pre_logits.to(F64), p.logits.to(F64)
    res = {
        "scale": s,
        "embed": scaled(p.embed),
        "layers": scaled(p.layers),
        "attn_bias": p.attn_bias.to(F64)[None] * row[..., None],
        "const": p.const.to(F64).expand(n, -1),
        "softcap": logits - pre,
        "logits": logits,
        "pre_logits": pre,
    }
    if p.heads is not None:
        res["heads"] = p.heads.to(F64) * row[..., None, None]
    if p.experts is not None:
        ex = scaled(p.experts)  # [N, K, k, O]
        E = n_experts or int(p.expert_idx.max()) + 1
        full = torch.zeros(n, K, E, ex.shape[-1], dtype=F64)
        res["experts"] = full.scatter_add_(2, p.expert_idx.long()[..., None].expand_as(ex), ex)
    return res


def _pairs_first(t: Tensor, n: int) -> np.ndarray:
    """Rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}, ...]`` -> ``[n, side, ...]`` float32."""
    return t.reshape(2, n, *t.shape[1:]).transpose(0, 1).numpy().astype(np.float32)


def _diff(x: np.ndarray) -> np.ndarray:
    return x[..., 0] - x[..., 1]


def direct_logit_attribution(model: Any, pairs: Sequence[PromptPair],
                             options: AttributionOptions = AttributionOptions(),
                             label_ids: Sequence[int] | None = None, remote: Any = None) -> xr.Dataset:
    """DLA for every pair, both sides, at the last prompt token (one trace, one request, for the whole chunk).

    ``remote`` overrides the handle's remote setting (``"local"`` dry-runs nnsight's serialization, and
    counts as remote for :func:`per_option_heads`). Returns the Dataset described in the module docstring.
    """
    labels = list(options.labels)
    if len(labels) < 2:
        raise ValueError(f"attribution needs at least two labels, got {labels}")
    L = model.n_layers
    keep = list(range(L)) if options.layers is None else sorted(set(int(i) for i in options.layers))
    bad = [i for i in keep if not 0 <= i < L]
    if bad or not keep:
        raise ValueError(f"layers {bad or keep} are out of range: the model has layers 0-{L - 1}")
    batch = encode_pairs(model, pairs, labels, options.chat, label_ids)
    per_option = per_option_heads(model, options, len(keep), model.remote if remote is None else remote)
    proj = collect(model, batch.encoded.inputs(), batch.label_ids, heads=options.heads, kept=keep,
                   per_option=per_option, remote=remote)
    n_experts = int(model.config.num_local_experts) if model.adapter.moe else None
    c = contributions(proj, n_experts)
    n = batch.n

    layer_logit = _pairs_first(c["layers"], n)  # [n, 2, L, 2, O]
    rest = [i for i in range(L) if i not in keep]
    other = layer_logit[:, :, rest].sum((2, 3)) if rest else np.zeros_like(layer_logit[:, :, 0, 0])
    by_option = {
        "embed": _pairs_first(c["embed"], n),
        "bias": _pairs_first(c["const"], n),
        "softcap": _pairs_first(c["softcap"], n),
        "other_layers": other.astype(np.float32),
    }
    logit = layer_logit[:, :, keep]
    diff = _diff(logit)
    PS, PSL = ("prompt", "side"), ("prompt", "side", "layer")
    data: dict[str, tuple] = {
        "logit_contribution": (PSL + ("component", "option"), logit),
        "diff_contribution": (PSL + ("component",), diff),
        "attn_bias_contribution": (PSL, _diff(_pairs_first(c["attn_bias"], n))),
        "attn_bias_logit_contribution": (PSL + ("option",), _pairs_first(c["attn_bias"], n)),
        "logit_diff": (PS, _diff(_pairs_first(c["logits"], n))),
        "label_logit": (PS + ("option",), _pairs_first(c["logits"], n)),
        "final_norm_scale": (PS, _pairs_first(c["scale"], n)),
        "category": (("prompt",), np.array([p.category for p in pairs], dtype=str)),
    }
    for name, values in by_option.items():
        data[f"{name}_contribution"] = (PS, _diff(values))
        data[f"{name}_logit_contribution"] = (PS + ("option",), values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.abs(diff)
        data["attn_mlp_ratio"] = (PSL, (mag[..., 0] / (mag[..., 0] + mag[..., 1])).astype(np.float32))
    coords: dict[str, Any] = {
        "prompt": [p.prompt_id for p in pairs], "side": list(SIDES), "layer": keep, "component": list(COMPONENTS),
        "option": labels, "label_token_id": ("option", np.array(batch.label_ids, dtype=np.int32)),
        "n_model_layers": L,
    }
    if "heads" in c:
        heads = _pairs_first(c["heads"], n)  # [n, side, K, H, O or 1]
        if per_option:
            data["head_logit_contribution"] = (PSL + ("head", "option"), heads)
        data["head_contribution"] = (PSL + ("head",), _diff(heads) if per_option else heads[..., 0])
        coords["head"] = np.arange(heads.shape[3])
    if "experts" in c:
        experts = _pairs_first(c["experts"], n)
        data["expert_logit_contribution"] = (PSL + ("expert", "option"), experts)
        data["expert_contribution"] = (PSL + ("expert",), _diff(experts))
        coords["expert"] = np.arange(experts.shape[3])
    ds = xr.Dataset(data, coords=coords)
    ds["diff_contribution"].attrs["description"] = (
        f"direct contribution to logit({labels[0]}) - logit({labels[1]}) at the last prompt token, final-norm scale frozen")
    ds["logit_diff"].attrs["description"] = "the model's actual logit difference (after any soft-cap)"
    ds["bias_contribution"].attrs["description"] = "final-norm bias + lm_head bias terms"
    ds["softcap_contribution"].attrs["description"] = "true minus pre-soft-cap logit difference (Gemma-2), else 0"
    ds["other_layers_contribution"].attrs["description"] = "summed direct contribution of the layers not stored"
    return _finalize(ds)


def _finalize(ds: xr.Dataset) -> xr.Dataset:
    complete = set(ds["layer"].values.tolist()) == set(range(int(ds["n_model_layers"])))
    return ds.assign_attrs(complete_layers="true" if complete else "false")


def _build(model: Any, ctx: Any):
    extra = ctx.extra or {}
    layers = extra.get("layers")
    heads = extra.get("heads")
    opts = AttributionOptions(labels=tuple(ctx.labels), chat=ctx.chat,
                              layers=tuple(int(i) for i in layers) if layers else None,
                              heads=True if heads is None else bool(heads), head_options=extra.get("head_options"))

    def fn(m: Any, pairs: Sequence[PromptPair]) -> xr.Dataset:
        return direct_logit_attribution(m, pairs, opts, label_ids=ctx.label_ids)

    return fn, {"layers": list(opts.layers) if opts.layers else None, "heads": opts.heads}


def summarize(ds: xr.Dataset, top: int = 5) -> str:
    """One line: the parts with the largest mean |diff_contribution|, the largest heads, the sum check."""
    mean_abs = np.abs(ds["diff_contribution"]).mean(("prompt", "side"))
    mean = ds["diff_contribution"].mean(("prompt", "side"))
    order = np.argsort(-mean_abs.values, axis=None)[:top]
    layers, comps = ds["layer"].values, ds["component"].values
    parts = []
    for flat in order:
        li, ci = np.unravel_index(flat, mean_abs.shape)
        parts.append(f"L{layers[li]} {comps[ci]} {float(mean_abs[li, ci]):.2f} (mean {float(mean[li, ci]):+.2f})")
    text = f"{ds.sizes['prompt']} pairs; largest mean |diff|: " + ", ".join(parts)
    if "head_contribution" in ds:
        h_abs = np.abs(ds["head_contribution"]).mean(("prompt", "side"))
        heads = []
        for flat in np.argsort(-h_abs.values, axis=None)[:3]:
            li, hi = np.unravel_index(flat, h_abs.shape)
            heads.append(f"L{layers[li]}H{hi} {float(h_abs[li, hi]):.2f}")
        text += "; heads: " + ", ".join(heads)
    total = (ds["embed_contribution"] + ds["bias_contribution"] + ds["softcap_contribution"]
             + ds["other_layers_contribution"] + ds["diff_contribution"].sum(("layer", "component")))
    err = float(np.abs(total - ds["logit_diff"]).max())
    return text + f"; parts sum to logit_diff within {err:.1e}"


SPEC = AnalysisSpec(name="attribution", build=_build, summary=summarize, finalize=_finalize)
