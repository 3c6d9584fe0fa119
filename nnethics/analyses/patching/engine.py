"""The one generic patching engine: batched rows, each carrying its own intervention.

A *group* is the list of rows that one prompt pair needs::

    group[0]   the source run (counterfactual, or the clean base for noise corruption), never edited
    group[1]   the receiver run (base, or the noised base), never patched
    group[2:]  receiver copies, each patched at its own (layers, component, positions) from group[0]

Rows of several groups share a forward pass: at each layer the engine copies, for every patched
row at once, the source row's state into it (``h[R, C] = h[S, C]``, one indexing op per layer and
component), so every patch of a pair comes out of a few batched forwards instead of one forward per
cell. Two ways to run the rows:

* ``full``: every row is the whole (left-padded) sequence. Works for any position and remotely.
* ``kv``: when only the last position is patched, every earlier position is identical in all the
  receiver rows at every layer. One *prefix* forward (all tokens but the last) of each distinct
  (sequence, noise) gives its key/value cache; the rows then run as one-token forwards reading
  that cache through :class:`~.prefix_cache.SharedPrefixCache`, so a patched row costs about one token's
  compute, and its lm_head computes the label columns only (:mod:`.unembed`). Measured and not done: a row
  patched at layer l starting at a layer block below l (earlier layers skipped, the receiver's state put in)
  saved about 0.1 forward-equivalents per pair on the built-in model and changed LDs by up to 1.5e-5, as
  torch's CPU attention gives other last bits for another number of rows in a batch.

The trace bodies only touch envoys, Python ints/lists and tensors created inside the trace, so they
serialise for NDIF (checked with a dry-run handle in the tests). The patching analysis runs the engine
inside one :meth:`~nnethics.models.handle.ModelHandle.session`: on NDIF every forward of a chunk, the
prefix cache of the KV path included, stays on the server, and only the LDs come back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch

from ...models.errors import halving
from ..common import Encoded
from ..prefix_cache import Prefix, inputs_token
from ..unembed import logits_of
from .results import COMPONENTS

FORWARD_ORDER = ("attn", "mlp", "resid")  # order in which a decoder layer produces them


@dataclass(frozen=True)
class Noise:
    """Gaussian noise added to the layer-0 input of a row over token positions ``[start, end)``,
    counted from the end (``end`` 0 = through the last token). ``std`` None: ``scale`` times the
    standard deviation of the clean row's layer-0 input over the span. Seeded on a CPU generator,
    so :func:`noise_sample` reproduces it exactly."""

    start: int
    end: int
    seed: int
    scale: float = 3.0
    std: float | None = None


@dataclass(frozen=True)
class Patch:
    """Copy the source row's ``component`` state into this row at ``positions`` (from the end) at
    each of ``layers``."""

    layers: tuple[int, ...]
    component: str
    positions: tuple[int, ...] = (-1,)


@dataclass(frozen=True)
class Row:
    seq: int                  # row of the Encoded batch this row runs
    noise: Noise | None = None
    patch: Patch | None = None


def noise_sample(seed: int, n_tokens: int, d_model: int) -> torch.Tensor:
    """The standard-normal draw ``[n_tokens, d_model]`` (float32, CPU) behind :class:`Noise`."""
    return torch.randn((n_tokens, d_model), generator=torch.Generator().manual_seed(seed))


def envoys(model: Any, layers: Sequence[int], components: Sequence[str]) -> dict[tuple[int, str], Any]:
    """``(layer, component) -> envoy`` whose output is that state, resolved outside any trace."""
    out = {}
    for layer in layers:
        for comp in components:
            if comp == "resid":
                out[(layer, comp)] = model.layer(layer)
            elif comp == "attn":
                out[(layer, comp)] = model.attn_out(layer)
            elif comp == "mlp":
                out[(layer, comp)] = model.mlp_out(layer)
            else:
                raise ValueError(f"unknown component {comp!r}; use one of {COMPONENTS}")
    return out


def forward_keys(keys) -> list[tuple[int, str]]:
    return sorted(set(keys), key=lambda k: (k[0], FORWARD_ORDER.index(k[1])))


# ---------------------------------------------------------------------------------------------
# trace bodies (remote-safe: envoys, ints, lists; tensors created inside the trace)


def _forward_kw(use_cache: bool | None) -> dict:
    """The forward's ``use_cache`` when it must be set (None: the model's default, as the KV path needs)."""
    return {} if use_cache is None else {"use_cache": use_cache}


def _trace_rows(model: Any, inputs: dict, plan: dict, noise: list, ids: tuple[int, int], use_cache: bool | None,
                keep_cache: bool = False, columns: list[int] | None = None) -> tuple[torch.Tensor | None, list, Any]:
    """One forward of a batch of rows: add noise at layer 0, apply the patches, return the LD per row.
    ``columns``: lm_head computes only these (:func:`.unembed.label_columns`, labels first; bit-equal to the
    whole vocabulary's, see :mod:`.unembed`), skipped with their values as its output, so the model's own
    post-processing (Gemma 2's soft-cap) still applies."""
    env, keys, patches = plan["envoys"], plan["keys"], plan["patches"]
    a, b = (0, 1) if columns is not None else ids
    ld = cache = None  # only saved names come back from the trace
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **_forward_kw(use_cache)):
        sigmas = nnsight.save([])
        if noise:
            x = model.lm.model.layers[0].inputs[0][0]
            for rows, src, lo, hi, seed, scale, std in noise:
                z = torch.randn((hi - lo, x.shape[-1]), generator=torch.Generator().manual_seed(seed))
                s = std if std is not None else scale * float(x[src, lo:hi].float().std())
                sigmas.append(s)
                x[rows, lo:hi] += (s * z).to(device=x.device, dtype=x.dtype)
        for key in keys:
            out = env[key].output
            h = out[0] if isinstance(out, tuple) else out
            rows, src, cols = patches[key]
            h[rows, cols] = h[src, cols]
        if keep_cache:
            cache = model.lm.output.cache.save()
        else:
            if columns is not None:
                head = model.lm.lm_head
                head.skip(logits_of(head, model.lm.model.norm.output[:, -1:], columns))
            logits = model.lm.output.logits[:, -1]
            ld = (logits[:, a].float() - logits[:, b].float()).save()
    return ld, list(sigmas), cache


def _trace_atp(model: Any, inputs: dict, env: dict, keys: list, recv: list[int], src: list[int], cols: list[int],
               ids: tuple[int, int], use_cache: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + one backward: ``(h[src] - h[recv]) . dLD(recv)/dh`` at ``cols`` for every key.

    Returns ``atp [K, n, len(cols)]`` and the LD of every row.
    """
    a, b = ids
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1, **_forward_kw(use_cache)):
        x = model.lm.model.layers[0].inputs[0][0]
        if not x.requires_grad:  # frozen parameters: make the graph start at the layer-0 input
            x.requires_grad_(True)
        states = []
        for key in keys:
            out = env[key].output
            states.append(out[0] if isinstance(out, tuple) else out)
        logits = model.lm.output.logits[:, -1]
        ld = logits[:, a].float() - logits[:, b].float()
        grads = torch.autograd.grad(ld[recv].sum(), states, allow_unused=True)
        est = []
        for h, g in zip(states, grads):
            if g is None:
                est.append(torch.zeros(len(recv), len(cols), device=ld.device))
            else:
                delta = (h[src][:, cols] - h[recv][:, cols]).float()
                est.append((delta * g[recv][:, cols].float()).sum(-1))
        atp = torch.stack(est).detach().clone().save()
        lds = ld.detach().clone().save()
    return atp, lds


# ---------------------------------------------------------------------------------------------
# planning and running


def inputs_full(enc: Encoded, seqs: list[int]) -> tuple[dict, int]:
    inp = enc.inputs(seqs)
    return inp, int(inp["input_ids"].shape[1])


def _compile(group_rows: list[tuple[int, int]], groups: list[list[Row]], width: int, env: dict,
             local: dict[tuple[int, int], int], last_only: bool) -> tuple[dict, list]:
    """Patch plan ``{key: (rows, src rows, cols)}`` and noise ops for one forward's rows."""
    patches: dict[tuple[int, str], tuple[list, list, list]] = {}
    noise_by: dict[tuple[int, Noise], list[int]] = {}
    for g, j in group_rows:
        row = groups[g][j]
        r = local[(g, j)]
        if row.noise is not None and not last_only:
            noise_by.setdefault((g, row.noise), []).append(r)
        if row.patch is None:
            continue
        s = local[(g, 0)]
        for layer in row.patch.layers:
            R, S, C = patches.setdefault((layer, row.patch.component), ([], [], []))
            for p in row.patch.positions:
                R.append(r)
                S.append(s)
                C.append(width + p)
    noise = [(rows, local[(g, 0)], width + nz.start, width + nz.end, nz.seed, nz.scale, nz.std)
             for (g, nz), rows in noise_by.items()]
    plan = {"envoys": {k: env[k] for k in patches}, "keys": forward_keys(patches), "patches": patches}
    return plan, noise


def _chunks(groups: list[list[Row]], max_rows: int) -> list[list[tuple[int, int]]]:
    """Pack rows into forwards of at most ``max_rows`` (more when one group's source + receiver need it).

    Every forward holding a patched row of a group also holds that group's source (row 0); the
    receiver (row 1) rides in the group's first forward.
    """
    out: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    have: set[int] = set()
    for g, rows in enumerate(groups):
        for j in range(len(rows)):
            if j == 0:
                continue
            need = 1 if g in have else 2
            if cur and len(cur) + need > max_rows:
                out.append(cur)
                cur, have = [], set()
                need = 2
            if g not in have:
                cur.append((g, 0))
                have.add(g)
            cur.append((g, j))
        if len(rows) == 1:
            if cur and len(cur) + 1 > max_rows:
                out.append(cur)
                cur, have = [], set()
            cur.append((g, 0))
            have.add(g)
    if cur:
        out.append(cur)
    return out


def kv_possible(model: Any, enc: Encoded, groups: list[list[Row]]) -> str | None:
    """Why the one-token KV path cannot run these groups (None when it can)."""
    if min(enc.lengths[r.seq] for g in groups for r in g) < 2:
        return "a prompt has fewer than 2 tokens"
    for g in groups:
        for r in g:
            if r.patch is not None and r.patch.positions != (-1,):
                return "positions other than the last one are patched"
            if r.noise is not None and r.noise.end == 0:
                return "the noise span includes the last token"
    window = getattr(model.config, "sliding_window", None)
    if window and max(enc.lengths) > int(window):
        return "prompts are longer than the sliding attention window"
    return None


def run_prefix(model: Any, enc: Encoded, groups: list[list[Row]]) -> Prefix:
    """One forward of every distinct (sequence, noise) of ``groups`` over all tokens but the last.

    A noised row gets its noise here (its clean row, ``(seq, None)``, must be among the rows: it
    is the one the noise std is measured on); the last token is never in a noise span on this path.
    """
    index: dict[tuple[int, Noise | None], int] = {}
    seqs, owners = [], []
    for g, rows in enumerate(groups):
        for row in rows:
            key = (row.seq, row.noise)
            if key not in index:
                index[key] = len(seqs)
                seqs.append(row.seq)
                owners.append((g, row.noise))
    inp, width = inputs_full(enc, seqs)
    inputs = {k: v[:, :-1] for k, v in inp.items()}
    noise, noised = [], []
    for i, (g, nz) in enumerate(owners):
        if nz is not None:
            clean = index[(seqs[i], None)]
            noise.append(([i], clean, width + nz.start, width + nz.end, nz.seed, nz.scale, nz.std))
            noised.append(g)
    plan = {"envoys": {}, "keys": [], "patches": {}}
    _, sigmas, cache = _trace_rows(model, inputs, plan, noise, (0, 0), use_cache=True, keep_cache=True)
    return Prefix(cache, index, width - 1, {g: float(s) for g, s in zip(noised, sigmas)})


def run_groups(model: Any, enc: Encoded, groups: list[list[Row]], ids: tuple[int, int], *,
               prefix: Prefix | None = None, max_tokens: int = 16384, columns: list[int] | None = None
               ) -> tuple[list[list[float]], dict[int, float]]:
    """Run every row of every group; return the LD of each row (``[group][row]``) and the noise std
    used per group.

    With ``prefix`` (from :func:`run_prefix` on the same groups) the rows run as one-token forwards
    over the cached prefix, lm_head computing ``columns`` only (:func:`.unembed.label_columns`, chosen where
    the model's modules are known: the same bits as whole); without, as full forwards. On out-of-memory the
    rows per forward are halved and the forward retried.
    """
    keys = {(la, r.patch.component) for g in groups for r in g if r.patch for la in r.patch.layers}
    env = envoys(model, sorted({k[0] for k in keys}), sorted({k[1] for k in keys}))
    sigma: dict[int, float] = dict(prefix.sigma) if prefix is not None else {}

    def forward(chunk: list[tuple[int, int]], local: dict, seqs: list[int]) -> torch.Tensor:
        if prefix is not None:
            rows_idx = [prefix.index[(groups[g][j].seq, groups[g][j].noise)] for g, j in chunk]
            inputs = inputs_token(enc, seqs, prefix.width, prefix.cache, rows_idx)
            plan, noise = _compile(chunk, groups, 1, env, local, last_only=True)
            use_cache, cols = None, columns
        else:
            inputs, w = inputs_full(enc, seqs)
            plan, noise = _compile(chunk, groups, w, env, local, last_only=False)
            use_cache, cols = False, None
        ld, sigmas, _ = _trace_rows(model, inputs, plan, noise, ids, use_cache, columns=cols)
        owner = {i: g for (g, j), i in local.items() if j == 0}
        for (_rows, src, *_), s in zip(noise, sigmas):
            sigma[owner[src]] = float(s)
        return ld

    return each_forward(enc, groups, max_tokens, prefix is not None, forward), sigma


def each_forward(enc: Encoded, groups: list[list[Row]], max_tokens: int, one_token: bool,
                 forward: Callable[[list[tuple[int, int]], dict, list[int]], torch.Tensor]) -> list[list[float]]:
    """The LD of every row of every group (``[group][row]``), the rows packed into forwards of at most
    ``max_tokens`` tokens (one-token rows: ``max_tokens // 4``, at most 4096), each group's source row beside
    its patched rows (:func:`_chunks`). ``forward(chunk, local, seqs)`` runs one forward of the rows ``chunk``
    (``(group, row)``; ``local``: their rows in the forward, ``seqs``: their sequences) and returns the LD per
    row. On out-of-memory the rows not yet run are packed again with half the rows per forward
    (:func:`~nnethics.models.errors.halving`), down to 2 (a source and one patched row)."""
    lds: list[list[float]] = [[float("nan")] * len(g) for g in groups]
    width = max(enc.lengths[r.seq] for g in groups for r in g)
    max_rows = max(2, min(4096, max_tokens // 4)) if one_token else max(2, max_tokens // width)
    state = {"todo": _chunks(groups, max_rows), "rows": max_rows}

    def rest(rows: int) -> None:
        if rows != state["rows"]:  # a retry: the failed forward and the rest, packed smaller
            state["todo"] = _chunks_subset(groups, [gj for c in state["todo"] for gj in c], rows)
            state["rows"] = rows
        while state["todo"]:
            chunk = state["todo"][0]
            ld = forward(chunk, {gj: i for i, gj in enumerate(chunk)}, [groups[g][j].seq for g, j in chunk])
            for (g, j), v in zip(chunk, ld.cpu().tolist()):
                lds[g][j] = v
            state["todo"].pop(0)

    halving(max_rows, rest, floor=2)
    return lds


def _chunks_subset(groups: list[list[Row]], chunk: list[tuple[int, int]], max_rows: int) -> list[list[tuple[int, int]]]:
    """Re-pack rows (``(group, row)``) into forwards of at most ``max_rows``, each group's source row in each."""
    sub: dict[int, list[int]] = {}
    for g, j in chunk:
        sub.setdefault(g, []).append(j)
    out = []
    for g, js in sub.items():
        rest = [j for j in js if j != 0]
        for i in range(0, max(1, len(rest)), max(1, max_rows - 1)):
            out.append([(g, 0)] + [(g, j) for j in rest[i:i + max_rows - 1]])
    return out


def attribution(model: Any, enc: Encoded, recv: list[int], src: list[int], keys: list[tuple[int, str]],
                positions: Sequence[int], ids: tuple[int, int], *,
                prefix: Prefix | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attribution patching for pairs ``(recv[i], src[i])`` (rows of ``enc``) at ``positions`` (from the end).

    One forward and one backward for all pairs: ``atp [K, n, P]`` estimates patched LD − receiver LD
    for every key of ``keys`` (in forward order) and position. With ``prefix`` (which must hold the
    clean rows of ``recv`` and ``src``) only the last position is attributed, as a one-token forward
    over the cached prefix: the last position's states do not reach earlier positions, so its
    gradient needs nothing else. Also returns the receiver and source LDs ``[n]``.
    """
    keys = forward_keys(keys)
    env = envoys(model, sorted({k[0] for k in keys}), sorted({k[1] for k in keys}))
    n = len(recv)
    seqs = list(recv) + list(src)
    if prefix is not None:
        if tuple(positions) != (-1,):
            raise ValueError("the KV path attributes the last position only")
        inputs = inputs_token(enc, seqs, prefix.width, prefix.cache, [prefix.index[(s, None)] for s in seqs])
        cols, use_cache = [0], None
    else:
        inputs, width = inputs_full(enc, seqs)
        cols, use_cache = [width + p for p in positions], False
    atp, lds = _trace_atp(model, inputs, {k: env[k] for k in keys}, keys, list(range(n)), list(range(n, 2 * n)),
                          cols, ids, use_cache)
    return atp.cpu(), lds[:n].cpu(), lds[n:].cpu()
