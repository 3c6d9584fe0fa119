"""Next-token entropy at the decision position: the README's worked example of adding an analysis.

An analysis is a package. This module declares everything nnethics needs to know: the options, the compute of one
chunk of pairs, the summary line, the variables it writes (CF long_name and units), its export table, its report
and comparison figures (:mod:`.figures`), the ``nnethics run`` flag it offers and its function of the Python API.
:func:`register` makes ``nnethics run --analyses entropy``, the generated command, the report, ``compare``,
``export`` and ``nnethics.engine.next_token_entropy`` see it; nothing else in nnethics is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xarray as xr

from nnethics.analyses.base import Analysis, Function, chat_field, check_values, labels_field, option, register
from nnethics.analyses.common import encode_pairs
from nnethics.prompts import SIDES


@dataclass(frozen=True)
class EntropyOptions:
    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    temperature: float = option(1.0, "Softmax temperature of the next-token distribution.", min=0, min_open=True)

    def __post_init__(self) -> None:
        check_values(self)  # choices and bounds declared in option()


def entropy(model: Any, pairs: Sequence, options: EntropyOptions = EntropyOptions(),
            label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Entropy (nats) of the next-token distribution softmax(logits / temperature) at the last prompt token, per
    prompt and side (one trace)."""
    import torch

    batch = encode_pairs(model, pairs, options.labels, options.chat, label_ids)
    with torch.no_grad(), model.trace(batch.encoded.inputs()):
        logp = (model.lm.output.logits[:, -1].float() / options.temperature).log_softmax(-1)
        h = (-(logp.exp() * logp).sum(-1)).save()
    values = h.cpu().numpy().reshape(2, batch.n).T
    return xr.Dataset({"entropy": (("prompt", "side"), values)},
                      coords={"prompt": [p.prompt_id for p in pairs], "side": list(SIDES)})


def summarize(ds: xr.Dataset) -> str:
    return f"{ds.sizes['prompt']} pairs; mean entropy {float(ds['entropy'].mean()):.2f} nats"


def tables(name: str, ds: xr.Dataset, data: Any) -> dict:
    return {"entropy": lambda: ds["entropy"].to_dataframe().reset_index()}


ANALYSIS = Analysis(
    name="entropy", options=EntropyOptions, compute=entropy, summarize=summarize,
    help="Next-token entropy at the decision position; writes STORE/<model>/entropy.nc.",
    variables={"entropy": ("next-token entropy at the decision position", "nats")},
    tables=tables, render=("plugins.entropy.figures",), compare="plugins.entropy.figures",
    run_flags=("temperature",),
    functions={"next_token_entropy": Function("Next-token entropy of every pair, both sides, as one chunk.")},
    default=False)


def install() -> Analysis:
    return register(ANALYSIS)
