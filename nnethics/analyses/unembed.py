"""The label logits without the whole vocabulary, bit for bit.

An LD needs a handful of logits, but ``lm_head`` computes one per vocabulary entry (a quarter of a small model's
one-token row; for the whole sequence of a prompt, more than the rest of an analysis). :func:`label_columns`
picks the rows of the unembedding to compute instead: the labels first, then fillers up to
:data:`MIN_COLUMNS`. Measured with torch's CPU matmul (MKL): below 16 output columns it takes another kernel and
the logits differ in the last bits from the whole vocabulary's; from 16 on they are bit-equal (for any number of
input rows; ``tests/test_unembed.py`` checks it on the built-in model), so results keep their bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MIN_COLUMNS = 16


def label_columns(head: Any, ids: Sequence[int]) -> list[int] | None:
    """The unembedding rows to compute for the logits of ``ids`` (those first, in order), or None where
    ``head`` (the lm_head module) is not a plain ``nn.Linear`` (quantized: it runs whole)."""
    if type(head) is not torch.nn.Linear or head.out_features < MIN_COLUMNS:
        return None
    ids = [int(i) for i in ids]
    fill = [i for i in range(MIN_COLUMNS + len(ids)) if i not in ids]
    return ids + fill[:max(0, MIN_COLUMNS - len(ids))]


def logits_of(head: Any, x: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """``lm_head(x)[..., columns]`` computed on ``columns`` only (``head``: the lm_head envoy or module)."""
    bias = head.bias[columns] if getattr(head, "bias", None) is not None else None
    return torch.nn.functional.linear(x, head.weight[columns], bias)
