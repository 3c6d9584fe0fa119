"""Module-path table for the supported Hugging Face causal-LM families."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# family -> description of where things live.
#   base:     attribute path of the inner model
#   embed:    token-embedding module (relative to base)
#   resid0:   module whose output is the input hidden state of layer 0 (relative to base)
#   layers:   decoder layer list (relative to base)
#   attn/mlp: module (relative to a layer) whose output is added to the residual
#   o_proj:   attention output projection (relative to a layer)
#   norm:     final norm (relative to base); head: unembedding (relative to the model;
#             "a|b" = first that exists: GPT-NeoX renamed embed_out -> lm_head in transformers 5)
#   kind:     "rms" | "rms_offset" | "layer";  conv1d: o_proj is a GPT-2 Conv1D
_LLAMA = dict(
    base="model",
    embed="embed_tokens",
    resid0="embed_tokens",
    layers="layers",
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    norm="norm",
    head="lm_head",
    kind="rms",
    conv1d=False,
)
_GEMMA = dict(_LLAMA, attn="post_attention_layernorm", mlp="post_feedforward_layernorm", kind="rms_offset")
FAMILIES: dict[str, dict] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "phi3": _LLAMA,
    "mixtral": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": dict(
        base="transformer",
        embed="wte",
        resid0="drop",
        layers="h",
        attn="attn",
        mlp="mlp",
        o_proj="attn.c_proj",
        norm="ln_f",
        head="lm_head",
        kind="layer",
        conv1d=True,
    ),
    "gpt_neox": dict(
        base="gpt_neox",
        embed="embed_in",
        resid0="embed_in",
        layers="layers",
        attn="attention",
        mlp="mlp",
        o_proj="attention.dense",
        norm="final_layer_norm",
        head="lm_head|embed_out",
        kind="layer",
        conv1d=False,
    ),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    if "|" in path:
        for alt in path.split("|"):
            try:
                return _get(root, alt)
            except AttributeError:
                pass
        raise AttributeError(f"none of {path!r} on {type(root).__name__}")
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@dataclass
class Parts:
    """Handles on the pieces of one model needed by the references."""

    family: str
    embed: nn.Module
    resid0: nn.Module
    layers: list[nn.Module]
    final_norm: nn.Module
    lm_head: nn.Module
    norm_kind: str
    eps: float
    n_heads: int
    softcap: float | None
    conv1d: bool
    _attn: str
    _mlp: str
    _o_proj: str

    def attn(self, layer: nn.Module) -> nn.Module:
        """Module whose (first) output is the attention contribution to the residual."""
        return _get(layer, self._attn)

    def mlp(self, layer: nn.Module) -> nn.Module:
        """Module whose output is the MLP contribution to the residual."""
        return _get(layer, self._mlp)

    def o_proj(self, layer: nn.Module) -> nn.Module:
        """Attention output projection (Linear, or Conv1D for GPT-2)."""
        return _get(layer, self._o_proj)

    def post_attn_norm(self, layer: nn.Module) -> nn.Module | None:
        """Gemma's post-attention norm (between o_proj and the residual), else None."""
        return layer.post_attention_layernorm if self.norm_kind == "rms_offset" else None

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The sparse-MoE block for mixtral, else None."""
        return layer.mlp if self.family == "mixtral" else None

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def norm_eps(norm: nn.Module) -> float:
    """Epsilon of an RMSNorm / Gemma RMSNorm / LayerNorm module."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise AttributeError(f"no eps on {type(norm).__name__}")


def parts(model: nn.Module) -> Parts:
    """Look up the module handles of ``model`` from ``model.config.model_type``."""
    mt = model.config.model_type
    if mt not in FAMILIES:
        raise NotImplementedError(f"unsupported model_type {mt!r}")
    f = FAMILIES[mt]
    base = _get(model, f["base"])
    norm = _get(base, f["norm"])
    return Parts(
        family=mt,
        embed=_get(base, f["embed"]),
        resid0=_get(base, f["resid0"]),
        layers=list(_get(base, f["layers"])),
        final_norm=norm,
        lm_head=_get(model, f["head"]),
        norm_kind=f["kind"],
        eps=norm_eps(norm),
        n_heads=int(model.config.num_attention_heads),
        softcap=getattr(model.config, "final_logit_softcapping", None),
        conv1d=f["conv1d"],
        _attn=f["attn"],
        _mlp=f["mlp"],
        _o_proj=f["o_proj"],
    )


def softcap_fn(cap: float | None) -> Callable:
    """Return x -> cap * tanh(x / cap) (identity when cap is None)."""
    if not cap:
        return lambda x: x
    return lambda x: torch.tanh(x / cap) * cap
