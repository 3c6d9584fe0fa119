"""A steered forward (issue 27, work in progress): rows of a left-padded batch, each with a vector added to the
output of one decoder layer at the last position (the decision position). Full forwards for now; the analysis'
rows will read the prefix key/value cache as patching's do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..patching.engine import inputs_full


def steered(model: Any, enc: Any, seqs: Sequence[int], layers: Sequence[int], vectors: np.ndarray,
            ids: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One forward of the rows ``seqs`` of ``enc``: row ``r`` gets ``vectors[r]`` added to the output of layer
    ``layers[r]`` at the last position (a zero vector: the unsteered row, the same bits). Returns the label logit
    difference ``[R]`` and the next-token log-probabilities ``[R, vocab]`` (float32) at the last position."""
    inputs, _ = inputs_full(enc, list(seqs))
    by_layer: dict[int, list[int]] = {}
    for r, layer in enumerate(layers):
        by_layer.setdefault(int(layer), []).append(r)
    vec = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
    a, b = ids
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):
        for layer in sorted(by_layer):
            out = model.layer(layer).output
            h = out[0] if isinstance(out, tuple) else out
            rows = by_layer[layer]
            idx = torch.tensor(rows, device=h.device)
            h[idx, -1] = h[idx, -1] + vec[rows].to(device=h.device, dtype=h.dtype)
        logits = model.lm.output.logits[:, -1].float()
        ld = (logits[:, a] - logits[:, b]).save()
        logp = logits.log_softmax(-1).save()
    return ld.cpu().numpy(), logp.cpu().numpy()
