"""Reference steering (plain hooks): add a vector to a decoder layer's output at the last position, and the states
the directions are made from. Unpadded single prompts, plain transformers forwards."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import parts
from .hooks import edit_one, record


@torch.no_grad()
def steered_next_token(model: nn.Module, input_ids: Tensor, layer: int, vector: Tensor, ids: tuple[int, int]
                       ) -> tuple[float, Tensor]:
    """LD and the next-token log-probabilities at the last position of one unpadded prompt with ``vector`` added to
    layer ``layer``'s output there."""

    def add(out: Tensor) -> Tensor:
        new = out.clone()
        new[0, -1] = new[0, -1] + vector.to(new.dtype)
        return new

    with edit_one(parts(model).layers[layer], add):
        last = model(input_ids).logits[0, -1].float()
    return float(last[ids[0]] - last[ids[1]]), last.log_softmax(-1)


def steered_logit_diff(model: nn.Module, input_ids: Tensor, layer: int, vector: Tensor, ids: tuple[int, int]) -> float:
    return steered_next_token(model, input_ids, layer, vector, ids)[0]


@torch.no_grad()
def last_states(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Every decoder layer's output at the last position of one unpadded prompt, ``[L, d]`` (float64)."""
    layers = parts(model).layers
    with record({str(i): m for i, m in enumerate(layers)}) as got:
        model(input_ids)
    return torch.stack([got[str(i)][0, -1] for i in range(len(layers))]).double()
