"""Load-time check of an adapter: the uniform paths exist (:func:`check_paths`, enough for a weightless
remote model) and, with local weights, one tiny trace reads every accessor and checks its shape
(:func:`check_adapter`)."""

from __future__ import annotations

import nnsight
import torch

from .adapters import UnsupportedArchitectureError, get_path


class AdapterCheckError(UnsupportedArchitectureError):
    """An accessor of the adapter does not exist or returned an unexpected shape."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def check_paths(handle) -> None:
    """The uniform paths exist: as many decoder layers as the config says, the attention/MLP/o_proj
    accessors of the first and last layer, the embedding, the final norm and the lm_head. Needs no
    weights (a remote model's meta model passes through here only)."""
    lm, ad = handle.lm, handle.adapter
    n_layers = handle.n_layers
    if len(lm.model.layers) != n_layers:
        raise AdapterCheckError(
            f"{ad.family} adapter: model.model.layers has {len(lm.model.layers)} entries, config says {n_layers}"
        )
    try:
        for i in sorted({0, n_layers - 1}):
            for path in (ad.attn_out, ad.mlp_out, ad.o_proj):
                get_path(handle.layer(i), path)
        for env in (lm.model.embed_tokens, lm.model.norm, lm.lm_head):
            env.path  # noqa: B018 - raises if the alias is missing
    except (AttributeError, IndexError) as e:
        raise AdapterCheckError(f"{ad.family} adapter does not fit {handle.name}: {e}") from None


def check_adapter(handle) -> None:
    """Run one 3-token trace through every uniform accessor and check shapes.

    After :func:`check_paths`, checks, for the first and last layer: the layer input and output ``[1, T, d]``, the attention
    and MLP contributions ``[1, T, d]``, the o_proj input ``[1, T, H*dh]``; then the final norm
    output ``[1, T, d]`` and the logits ``[1, T, V]``.
    """
    check_paths(handle)
    lm, ad = handle.lm, handle.adapter
    n_layers, d = handle.n_layers, handle.d_model
    ids = torch.tensor([[handle.tokenizer.eos_token_id or 0] * 3])
    probe = sorted({0, n_layers - 1})
    try:
        with torch.no_grad(), lm.trace(ids):
            shapes = nnsight.save({})
            for i in probe:
                layer = lm.model.layers[i]
                shapes[f"layers[{i}].input"] = tuple(layer.inputs[0][0].shape)
                shapes[f"layers[{i}].o_proj.input"] = tuple(handle.o_proj(i).input.shape)
                shapes[f"layers[{i}].attn_out"] = tuple(_first(handle.attn_out(i).output).shape)
                shapes[f"layers[{i}].mlp_out"] = tuple(_first(handle.mlp_out(i).output).shape)
                shapes[f"layers[{i}].output"] = tuple(_first(layer.output).shape)
            shapes["norm.output"] = tuple(lm.model.norm.output.shape)
            shapes["lm_head.output"] = tuple(lm.lm_head.output.shape)
    except Exception as e:  # noqa: BLE001 - rethrown with the adapter named
        raise AdapterCheckError(f"{ad.family} adapter failed its load-time trace: {type(e).__name__}: {e}") from e
    vocab = handle.config.vocab_size
    for key, shape in shapes.items():
        want_last = vocab if key == "lm_head.output" else d
        if key.endswith("o_proj.input"):
            want_last = None
        if len(shape) != 3 or shape[:2] != (1, 3) or (want_last is not None and shape[-1] != want_last):
            raise AdapterCheckError(f"{ad.family} adapter: {key} has shape {shape}, expected (1, 3, {want_last or '*'})")
