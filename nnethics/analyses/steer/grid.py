"""The complete pass of steer: the grid's rows per chunk of pairs, one session each, and their numbers placed in
``steered_*`` ``(layer, kind, alpha, prompt, side)`` and ``unsteered_*`` ``(layer, prompt, side)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ...prompts import PromptPair
from ..common import encode_pairs
from . import stats


def chunk_rows(ds: xr.Dataset, idx: Sequence[int]) -> tuple[dict, list, list]:
    """The rows of the pairs ``idx`` of ``ds`` (a chunk, in that order: row ``i`` is pair ``idx[i]``'s base, ``n + i``
    its counterfactual): per pair, side and layer one unsteered row, then one per kind and alpha != 0 whose KL is
    taken against it; with where each lands: ``(pair, side, layer)`` for the unsteered rows and ``(pair, side,
    layer, kind, alpha)`` for the others (``None`` for the unsteered rows in the second list, and so on)."""
    from .engine import add_row, empty_rows

    n = len(idx)
    layers = [int(x) for x in ds["layer"].values]
    alphas = ds["alpha"].values
    K = ds.sizes["direction_kind"]
    fold = ds["fold"].values
    scale = ds["scale"].values  # [fold, layer]
    sign = stats.ethical_sign(ds)
    signed = ds["signed"].values
    rows, unsteered, steered = empty_rows(), [], []
    for i, p in enumerate(idx):
        f = int(fold[p])
        for s in range(2):
            seq = i if s == 0 else n + i
            for j, layer in enumerate(layers):
                ref = add_row(rows, seq, seq, j, layer)
                unsteered.append((ref, (p, s, j)))
                for c in range(K):
                    u = (f * len(layers) + j) * K + c
                    for a, alpha in enumerate(alphas):
                        if alpha == 0:
                            continue
                        coef = stats.coefficient(alpha, scale[f, j], sign[p, s] if signed[c] else 1.0)
                        steered.append((add_row(rows, seq, seq, j, layer, u, coef, ref), (p, s, j, c, a)))
    return rows, unsteered, steered


def run_grid(model: Any, ds: xr.Dataset, pairs: Sequence[PromptPair], options: Any, label_ids: Any,
             batch_size: int) -> xr.Dataset:
    """Every row of the grid, a chunk of ``batch_size`` pairs (in ``ds``'s order) per session; alpha 0 is the
    unsteered row itself (the same bits)."""
    import torch

    from ..patching.engine import Row, kv_possible
    from .engine import grid_session, max_rows

    by_id = {p.prompt_id: p for p in pairs}
    ids = [str(x) for x in ds["prompt"].values]
    n, L, K, A = len(ids), ds.sizes["layer"], ds.sizes["direction_kind"], ds.sizes["alpha"]
    ld = np.full((L, K, A, n, 2), np.nan)
    kl = np.full((L, K, A, n, 2), np.nan)
    top = np.zeros((L, K, A, n, 2), dtype=bool)
    ld0 = np.full((L, n, 2), np.nan)
    top0 = np.zeros((L, n, 2), dtype=bool)
    dtype = getattr(torch, str(ds.attrs.get("state_dtype", "float32")))
    units = torch.as_tensor(ds["direction"].transpose("fold_id", "layer", "direction_kind", "hidden").values).reshape(
        -1, ds.sizes["hidden"])
    state = ds["state"].transpose("prompt", "side", "layer", "hidden").values
    zero = [a for a in range(A) if ds["alpha"].values[a] == 0]
    for lo in range(0, n, batch_size):
        idx = [i for i in range(lo, min(n, lo + batch_size)) if ids[i] in by_id]
        if not idx:
            continue
        batch = encode_pairs(model, [by_id[ids[i]] for i in idx], list(options.labels), options.chat, label_ids)
        m = len(idx)
        kv = kv_possible(model, batch.encoded, [[Row(i), Row(m + i)] for i in range(m)]) is None
        rows, unsteered, steered = chunk_rows(ds, idx)
        h = torch.as_tensor(np.concatenate([state[idx, 0], state[idx, 1]]))  # [2m, layers, d]
        size = max_rows(options.max_tokens, kv, int(batch.encoded.input_ids.shape[1]))
        got = model.session(grid_session, batch.encoded, kv, (batch.label_ids[0], batch.label_ids[1]), h, units,
                            rows, size, dtype)
        g_ld, g_top, g_kl = got["ld"].double().numpy(), got["top"].numpy(), got["kl"].double().numpy()
        for r, (p, s, j) in unsteered:
            ld0[j, p, s], top0[j, p, s] = g_ld[r], g_top[r]
            for a in zero:  # alpha 0: the unsteered row, KL 0
                ld[j, :, a, p, s], top[j, :, a, p, s], kl[j, :, a, p, s] = g_ld[r], g_top[r], 0.0
        for r, (p, s, j, c, a) in steered:
            ld[j, c, a, p, s], top[j, c, a, p, s], kl[j, c, a, p, s] = g_ld[r], g_top[r], g_kl[r]
    cell = ("layer", "direction_kind", "alpha", "prompt", "side")
    return ds.assign(steered_logit_diff=(cell, ld.astype(np.float32)), steered_kl=(cell, kl.astype(np.float32)),
                     steered_label_top=(cell, top),
                     unsteered_logit_diff=(("layer", "prompt", "side"), ld0.astype(np.float32)),
                     unsteered_label_top=(("layer", "prompt", "side"), top0))
