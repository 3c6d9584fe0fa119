"""Reference logit lens via plain forward hooks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .arch import parts, softcap_fn
from .hooks import record


@torch.no_grad()
def logit_lens(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits [L, V] at the last position from each decoder layer's output, passed
    through the model's final norm module, lm_head and (if configured) softcap."""
    p = parts(model)
    mods = {str(i): lay for i, lay in enumerate(p.layers)}
    with record(mods) as r:
        model(input_ids)
    cap = softcap_fn(p.softcap)
    rows = [cap(p.lm_head(p.final_norm(r[str(i)][:, -1:])))[0, 0] for i in range(p.n_layers)]
    return torch.stack(rows)


@torch.no_grad()
def hidden_states_reference(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, ...]:
    """HF's ``output_hidden_states=True`` tuple (L+1 entries, [1, T, d] each), for
    cross-checking. HF conventions: entry 0 is the layer-0 input, entries 1..L-1 are the
    outputs of layers 0..L-2, and the last entry is the FINAL-NORMED last-layer output."""
    return tuple(model(input_ids, output_hidden_states=True).hidden_states)


@torch.no_grad()
def lens_fit(model: nn.Module, input_ids: Tensor,
             translate: Callable[[int, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per layer and position, KL(final ‖ lens) in nats and whether the lens' top token is the model's.

    ``final`` is the model's own next-token distribution (its output logits); the lens decodes each layer's
    output ``h`` (after ``translate(layer, h)``, if given) with the final norm, lm_head and soft-cap.
    Returns ``kl [L, T]`` and ``top1 [L, T]`` (bool) for batch row 0, in float64.
    """
    p = parts(model)
    mods = {str(i): lay for i, lay in enumerate(p.layers)}
    with record(mods) as r:
        final = model(input_ids).logits[0].double()
    cap = softcap_fn(p.softcap)
    log_p = final.log_softmax(-1)
    kls, tops = [], []
    for i in range(p.n_layers):
        h = r[str(i)][0]
        if translate is not None:
            h = translate(i, h)
        log_q = cap(p.lm_head(p.final_norm(h))).double().log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        tops.append(log_q.argmax(-1) == log_p.argmax(-1))
    return torch.stack(kls), torch.stack(tops)
