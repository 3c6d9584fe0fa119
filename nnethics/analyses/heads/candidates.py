"""The candidate heads of ``heads``: each chunk's one request brings back the attention of more heads than the
top ones, chosen on the server from the prompts so far, and :func:`assemble` takes the top heads' attention from
them once ``finalize`` has chosen those (NumPy only, no torch).

The top heads are the ``top_heads`` with the largest |mean effect| over ALL prompts, known only once every chunk
is done, but a chunk's session must decide what to bring back. It ranks the heads by |mean effect| over the
prompts so far (the previous chunks' running sums, :class:`RunningRank`, plus its own effects; ties by |DLA|:
:func:`nnethics.analyses.heads.attention.rank_candidates`) and brings back the attention of the first
:func:`candidate_count` of them. A chosen head among a prompt's candidates gets its attention from them (the
same eager forward over the same prefix and padding as the fallback's, so the same bits); the heads a prompt's
candidates miss go through the ``complete`` pass' fallback (:func:`nnethics.analyses.heads.attention.top_attention`
for those heads only), exact too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

# Candidates per chunk = CANDIDATE_FACTOR x top_heads (at most every head). Twice as many as are kept: the heads
# near the cut move a few places as more prompts come in, and the margin keeps them among the candidates (on the
# built-in model the first chunk of 8 pairs ranked the 6th final head 14th). It costs tokens x top_heads x 2 more
# floats per pair down (about 0.8 KB per head per pair there), against the fallback's extra request (one for the
# run; its upload is mostly code) and its prefix forward for every pair of a chunk that misses a head. No margin
# catches a head whose mean |effect| is carried by pairs of later chunks (README, heads.nc).
CANDIDATE_FACTOR = 2
CANDIDATES = ("candidate_attention", "candidate_layer", "candidate_head")


def candidate_count(top_heads: int, n_layers: int, n_heads: int) -> int:
    """How many heads' attention a chunk brings back: ``CANDIDATE_FACTOR x top_heads``, at most every head."""
    return min(CANDIDATE_FACTOR * int(top_heads), n_layers * n_heads)


class RunningRank:
    """The per-head sums over the chunks done so far that a chunk's ranking starts from: the sum and count of
    the defined effects and the sum of |head_dla| over prompts and sides, ``[L, H]`` each. One per run (it is
    ``heads``' ``prepare`` output); :meth:`update` adds each finished chunk's Dataset (what its part holds), and
    :meth:`resume` what a resumed run finds done (the engine calls it through heads' ``resume`` hook)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] | None = None

    def update(self, ds: xr.Dataset) -> None:
        eff = ds["effect"].values.astype(np.float64)
        finite = np.isfinite(eff)
        add = {"effect_sum": np.where(finite, eff, 0.0).sum(0), "effect_count": finite.sum(0).astype(np.float64),
               "dla_sum": np.abs(ds["head_dla"].values.astype(np.float64)).sum((0, 1))}
        self.sums = add if self.sums is None else {k: self.sums[k] + v for k, v in add.items()}

    def resume(self, done: list[xr.Dataset]) -> None:
        """A resumed run: the sums start from what is done (the earlier result and the parts), as if run here."""
        for ds in done:
            self.update(ds)

    def job(self, n_layers: int, n_heads: int, min_gap: float, count: int) -> dict[str, Any]:
        """What a chunk's session ranks with (small: three ``[L, H]`` float32 arrays, ``min_gap``, ``count``)."""
        zero = np.zeros((n_layers, n_heads))
        sums = self.sums or {"effect_sum": zero, "effect_count": zero, "dla_sum": zero}
        return {**{k: v.astype(np.float32) for k, v in sums.items()}, "min_gap": float(min_gap), "count": int(count)}


def ranking_job(running: RunningRank | None, n_layers: int, n_heads: int, min_gap: float, count: int
                ) -> dict[str, Any]:
    """The job of a chunk's ranking (the seam the tests use to force candidates that miss the top heads)."""
    return (running or RunningRank()).job(n_layers, n_heads, min_gap, count)


def with_candidates(ds: xr.Dataset, chosen: list[tuple[int, int]], att: np.ndarray) -> xr.Dataset:
    """A chunk's Dataset with its candidates: ``candidate_attention (prompt, side, candidate, token)`` (``att``,
    right-aligned as ``attention``) and ``candidate_layer``/``candidate_head (prompt, candidate)``."""
    n = ds.sizes["prompt"]
    cell = ("prompt", "candidate")
    ds = ds.assign(candidate_attention=(("prompt", "side", "candidate", "token"), att.astype(np.float32)),
                   candidate_layer=(cell, np.tile(np.array([c[0] for c in chosen], dtype=np.int32), (n, 1))),
                   candidate_head=(cell, np.tile(np.array([c[1] for c in chosen], dtype=np.int32), (n, 1))))
    ds["candidate_attention"].attrs["description"] = (
        "attention weights of the chunk's candidate heads from the decision position to each prompt token (the "
        "complete pass takes the top heads' from them; not in the final file)")
    return ds


def assemble(chosen: list[tuple[int, int]], layer: np.ndarray, head: np.ndarray, cand: np.ndarray,
             att: np.ndarray, rows: list[int]) -> dict[int, list[int]]:
    """Fill ``att [prompt, side, rank, token]`` for the prompts ``rows`` with the ``chosen`` heads found among
    their candidates (``layer``/``head [prompt, candidate]``, weights ``cand [prompt, side, candidate, token]``),
    in place; returns ``{row: the ranks it misses}`` for the rows that miss one (the fallback computes those
    heads only). Missing candidates (-1 or NaN: a part written before they existed) match nothing."""
    missed = {}
    width = min(att.shape[-1], cand.shape[-1])
    for i in rows:
        where = {(int(la), int(h)): j for j, (la, h) in enumerate(zip(layer[i], head[i]))
                 if np.isfinite(la) and np.isfinite(h) and la >= 0}
        for r, c in enumerate(chosen):
            if c in where:
                att[i, :, r, :width] = cand[i, :, where[c], :width]
        lost = [r for r, c in enumerate(chosen) if c not in where]
        if lost:
            missed[i] = lost
    return missed
