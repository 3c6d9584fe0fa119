"""Next-token entropy at the decision position: the README's worked example of adding an analysis.

One module declares the options, computes one chunk of pairs, summarises, owns its export table and names its
render module; :func:`register` makes ``nnethics run --analyses entropy``, the report and ``export`` see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from nnethics.analyses.base import Analysis, chat_field, check_values, labels_field, option, register
from nnethics.analyses.common import encode_pairs
from nnethics.prompts import SIDES


@dataclass(frozen=True)
class EntropyOptions:
    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    base: float = option(2.0, "Logarithm base of the entropy (2: bits, e for nats).", min=1, min_open=True)

    def __post_init__(self) -> None:
        check_values(self)  # choices and bounds declared in option()


def entropy(model: Any, pairs: Sequence, options: EntropyOptions = EntropyOptions(),
            label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Entropy of the next-token distribution at the last prompt token, per prompt and side (one trace)."""
    import torch

    batch = encode_pairs(model, pairs, options.labels, options.chat, label_ids)
    with torch.no_grad(), model.trace(batch.encoded.inputs()):
        logp = model.lm.output.logits[:, -1].float().log_softmax(-1)
        h = (-(logp.exp() * logp).sum(-1)).save()
    values = h.cpu().numpy().reshape(2, batch.n).T / np.log(options.base)
    ds = xr.Dataset({"entropy": (("prompt", "side"), values)},
                    coords={"prompt": [p.prompt_id for p in pairs], "side": list(SIDES)})
    ds["entropy"].attrs.update(long_name="next-token entropy at the decision position", units=f"log{options.base:g}")
    return ds


def summarize(ds: xr.Dataset) -> str:
    return f"{ds.sizes['prompt']} pairs; mean entropy {float(ds['entropy'].mean()):.2f} {ds['entropy'].attrs['units']}"


def tables(name: str, ds: xr.Dataset, data: Any) -> dict:
    return {"entropy": lambda: ds["entropy"].to_dataframe().reset_index()}


ANALYSIS = Analysis(name="entropy", options=EntropyOptions, compute=entropy, summarize=summarize,
                    help="Next-token entropy at the decision position; writes STORE/<model>/entropy.nc.",
                    tables=tables, render=("plugins.entropy_render",), default=False)


def install() -> Analysis:
    return register(ANALYSIS)
