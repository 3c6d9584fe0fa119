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

Everything for a chunk of pairs comes from one trace over all base and counterfactual rows. The trace
only brings back small per-row vectors at the last position; the arithmetic happens afterwards in
float64. The readout weights (W_U rows ⊙ norm gains, o_proj weights projected onto those directions)
are computed in one early-stopped trace from the envoys' weights, so only small projections come back
and the same code serves local and remote (NDIF) models.

Stored as ``store/<slug>/attribution.nc``. Dims ``prompt``, ``side`` (base, cf), ``layer``,
``component`` (attn, mlp), ``option`` (the labels), ``head`` (read it as ``ds["head"]``: ``ds.head``
is xarray's method), and ``expert`` for MoE models.

* ``logit_contribution (prompt, side, layer, component, option)``; ``diff_contribution`` is option 1
  minus option 2 ``(prompt, side, layer, component)``.
* ``head_contribution (prompt, side, layer, head)`` and ``head_logit_contribution (…, option)``
  (with heads on); ``attn_bias_contribution (prompt, side, layer)`` (o_proj bias):
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
class Activations:
    """What the trace brings back, per row at the last position (rows first).

    ``embed [N, d]``, ``attn``/``mlp [N, L, d]``, ``z [N, L, H·dh]`` (o_proj input, with heads),
    ``o_out [N, L, d]`` (o_proj output, Gemma), ``experts [N, L, k, d]`` with ``expert_idx [N, L, k]``
    (MoE, routing weight applied), ``final [N, d]`` (final-norm input), ``pre_logits``/``logits [N, O]``
    (label logits before / after the soft-cap).
    """

    embed: Tensor
    attn: Tensor
    mlp: Tensor
    final: Tensor
    pre_logits: Tensor
    logits: Tensor
    z: Tensor | None = None
    o_out: Tensor | None = None
    experts: Tensor | None = None
    expert_idx: Tensor | None = None


def readout(model: Any, label_ids: Sequence[int], remote: Any = None) -> Readout:
    """The readout weights for ``label_ids``, computed from the envoys' weights in one early-stopped trace.

    Only the small projections come back, so the same code serves local and remote (NDIF) models;
    ``remote`` overrides the handle's setting (``"local"`` dry-runs nnsight's serialization). The body
    calls no nnethics function: those would be pickled by reference and missing on an NDIF server.
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
            w = o_projs[i].weight.double()
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
            remote: Any = None) -> Activations:
    """One trace over every row; reads in forward order and clones every last-position slice (remote-safe)."""
    lm, ad = model.lm, model.adapter
    L, ids = model.n_layers, [int(i) for i in label_ids]
    n_rows = int(inputs["input_ids"].shape[0])
    first_layer = model.layer(0)
    o_projs = [model.o_proj(i) for i in range(L)]
    attn_outs = [model.attn_out(i) for i in range(L)]
    mlp_outs = [model.mlp_out(i) for i in range(L)]
    attn_tuple, post, moe = ad.attn_out_is_tuple, ad.attn_post_norm is not None, ad.moe
    kw = {} if remote is None else {"remote": remote}
    with torch.no_grad(), model.trace(inputs, **kw):
        got = nnsight.save({"attn": [], "mlp": [], "z": [], "o": [], "ex": [], "idx": []})
        got["embed"] = first_layer.inputs[0][0][:, -1].clone()
        for i in range(L):
            if heads:
                got["z"].append(o_projs[i].input[:, -1].clone())
            if post:
                got["o"].append(o_projs[i].output[:, -1].clone())
            a = attn_outs[i].output
            got["attn"].append((a[0] if attn_tuple else a)[:, -1].clone())
            if moe:
                # Recompute every expert at the last position from the fused weights; keep the routed top-k.
                block = mlp_outs[i]
                h = block.input[:, -1]
                gate_out = block.gate.output
                k = gate_out[1].shape[-1]
                weight = gate_out[1].reshape(n_rows, -1, k)[:, -1]
                idx = gate_out[2].reshape(n_rows, -1, k)[:, -1]
                gate, up = torch.einsum("eod,nd->neo", block.experts.gate_up_proj, h).chunk(2, dim=-1)
                out = torch.einsum("edi,nei->ned", block.experts.down_proj, block.experts.act_fn(gate) * up)
                routed = out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))
                got["ex"].append((routed.float() * weight[..., None].float()).clone())
                got["idx"].append(idx.clone())
            m = mlp_outs[i].output
            got["mlp"].append((m[0] if isinstance(m, tuple) else m)[:, -1].clone())
        got["final"] = lm.model.norm.input[:, -1].clone()
        got["pre"] = lm.lm_head.output[:, -1, ids].clone()
        got["logits"] = lm.output.logits[:, -1, ids].clone()

    def rows(key: str) -> Tensor | None:
        return torch.stack([t.cpu() for t in got[key]], dim=1) if got[key] else None

    return Activations(embed=got["embed"].cpu(), attn=rows("attn"), mlp=rows("mlp"), final=got["final"].cpu(),
                       pre_logits=got["pre"].cpu(), logits=got["logits"].cpu(), z=rows("z"), o_out=rows("o"),
                       experts=rows("ex"), expert_idx=rows("idx"))


def contributions(acts: Activations, ro: Readout, n_experts: int | None = None) -> dict[str, Tensor]:
    """Per-row contributions to each label logit, float64, rows first.

    Returns ``scale [N]``, ``embed``/``const``/``softcap``/``logits``/``pre_logits [N, O]``, ``layers
    [N, L, 2, O]`` (attn, mlp), ``attn_bias [N, L, O]``, and ``heads [N, L, H, O]`` / ``experts [N, L, E, O]``
    when the activations carry them.
    """
    x = acts.final.to(F64)
    var = x.var(-1, unbiased=False) if ro.centre else x.pow(2).mean(-1)
    s = torch.rsqrt(var + ro.eps)  # the frozen final-norm scale, one per row
    D = ro.direction

    def proj(v: Tensor) -> Tensor:
        out = v.to(F64) @ D.T
        return out * s.view(-1, *([1] * (out.dim() - 1)))

    n, L = x.shape[0], acts.attn.shape[1]
    post = torch.ones(n, L, dtype=F64)
    if ro.post_eps is not None:  # Gemma: freeze the post-attention norm scale from the actual o_proj output
        o = acts.o_out.to(F64)
        post = torch.rsqrt(o.pow(2).mean(-1) + torch.tensor(ro.post_eps, dtype=F64))
    pre, logits = acts.pre_logits.to(F64), acts.logits.to(F64)
    res = {
        "scale": s,
        "embed": proj(acts.embed),
        "layers": torch.stack([proj(acts.attn), proj(acts.mlp)], dim=2),
        "attn_bias": ro.attn_bias[None] * (post * s[:, None])[..., None],
        "const": ro.const.expand(n, -1),
        "softcap": logits - pre,
        "logits": logits,
        "pre_logits": pre,
    }
    if acts.z is not None:
        H = ro.n_heads
        z = acts.z.to(F64).reshape(n, L, H, -1)
        hd = ro.head_dir.reshape(L, ro.head_dir.shape[1], H, -1)
        res["heads"] = torch.einsum("nlhk,lohk->nlho", z, hd) * (post * s[:, None])[..., None, None]
    if acts.experts is not None:
        ex = proj(acts.experts)  # [N, L, k, O]
        E = n_experts or int(acts.expert_idx.max()) + 1
        full = torch.zeros(n, L, E, ex.shape[-1], dtype=F64)
        res["experts"] = full.scatter_add_(2, acts.expert_idx.long()[..., None].expand_as(ex), ex)
    return res


def _pairs_first(t: Tensor, n: int) -> np.ndarray:
    """Rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}, ...]`` -> ``[n, side, ...]`` float32."""
    return t.reshape(2, n, *t.shape[1:]).transpose(0, 1).numpy().astype(np.float32)


def _diff(x: np.ndarray) -> np.ndarray:
    return x[..., 0] - x[..., 1]


def direct_logit_attribution(model: Any, pairs: Sequence[PromptPair],
                             options: AttributionOptions = AttributionOptions(),
                             label_ids: Sequence[int] | None = None, ro: Readout | None = None,
                             remote: Any = None) -> xr.Dataset:
    """DLA for every pair, both sides, at the last prompt token (one trace for the whole chunk).

    ``ro`` reuses a :func:`readout` across chunks; ``remote`` overrides the handle's remote setting
    (``"local"`` dry-runs nnsight's serialization). Returns the Dataset described in the module docstring.
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
    ro = ro if ro is not None else readout(model, batch.label_ids, remote=remote)
    acts = collect(model, batch.encoded.inputs(), batch.label_ids, heads=options.heads, remote=remote)
    n_experts = int(model.config.num_local_experts) if model.adapter.moe else None
    c = contributions(acts, ro, n_experts)
    n = batch.n

    layer_logit = _pairs_first(c["layers"], n)  # [n, 2, L, 2, O]
    rest = [i for i in range(L) if i not in keep]
    other = layer_logit[:, :, rest].sum((2, 3)) if rest else np.zeros_like(layer_logit[:, :, 0, 0])
    per_option = {
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
        "attn_bias_contribution": (PSL, _diff(_pairs_first(c["attn_bias"], n))[:, :, keep]),
        "attn_bias_logit_contribution": (PSL + ("option",), _pairs_first(c["attn_bias"], n)[:, :, keep]),
        "logit_diff": (PS, _diff(_pairs_first(c["logits"], n))),
        "label_logit": (PS + ("option",), _pairs_first(c["logits"], n)),
        "final_norm_scale": (PS, _pairs_first(c["scale"], n)),
        "category": (("prompt",), np.array([p.category for p in pairs], dtype=str)),
    }
    for name, values in per_option.items():
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
        heads = _pairs_first(c["heads"], n)[:, :, keep]
        data["head_logit_contribution"] = (PSL + ("head", "option"), heads)
        data["head_contribution"] = (PSL + ("head",), _diff(heads))
        coords["head"] = np.arange(heads.shape[3])
    if "experts" in c:
        experts = _pairs_first(c["experts"], n)[:, :, keep]
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
                              heads=True if heads is None else bool(heads))
    cache: dict[str, Readout] = {}

    def fn(m: Any, pairs: Sequence[PromptPair]) -> xr.Dataset:
        if "ro" not in cache:  # the readout depends only on the labels: compute it once per run
            cache["ro"] = readout(m, ctx.label_ids)
        return direct_logit_attribution(m, pairs, opts, label_ids=ctx.label_ids, ro=cache["ro"])

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
