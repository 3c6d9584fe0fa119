"""The steer analysis' chunk pass (:class:`~nnethics.analyses.base.SharedReads`): what it reads in the chunk's
shared trace, the rows it runs after it in the trace's session (remote-safe: module-level names only), and the
chunk's Dataset."""

from __future__ import annotations

from typing import Any

import xarray as xr

from ..patching.engine import Row, kv_possible
from . import stats
from .engine import chunk_pass
from .options import SteerOptions


def start(model: Any, batch: Any, options: SteerOptions, prepared: dict) -> dict:
    """The chunk's plan: whether its rows run over a prefix cache (``cache``)."""
    n = batch.n
    why = kv_possible(model, batch.encoded, [[Row(i), Row(n + i)] for i in range(n)])
    keep = list(options.layers) if options.layers is not None else list(range(model.n_layers))
    return {"cache": why is None, "max_tokens": options.max_tokens, "keep": keep, "_options": options,
            "_why": why or ""}


def read(model: Any, batch: Any, job: dict) -> Any:
    """Inside the shared trace: every layer's output at the decision position ``[2n, L, d]`` and the label logits."""
    import nnsight
    import torch

    outs = [model.lm.model.layers[i].output for i in range(model.n_layers)]
    states = torch.stack([(o[0] if isinstance(o, tuple) else o)[:, -1] for o in outs], dim=1)
    ids = [batch.label_ids[0], batch.label_ids[1]]
    label = model.lm.output.logits[:, -1][:, ids].float()
    return nnsight.save({"states": states.clone(), "label": label.clone()})


def rows(model: Any, batch: Any, job: dict, saved: Any, prefix: Any) -> dict:
    """After the shared trace, in its session: resid patching at the decision position and the answer-token states
    (:func:`.engine.chunk_pass`)."""
    got = chunk_pass(model, batch, job, saved["states"], prefix)
    return {"label": saved["label"], **got}


def build(model: Any, batch: Any, job: dict, got: dict) -> xr.Dataset:
    options, n = job["_options"], batch.n
    label = got["label"].cpu().double().numpy()
    ld = (label[:, 0] - label[:, 1]).reshape(2, n).T
    states = got["states"]
    dtype = str(states.dtype).replace("torch.", "")
    h = states.float().cpu().numpy().reshape(2, n, *states.shape[1:]).transpose(1, 0, 2, 3)
    answers = got["answers"].float().cpu().numpy().reshape(2, n, *got["answers"].shape[1:]).transpose(1, 0, 2, 3, 4)
    patched = got["ld"].double().numpy().reshape(n, -1)
    ds = stats.chunk_dataset(batch.pairs, options.labels, ld, patched, h, answers, job["keep"],
                             "kv_cache" if job["cache"] else "full", dtype)
    ds.attrs["min_gap"] = float(options.min_gap)
    ds.attrs["forward_path_why"] = job["_why"]
    return ds
