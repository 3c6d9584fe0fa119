"""Reference activation patching, noise/restore and attribution patching (plain hooks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .arch import Parts, parts
from .hooks import add_at, edit, record, set_positions

COMPONENTS = ("resid", "attn", "mlp")


def _ld(logits: Tensor, ids: tuple[int, int]) -> Tensor:
    """Logit difference at the last position of batch 0 (0-d tensor)."""
    last = logits[0, -1]
    return last[ids[0]] - last[ids[1]]


def _module(p: Parts, layer: int, component: str) -> nn.Module:
    """The module whose output is ``component`` of decoder layer ``layer``."""
    lay = p.layers[layer]
    if component == "resid":
        return lay
    if component == "attn":
        return p.attn(lay)
    if component == "mlp":
        return p.mlp(lay)
    raise ValueError(f"unknown component {component!r}")


def _modules(p: Parts, components: Sequence[str]) -> dict[str, nn.Module]:
    return {f"{c}.{i}": _module(p, i, c) for c in components for i in range(p.n_layers)}


@torch.no_grad()
def logit_diff(model: nn.Module, input_ids: Tensor, ids: tuple[int, int]) -> float:
    """LD = logit[id1] - logit[id2] at the last position."""
    return float(_ld(model(input_ids).logits, ids))


@torch.no_grad()
def patch_sweep(
    model: nn.Module,
    base_ids: Tensor,
    cf_ids: Tensor,
    ids: tuple[int, int],
    components: Sequence[str] = COMPONENTS,
    position: int = -1,
) -> dict[str, Tensor]:
    """Patch each (layer, component) at ``position`` (from the end) with the cf value.

    One base forward pass per (layer, component). Returns component -> Tensor[L] of LDs.
    """
    p = parts(model)
    pos_cf = position % cf_ids.shape[1]
    pos_base = position % base_ids.shape[1]
    with record(_modules(p, components)) as cf:
        model(cf_ids)
    out: dict[str, Tensor] = {}
    for comp in components:
        vals = torch.zeros(p.n_layers)
        for i in range(p.n_layers):
            value = cf[f"{comp}.{i}"][0, pos_cf]
            with edit([(_module(p, i, comp), set_positions(value, pos_base))]):
                vals[i] = _ld(model(base_ids).logits, ids).float()
        out[comp] = vals
    return out


@torch.no_grad()
def patch_all_positions_resid(
    model: nn.Module, base_ids: Tensor, cf_ids: Tensor, ids: tuple[int, int], layer: int
) -> float:
    """Overwrite every position of layer ``layer``'s output with the cf's; return LD."""
    if base_ids.shape != cf_ids.shape:
        raise ValueError("base and cf prompts must have the same length")
    p = parts(model)
    with record({"r": p.layers[layer]}) as cf:
        model(cf_ids)
    with edit([(p.layers[layer], set_positions(cf["r"][0]))]):
        return float(_ld(model(base_ids).logits, ids))


def restore_layers(n_layers: int, layer: int, window: int = 1) -> list[int]:
    """ROME's window of ``window`` consecutive layers around ``layer``, clipped to the model: it starts
    ``window // 2`` layers below ``layer`` (so an odd window is centred and an even one has one layer more below
    than above, as in ROME's ``trace_with_repatch`` calls), then drops the layers outside ``0 .. n_layers - 1``.

    Written as a run of ``window`` layers from its first one, not as nnethics' ``range(max(..), min(..))``, so
    the two formulations check each other (tests/test_patching.py also checks both against sets written out).
    """
    first = layer - window // 2
    return [k for k in range(first, first + window) if 0 <= k < n_layers]


@torch.no_grad()
def noise_corrupted_ld(
    model: nn.Module,
    base_ids: Tensor,
    ids: tuple[int, int],
    span: tuple[int, int],
    noise: Tensor,
) -> float:
    """LD with ``noise`` [end-start, d] added to the layer-0 input at token positions span."""
    p = parts(model)
    with edit([(p.resid0, add_at(noise, *span))]):
        return float(_ld(model(base_ids).logits, ids))


@torch.no_grad()
def noise_restore(
    model: nn.Module,
    base_ids: Tensor,
    ids: tuple[int, int],
    span: tuple[int, int],
    noise: Tensor,
    layer: int,
    window: int = 1,
    component: str = "resid",
) -> float:
    """Corrupt the embedding at ``span``, restore clean ``component`` at all positions
    for the ROME window of layers around ``layer``; return the LD."""
    p = parts(model)
    layers = restore_layers(p.n_layers, layer, window)
    mods = {i: _module(p, i, component) for i in layers}
    with record({str(i): m for i, m in mods.items()}) as clean:
        model(base_ids)
    edits = [(p.resid0, add_at(noise, *span))]
    edits += [(m, set_positions(clean[str(i)][0])) for i, m in mods.items()]
    with edit(edits):
        return float(_ld(model(base_ids).logits, ids))


def attribution_patching(
    model: nn.Module,
    base_ids: Tensor,
    cf_ids: Tensor,
    ids: tuple[int, int],
    position: int = -1,
    components: Sequence[str] = COMPONENTS,
) -> dict[str, Tensor]:
    """First-order estimate of patching: (cf - base)[position] . dLD/d(state)[position].

    Gradients come from torch.autograd.grad on hook-captured tensors, with parameter
    grads switched off and the embedding output made to require grad.
    """
    p = parts(model)
    mods = _modules(p, components)
    pos_cf = position % cf_ids.shape[1]
    pos_base = position % base_ids.shape[1]
    with torch.no_grad(), record(mods) as cf:
        model(cf_ids)

    saved = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in saved:
        q.requires_grad_(False)
    try:

        def leaf(out: Tensor) -> Tensor:
            return out.detach().clone().requires_grad_(True)

        with torch.enable_grad(), edit([(p.embed, leaf)]), record(mods, detach=False) as base:
            ld = _ld(model(base_ids).logits, ids)
            names = list(mods)
            grads = torch.autograd.grad(ld, [base[n] for n in names], allow_unused=True)
    finally:
        for q, flag in saved:
            q.requires_grad_(flag)

    out: dict[str, Tensor] = {c: torch.zeros(p.n_layers) for c in components}
    for name, g in zip(names, grads, strict=True):
        comp, i = name.split(".")
        if g is None:
            continue
        delta = cf[name][0, pos_cf].double() - base[name][0, pos_base].detach().double()
        out[comp][int(i)] = float(delta @ g[0, pos_base].double())
    return out
