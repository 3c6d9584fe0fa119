"""Architecture adapters: one table row per model family, not an isinstance ladder.

Every analysis addresses a model through the same envoy paths, whatever its family::

    model.model.embed_tokens             token embeddings
    model.model.layers[i]                decoder layer i (its output is the residual stream after layer i)
    model.model.layers[i].<attn_out>     module whose output is the attention's contribution to the residual
    model.model.layers[i].<mlp_out>      module whose output is the MLP's contribution to the residual
    model.model.layers[i].<o_proj>       attention output projection (its input is the per-head result)
    model.model.norm                     final norm
    model.lm_head                        unembedding

Families whose module names differ are mapped onto those paths through nnsight's ``rename=``
aliases. The table is plain data so adding a family is one entry; :func:`check_adapter` runs one
tiny trace at load time and fails loudly if any accessor does not have the expected shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NORM_KINDS = ("rms", "rms_offset", "layer")


@dataclass(frozen=True)
class Adapter:
    """How one architecture family maps onto nnethics' uniform module paths.

    Attributes:
        family: human name of the family, shown in errors and provenance.
        model_types: ``config.model_type`` values that select this adapter.
        rename: nnsight ``rename=`` aliases onto the uniform paths.
        norm: final-norm kind: ``rms`` (x·rsqrt(mean x²+eps)·w), ``rms_offset`` (Gemma: ·(1+w), in
            float32) or ``layer`` (LayerNorm with bias).
        attn_out / mlp_out: attribute paths (under a decoder layer) of the modules whose outputs are
            added to the residual stream.
        attn_out_is_tuple: whether ``attn_out``'s output is a tuple whose element 0 is the tensor.
        o_proj: attribute path (under a decoder layer) of the attention output projection.
        o_proj_conv1d: GPT-2 style Conv1D (``y = x @ W + b``, W is [H*dh, d]) instead of Linear.
        attn_post_norm: attribute path of a norm applied to the attention output before it joins the
            residual (Gemma's ``post_attention_layernorm``); per-head splits pass through it with its
            scale frozen.
        moe: the MLP is a mixture-of-experts block with fused expert weights (Mixtral in transformers 5).
        softcap_attr: config attribute holding the final-logit soft-cap, if the family has one.
        eps_attrs: attribute names under which the final norm keeps its epsilon.
    """

    family: str
    model_types: tuple[str, ...]
    rename: Mapping[str, str] = field(default_factory=dict)
    norm: str = "rms"
    attn_out: str = "self_attn"
    attn_out_is_tuple: bool = True
    mlp_out: str = "mlp"
    o_proj: str = "self_attn.o_proj"
    o_proj_conv1d: bool = False
    attn_post_norm: str | None = None
    moe: bool = False
    softcap_attr: str | None = None
    eps_attrs: tuple[str, ...] = ("variance_epsilon", "eps")

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"adapter {self.family}: norm must be one of {NORM_KINDS}, got {self.norm!r}")


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="Llama / Mistral / Qwen2 / SmolLM",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"),
    ),
    Adapter(
        family="Gemma 2 / Gemma 3",
        model_types=("gemma2", "gemma3_text", "gemma3"),
        norm="rms_offset",
        attn_out="post_attention_layernorm",
        attn_out_is_tuple=False,
        mlp_out="post_feedforward_layernorm",
        attn_post_norm="post_attention_layernorm",
        softcap_attr="final_logit_softcapping",
    ),
    Adapter(
        family="GPT-2",
        model_types=("gpt2",),
        rename={"transformer": "model", "h": "layers", "attn": "self_attn", "ln_f": "norm", "wte": "embed_tokens"},
        norm="layer",
        o_proj="self_attn.c_proj",
        o_proj_conv1d=True,
    ),
    Adapter(
        family="GPT-NeoX / Pythia",
        model_types=("gpt_neox",),
        rename={
            "gpt_neox": "model",
            "embed_in": "embed_tokens",
            "attention": "self_attn",
            "final_layer_norm": "norm",
            "embed_out": "lm_head",
        },
        norm="layer",
        o_proj="self_attn.dense",
    ),
    Adapter(family="Phi-3", model_types=("phi3",)),
    Adapter(family="Mixtral (MoE)", model_types=("mixtral",), moe=True),
)


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def supported_families() -> list[str]:
    return [f"{a.family} (model_type: {', '.join(a.model_types)})" for a in ADAPTERS]


def adapter_for(config: Any) -> Adapter:
    """Pick the adapter for a transformers config (or a ``model_type`` string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    listing = "\n  - ".join(supported_families())
    raise UnsupportedArchitectureError(
        f"nnethics has no adapter for model_type {model_type!r}. Supported families:\n  - {listing}\n"
        "Add a row to nnethics.models.adapters.ADAPTERS to support another family."
    )


def get_path(envoy: Any, path: str) -> Any:
    """Follow a dotted attribute path (``"self_attn.o_proj"``) from an envoy or module."""
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def final_norm_eps(adapter: Adapter, norm_module: Any) -> float:
    for name in adapter.eps_attrs:
        value = getattr(norm_module, name, None)
        if value is not None:
            return float(value)
    raise AttributeError(f"final norm {type(norm_module).__name__} has none of {adapter.eps_attrs}")
