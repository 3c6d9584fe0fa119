"""What heads writes: its options and one chunk's Dataset (the declaration, :mod:`.heads`, and the engine,
:mod:`.heads_engine`, both read them, so neither imports the other)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ... import metrics
from ...metrics import DEFAULT_MIN_GAP
from ...prompts import SIDES, PromptPair
from ...store import schema
from ..base import KV_CACHE, chat_field, check_values, labels_field, max_tokens_field, option
from ..decisions import MIN_GAP_HELP

CELL = ("prompt", "layer", "head")


@dataclass(frozen=True)
class HeadsOptions:
    """Options of the heads analysis (every one is recorded in provenance)."""

    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    top_heads: int = option(8, "Heads whose attention at the decision position is stored (largest mean |effect|; "
                               "ties: mean |DLA|).", min=1)
    atp: bool = option(True, "Attribution patching per head beside the exact values.")
    kv_cache: str = option("auto", "Reuse the prefix's key/value cache (auto: where it applies; on: insist; off: "
                                   "full forwards).", choices=KV_CACHE)
    min_gap: float = option(DEFAULT_MIN_GAP, MIN_GAP_HELP, min=0)
    max_tokens: int = max_tokens_field()

    def __post_init__(self) -> None:
        check_values(self)


def build_dataset(*, pairs: Sequence[PromptPair], labels: list[str], base_ld: np.ndarray, cf_ld: np.ndarray,
                  patched_ld: np.ndarray, atp_delta: np.ndarray | None, dla: np.ndarray, input_ids: np.ndarray,
                  token_text: np.ndarray, min_gap: float, forward_path: str, why: str,
                  top_heads: int = 8) -> xr.Dataset:
    """One chunk's Dataset from NumPy arrays: ``patched_ld``/``atp_delta [prompt, layer, head]``, ``dla [prompt,
    side, layer, head]``."""
    n, L, H = patched_ld.shape
    effect, defined = metrics.normalized_effect(patched_ld, base_ld, cf_ld, min_gap)
    data: dict[str, tuple] = {
        "base_logit_diff": (("prompt",), base_ld.astype(np.float32)),
        "cf_logit_diff": (("prompt",), cf_ld.astype(np.float32)),
        "patched_logit_diff": (CELL, patched_ld.astype(np.float32)),
        "effect": (CELL, effect.astype(np.float32)),
        "effect_defined": (("prompt",), defined),
        "flipped": (CELL, metrics.flips(patched_ld, base_ld)),
        "head_dla": (("prompt", "side", "layer", "head"), dla.astype(np.float32)),
        "input_ids": (("prompt", "side", "token"), input_ids),
        "token_text": (("prompt", "side", "token"), token_text),
        "category": (("prompt",), np.array([p.category for p in pairs], dtype=str)),
        "forward_path": (("prompt",), np.array([forward_path] * n, dtype=str)),
    }
    if atp_delta is not None:
        atp_eff, _ = metrics.normalized_effect(base_ld[:, None, None] + atp_delta, base_ld, cf_ld, min_gap)
        exact = patched_ld - base_ld[:, None, None]
        data["atp_delta"] = (CELL, atp_delta.astype(np.float32))
        data["atp_effect"] = (CELL, atp_eff.astype(np.float32))
        data["atp_correlation"] = (("prompt",), np.array([metrics.pearson(atp_delta[i], exact[i]) for i in range(n)],
                                                         dtype=np.float32))
    coords = {"prompt": [p.prompt_id for p in pairs], "layer": np.arange(L, dtype=np.int32),
              "head": np.arange(H, dtype=np.int32), "side": list(SIDES)}
    ds = xr.Dataset(data, coords=coords)
    _describe(ds, labels, min_gap, why)
    ds.attrs["top_heads"] = int(top_heads)  # finalize chooses this many heads
    return ds


def _describe(ds: xr.Dataset, labels: list[str], min_gap: float, why: str) -> None:
    ld = f"logit({labels[0]}) - logit({labels[1]}) at the decision position (the last prompt token)"
    ds["base_logit_diff"].attrs["description"] = "base run: " + ld
    ds["cf_logit_diff"].attrs["description"] = "counterfactual run: " + ld
    ds["patched_logit_diff"].attrs["description"] = (
        "LD of the base run with one head's o_proj input slice (z) at the decision position taken from the "
        "counterfactual; heads are query heads (GQA: o_proj's input has one slice per query head)")
    ds["effect"].attrs["description"] = "(patched - base_logit_diff) / (cf_logit_diff - base_logit_diff)"
    ds["effect"].attrs[schema.EFFECT_KIND] = schema.NORMALIZED
    ds["effect_defined"].attrs["description"] = f"|cf_logit_diff - base_logit_diff| >= min_gap = {min_gap}"
    ds["effect_defined"].attrs[schema.MIN_GAP] = float(min_gap)
    ds["flipped"].attrs["description"] = "the patched run chooses the other label than the base run"
    ds["head_dla"].attrs["description"] = "direct logit attribution of the head (final-norm scale frozen), as " \
                                          "attribution's head_contribution"
    ds["forward_path"].attrs["description"] = "kv_cache: one-token rows over the prefix cache; full: full " \
                                              "forwards" + (f" ({why})" if why else "")
    if "atp_delta" in ds:
        ds["atp_delta"].attrs["description"] = "attribution patching estimate of patched - base: (z_cf - z_base) . dLD/dz"
        ds["atp_effect"].attrs["description"] = "atp_delta normalised like effect"
        ds["atp_effect"].attrs[schema.EFFECT_KIND] = schema.NORMALIZED
        ds["atp_correlation"].attrs["description"] = "Pearson correlation of atp_delta and patched - base over heads"
    ds.attrs["heads"] = "query heads (GQA models: one o_proj input slice per query head)"
