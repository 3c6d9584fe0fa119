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
* The position / ethical split (see :func:`nnethics.verdict.add_position_content_split`): ``position_contribution`` and
  ``ethical_contribution (prompt, layer, component)`` (mean over the sides of the part, and of the part
  signed toward the ethical option), per head too, ``*_other_contribution (prompt)``, ``ethical_sign``,
  ``content_sensitive``. ``ethical_other_contribution + ethical_contribution.sum(("layer", "component"))``
  is the pair's ``ethical_preference``, and the position parts sum to its ``position_bias``.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ... import verdict as _verdict
from ...prompts import SIDES, PromptPair
from ...store.variables import LD, LOGIT, ONE
from ..base import (
    Analysis,
    Function,
    SharedReads,
    chat_field,
    check_layers,
    check_values,
    labels_field,
    option,
    parse_layers,
    register,
)
from . import tables as export_tables

if TYPE_CHECKING:  # loaded when attribution runs: declaring the analysis needs no torch
    from torch import Tensor

COMPONENTS = ("attn", "mlp")


@dataclass(frozen=True)
class AttributionOptions:
    """Options of :func:`direct_logit_attribution` (every one is recorded in provenance)."""

    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    layers: tuple[int, ...] | None = option(
        None, "Only store these layers, e.g. '0-5,28,29' (default: all); the rest are summed into "
              "other_layers_contribution.", parse=parse_layers)
    heads: bool = option(True, "Also split attention by head.")
    head_options: bool | None = option(
        None, "Per-head contributions per label (head_logit_contribution) as well as their difference (default: yes, "
              "unless a remote run would bring back more than 12 KiB of them per prompt).")

    def __post_init__(self) -> None:
        check_values(self)


HEAD_BYTES_PER_ROW = 12 * 1024  # per-option heads above this, per prompt, come back as the difference only


def per_option_heads(model: Any, options: AttributionOptions, n_kept: int) -> bool:
    """Whether heads come back per option: always locally; through a request (``model.serialized``:
    NDIF or the dry run) while they fit :data:`HEAD_BYTES_PER_ROW`."""
    return head_options_choice(model, options, n_kept)[0]


def head_options_choice(model: Any, options: AttributionOptions, n_kept: int) -> tuple[bool, str]:
    """:func:`per_option_heads` and why, in words (stored as the ``head_options_reason`` attr)."""
    from .trace import is_half, wire_bytes

    if options.head_options is not None:
        return options.head_options, "set by AttributionOptions.head_options"
    if not model.serialized:
        return True, "local weights: nothing travels"
    size = wire_bytes(model.n_layers, model.n_heads, len(options.labels), n_kept, half=is_half(model))["heads"]
    fits = size <= HEAD_BYTES_PER_ROW
    return fits, (f"per-option heads are {size} B per prompt through a request, "
                  f"{'within' if fits else 'over'} the budget of {HEAD_BYTES_PER_ROW} B")


def _pairs_first(t: Tensor, n: int) -> np.ndarray:
    """Rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}, ...]`` -> ``[n, side, ...]`` float32."""
    return t.reshape(2, n, *t.shape[1:]).transpose(0, 1).numpy().astype(np.float32)


def _diff(x: np.ndarray) -> np.ndarray:
    return x[..., 0] - x[..., 1]


def _start(model: Any, batch: Any, options: AttributionOptions, prepared: dict) -> dict:
    """What the shared trace projects: the kept layers, heads and whether they come back per option."""
    labels = list(options.labels)
    if len(labels) < 2:
        raise ValueError(f"attribution needs at least two labels, got {labels}")
    L = model.n_layers
    keep = list(range(L)) if options.layers is None else sorted(set(int(i) for i in options.layers))
    bad = [i for i in keep if not 0 <= i < L]
    if bad or not keep:
        raise ValueError(f"layers {bad or keep} are out of range: the model has layers 0-{L - 1}")
    per_option, why = head_options_choice(model, options, len(keep))
    from ..unembed import label_columns

    return {"_options": options, "_why": why, "kept": keep, "heads": options.heads, "per_option": per_option,
            "columns": label_columns(model.lm.lm_head._module, batch.label_ids)}


def _build(model: Any, batch: Any, job: dict, got: dict) -> xr.Dataset:
    """The attribution Dataset of a chunk from the projections the shared trace brought back."""
    from .trace import Projections, contributions

    options, pairs, keep, per_option = job["_options"], batch.pairs, job["kept"], job["per_option"]
    labels, L = list(options.labels), model.n_layers
    proj = Projections(**got)
    n_experts = int(model.config.num_local_experts) if model.adapter.moe else None
    ds = _dataset(contributions(proj, n_experts), pairs, batch.label_ids, labels, keep, L, per_option)
    if "head_contribution" in ds:
        recorded = {"head_options": "true" if per_option else "false", "head_options_reason": job["_why"]}
        ds["head_contribution"].attrs.update(recorded)
        ds.attrs.update(recorded)
    ethical_first = np.array([[p.ethical(s) == labels[0] for s in SIDES] for p in pairs], dtype=bool)
    return finalize(_verdict.add_position_content_split(ds, ethical_first))


def shares(model: Any, options: AttributionOptions, prepared: dict) -> SharedReads:
    """Attribution projects every part on the label directions inside the shared trace."""
    from .trace import read_projections  # the read runs on the server too: nothing imports there

    return SharedReads(start=_start, read=read_projections, build=_build)


def _dataset(c: dict[str, Tensor], pairs: Sequence[PromptPair], label_ids: Sequence[int], labels: list[str],
             keep: list[int], L: int, per_option: bool) -> xr.Dataset:
    """The Dataset of the module docstring (before the position / ethical split) from :func:`contributions`."""
    n = len(pairs)
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
        "option": labels, "label_token_id": ("option", np.array(label_ids, dtype=np.int32)),
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
    return ds


def finalize(ds: xr.Dataset) -> xr.Dataset:
    """After consolidation: attr ``complete_layers`` (whether every layer of the model is stored)."""
    complete = set(ds["layer"].values.tolist()) == set(range(int(ds["n_model_layers"])))
    return ds.assign_attrs(complete_layers="true" if complete else "false")


def check_model(model: Any, options: AttributionOptions) -> None:
    check_layers("layers", options.layers, model.n_layers)


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
    if "ethical_contribution" in ds:
        eth = ds["ethical_contribution"].mean("prompt")
        pos_total = float((ds["position_other_contribution"] + ds["position_contribution"].sum(("layer", "component"))
                           ).mean())
        eth_total = float((ds["ethical_other_contribution"] + ds["ethical_contribution"].sum(("layer", "component"))
                           ).mean())
        li, ci = np.unravel_index(int(np.nanargmax(np.abs(eth.values))), eth.shape)
        text += (f"; position parts sum to {pos_total:+.2f}, ethical parts to {eth_total:+.3g} (largest ethical part: "
                 f"L{layers[li]} {comps[ci]} {float(eth[li, ci]):+.3g})")
    total = (ds["embed_contribution"] + ds["bias_contribution"] + ds["softcap_contribution"]
             + ds["other_layers_contribution"] + ds["diff_contribution"].sum(("layer", "component")))
    err = float(np.abs(total - ds["logit_diff"]).max())
    return text + f"; parts sum to logit_diff within {err:.1e}"


VARIABLES = {  # what each variable and coordinate it writes is (CF long_name, units): see store.variables
    "diff_contribution": (f"direct contribution to {LD}", LOGIT),
    "logit_contribution": ("direct contribution to each answer label's logit", LOGIT),
    "head_contribution": (f"attention head's direct contribution to {LD}", LOGIT),
    "head_logit_contribution": ("attention head's direct contribution to each label's logit", LOGIT),
    "expert_contribution": (f"MoE expert's direct contribution to {LD}", LOGIT),
    "expert_logit_contribution": ("MoE expert's direct contribution to each label's logit", LOGIT),
    "embed_contribution": (f"embeddings' direct contribution to {LD}", LOGIT),
    "embed_logit_contribution": ("embeddings' direct contribution to each label's logit", LOGIT),
    "bias_contribution": (f"final-norm and lm_head biases' contribution to {LD}", LOGIT),
    "bias_logit_contribution": ("final-norm and lm_head biases' contribution to each label's logit", LOGIT),
    "attn_bias_contribution": (f"attention output bias' contribution to {LD}", LOGIT),
    "attn_bias_logit_contribution": ("attention output bias' contribution to each label's logit", LOGIT),
    "softcap_contribution": ("true minus pre-soft-cap logit difference", LOGIT),
    "softcap_logit_contribution": ("true minus pre-soft-cap logit of each label", LOGIT),
    "other_layers_contribution": (f"summed direct contribution of the layers not stored to {LD}", LOGIT),
    "other_layers_logit_contribution": ("summed direct contribution of the layers not stored to each label's logit",
                                        LOGIT),
    "attn_mlp_ratio": ("|attention| / (|attention| + |MLP|) direct contribution", ONE),
    "final_norm_scale": ("scale the final norm applies to the last residual state", ONE),
    "ethical_sign": ("+1 where the ethical option is label 1, else −1", ONE),
    "ethical_contribution": ("direct contribution toward the ethical option, averaged over sides", LOGIT),
    "ethical_head_contribution": ("attention head's direct contribution toward the ethical option", LOGIT),
    "ethical_other_contribution": ("ethical part of embeddings + biases + soft-cap + other layers", LOGIT),
    "position_contribution": ("direct contribution toward label 1, averaged over sides", LOGIT),
    "position_head_contribution": ("attention head's direct contribution toward label 1", LOGIT),
    "position_other_contribution": ("position part of embeddings + biases + soft-cap + other layers", LOGIT),
}


ANALYSIS = register(Analysis(
    variables=VARIABLES, compare="nnethics.analyses.attribution.figures",
    functions={"direct_logit_attribution": Function(
        "Each layer's attention and MLP (and head / expert) contribution to the label logit difference, as one "
        "chunk (see :mod:`nnethics.analyses.attribution`). Whether heads came back per option (it depends on where "
        "the handle runs traces, :func:`nnethics.analyses.attribution.per_option_heads`) is recorded as the attrs "
        "``head_options`` (``\"true\"``/``\"false\"``) and ``head_options_reason`` of ``head_contribution``.")},
    name="attribution", options=AttributionOptions, summarize=summarize,
    finalize=finalize, check=check_model, command="attribute",
    help="Direct logit attribution: each layer's attention and MLP (and each head / expert) contribution to the "
         "label logits at the decision token; writes STORE/<model>/attribution.nc.",
    tables=export_tables.tables,
    render=("nnethics.analyses.attribution.figures",),
    shares=shares))
