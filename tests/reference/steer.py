"""Reference steering (plain hooks): add a vector to a decoder layer's output at the last position."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import parts
from .hooks import edit_one


@torch.no_grad()
def steered_logit_diff(model: nn.Module, input_ids: Tensor, layer: int, vector: Tensor, ids: tuple[int, int]) -> float:
    """LD at the last position of one unpadded prompt with ``vector`` added to layer ``layer``'s output there."""

    def add(out: Tensor) -> Tensor:
        new = out.clone()
        new[0, -1] = new[0, -1] + vector.to(new.dtype)
        return new

    with edit_one(parts(model).layers[layer], add):
        last = model(input_ids).logits[0, -1]
    return float(last[ids[0]] - last[ids[1]])
