"""The steered rows (torch and nnsight load here).

A steered row is one prompt (a base or counterfactual row of a chunk) whose residual stream at the decision
position (the last token) after layer ``l`` is ``x = h + c * u``: ``h`` its own state there (from the chunk's
shared trace), ``u`` a unit direction and ``c`` the coefficient (alpha x the layer's scale x the side's sign).
Patching the resid at layer ``l`` is the same row with ``x`` the other prompt's state (:func:`chunk_pass`).

KV path (every prompt of the chunk has 2 tokens or more and the model's cache can serve one-token rows): the row
is one token over the prefix's key/value cache, and it starts at layer ``l + 1`` with ``x`` as the output of layers
``0..l`` (nnsight's ``skip``): nothing before the steered layer differs from the unsteered run, so nothing there
is computed again, as heads' layer blocks do. Full path (else): full forwards, layer ``l``'s output at the last
position set to ``x``.

Every row reads the full next-token distribution at the last position: the label logit difference, whether one of
the labels is the top-1 token and, against its reference row (the unsteered row of the same prompt, side and
layer, in the same forward), ``KL(unsteered || steered)``. Only those numbers come back from a remote model.

Rows travel as lists of ints and floats (``seq``, ``src``, ``k``, ``layer``, ``u``, ``coef``, ``ref``): the states
and unit directions travel once per chunk and ``x`` is made where the model runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ...models.errors import halving
from ..patching.engine import Row, inputs_full, run_prefix
from ..prefix_cache import Prefix, SharedPrefixCache, inputs_token

FIELDS = ("seq", "src", "k", "layer", "u", "coef", "ref")



FIELDS = ("seq", "src", "k", "layer", "u", "coef", "ref")


def empty_rows() -> dict[str, list]:
    return {f: [] for f in FIELDS}


def add_row(rows: dict[str, list], seq: int, src: int, k: int, layer: int, u: int = -1, coef: float = 0.0,
            ref: int = -1) -> int:
    """Add one row and return its index: input row ``seq`` of the chunk, ``x = states[src, k] + coef * units[u]``
    (u = -1: no direction) after layer ``layer``; ``ref``: the index in ``rows`` of the row whose next-token
    distribution its KL is taken against (-1: none; that row runs in the same forward, at the same layer)."""
    for f, v in zip(FIELDS, (seq, src, k, layer, u, coef, ref)):
        rows[f].append(v)
    return len(rows["seq"]) - 1


def _readout(model: Any, ids: tuple[int, int], ref: list[int]) -> dict:
    """Inside a trace: LD, label-is-top-1 and, for the rows with a reference row in the forward (``ref[r]``, its
    index here; -1: none, KL 0), KL(reference || row) at the last position."""
    import nnsight
    import torch

    a, b = ids
    logits = model.lm.output.logits[:, -1].float()  # after the model's own final soft-cap, if any
    top = logits.argmax(-1)
    out = {"ld": logits[:, a] - logits[:, b], "top": (top == a) | (top == b)}
    if max(ref) >= 0:
        # KL(q || p) = sum q log q - sum q logits_p + logsumexp(logits_p), q the reference's distribution: one
        # product of the rows' logits with the forward's few reference distributions instead of a rows x
        # vocabulary gather (measured: a fifth of a row's readout)
        heads = sorted({r for r in ref if r >= 0})
        col = {r: i for i, r in enumerate(heads)}
        logq = logits[heads].log_softmax(-1)
        q = logq.exp()
        cross = logits @ q.T  # [rows, references]
        pick = torch.tensor([col[r] if r >= 0 else 0 for r in ref], device=logits.device)
        rows = torch.arange(len(ref), device=logits.device)
        own = (q * logq).sum(-1)[pick]
        lse = torch.logsumexp(logits, -1)
        out["kl"] = (own - cross[rows, pick] + lse).clamp_min(0)
    return nnsight.save(out)


def _trace_rows(model: Any, inputs: dict, start: int, by_layer: dict, x: Any, ids: tuple[int, int],
                ref: list[int], use_cache: bool | None) -> dict:
    """One forward of rows. ``start > 0`` (one-token rows over a prefix cache, all steered after layer ``start -
    1``): layers ``0..start-1`` are skipped, their output being ``x``. ``by_layer[l]``: the rows whose layer-``l``
    output at the last position is set to theirs of ``x``."""
    import torch

    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        if start > 0:
            xs = x[:, None]
            for j in range(start):
                model.lm.model.layers[j].skip(xs)
        for layer in sorted(by_layer):
            out = model.lm.model.layers[layer].output
            h = out[0] if isinstance(out, tuple) else out
            rows = by_layer[layer]
            h[torch.tensor(rows, device=h.device), -1] = x[rows].to(device=h.device, dtype=h.dtype)
        got = _readout(model, ids, ref)
    return got


def _units(rows: dict[str, list]) -> list[list[int]]:
    """Rows that must share a forward: a reference row and the rows whose KL is taken against it."""
    units: dict[int, list[int]] = {}
    for r, ref in enumerate(rows["ref"]):
        units.setdefault(r if ref < 0 else ref, []).append(r)
    return sorted(units.values(), key=lambda u: (rows["layer"][u[0]], u[0]))


def _forwards(rows: dict[str, list], skip: bool, size: int) -> list[list[int]]:
    """The rows in forwards of at most ``size`` (a reference row and its rows are never split; with ``skip`` a
    forward holds one layer's rows)."""
    out: list[list[int]] = []
    for unit in _units(rows):
        same = bool(out) and (not skip or rows["layer"][out[-1][0]] == rows["layer"][unit[0]])
        if same and len(out[-1]) + len(unit) <= size:
            out[-1].extend(unit)
        else:
            out.append(list(unit))
    return out


def _forward(model: Any, enc: Any, prefix: Prefix | None, ids: tuple[int, int], states: Any, table: Any,
             rows: dict[str, list], chunk: list[int], dtype: Any, skip: bool) -> dict:
    """One forward of the rows ``chunk``: ``x = states[src, k] + coef * table[u]`` made here (where the model runs)."""
    import torch

    col = {f: [rows[f][r] for r in chunk] for f in FIELDS}
    src = torch.tensor(col["src"], device=states.device)
    k = torch.tensor(col["k"], device=states.device)
    u = torch.tensor(col["u"], device=table.device)
    coef = torch.tensor(col["coef"], dtype=states.dtype, device=states.device)
    x = (states[src, k] + coef[:, None] * table[u]).to(dtype)
    local = {r: i for i, r in enumerate(chunk)}
    ref = [local[q] if q >= 0 else -1 for q in col["ref"]]
    by_layer: dict[int, list[int]] = {}
    if not (skip and prefix is not None):
        for j, layer in enumerate(col["layer"]):
            by_layer.setdefault(layer, []).append(j)
    if prefix is None:
        return _trace_rows(model, inputs_full(enc, col["seq"])[0], 0, by_layer, x, ids, ref, False)
    inputs = inputs_token(enc, col["seq"], prefix.width, prefix.cache, [prefix.index[(s, None)] for s in col["seq"]])
    return _trace_rows(model, inputs, col["layer"][0] + 1 if skip else 0, by_layer, x, ids, ref, None)


def run_rows(model: Any, enc: Any, prefix: Prefix | None, ids: tuple[int, int], states: Any, units: Any,
             rows: dict[str, list], max_rows: int, dtype: Any, skip: bool = True) -> dict:
    """Every row of ``rows`` (see the module docstring) over ``prefix`` (None: full forwards), in forwards of at
    most ``max_rows`` rows, halved on out-of-memory. ``skip`` (KV path): a forward holds one layer's rows and starts
    after that layer; else its rows set their layer's output and every layer runs (one trace for the rows of many
    layers, where each layer has few). ``states [seqs, K, d]``, ``units [U, d]`` (float32); ``dtype``: the residual
    stream's. Returns ``{"ld", "top", "kl"}`` per row (CPU; kl NaN where a row has no reference)."""
    import torch

    R = len(rows["seq"])
    zero = torch.zeros(1, units.shape[-1], dtype=units.dtype, device=units.device)
    table = torch.cat([units, zero])  # u = -1: the zero row
    out = {"ld": torch.full((R,), float("nan")), "top": torch.zeros(R, dtype=torch.bool),
           "kl": torch.full((R,), float("nan"))}
    state: dict = {"todo": None, "size": None}

    def loop(size: int) -> None:
        if state["size"] != size:  # the first pass, or a retry: the failed forward and the rest, packed smaller
            left = sorted({r for c in state["todo"] for r in c}) if state["todo"] is not None else list(range(R))
            where = {r: i for i, r in enumerate(left)}
            sub = {f: [rows[f][r] for r in left] for f in FIELDS}
            sub["ref"] = [where[q] if q >= 0 else -1 for q in sub["ref"]]
            state["todo"] = [[left[i] for i in c] for c in _forwards(sub, skip and prefix is not None, size)]
            state["size"] = size
        while state["todo"]:
            chunk = state["todo"][0]
            got = _forward(model, enc, prefix, ids, states, table, rows, chunk, dtype, skip)
            idx = torch.tensor(chunk)
            for key in ("ld", "top", "kl"):
                if key in got:
                    out[key][idx] = got[key].detach().to("cpu", out[key].dtype)
            state["todo"].pop(0)

    if R:
        halving(max_rows, loop)
        out["kl"][torch.tensor([q < 0 for q in rows["ref"]], dtype=torch.bool)] = float("nan")
    return out


def own_prefix(model: Any, enc: Any, n_seqs: int) -> Prefix:
    """A prefix forward of the chunk's ``n_seqs`` rows (the complete pass, and a model whose shared trace's cache
    cannot be cut)."""
    return run_prefix(model, enc, [[Row(s)] for s in range(n_seqs)])


def max_rows(max_tokens: int, kv: bool, width: int) -> int:
    """Rows per forward: one-token rows carry a full next-token distribution each (a sixteenth of ``max_tokens``:
    with their log-probabilities, three ``rows x vocabulary`` float32 tensors); full rows ``max_tokens // width``."""
    return max(1, max_tokens // 16 if kv else max_tokens // max(1, width))


def chunk_pass(model: Any, batch: Any, job: dict, states: Any, prefix: Prefix | None) -> dict:
    """In the chunk's session, after its shared trace: the base rows with the counterfactual's state after each
    layer (resid patching at the decision position: ``ld [n * L]``, pair-major) and every layer's state at an
    appended answer token (:func:`answer_states`: ``answers [2n, 2, L, d]``), over ``prefix`` (the shared trace's
    cache; on the KV path without one, a prefix forward of this analysis; full forwards where the KV path cannot
    run). ``states [2n, L, d]``: the chunk's, from the shared trace; only the layers ``job["keep"]`` of them and of
    the answer-token states come back (``--layers``, or every layer when the crossing is to choose them)."""
    n, L = batch.n, model.n_layers
    kv = job["cache"]
    if kv and prefix is None:
        prefix = own_prefix(model, batch.encoded, 2 * n)
    prefix = prefix if kv else None
    rows = empty_rows()
    for i in range(n):
        for layer in range(L):
            add_row(rows, i, n + i, layer, layer)
    units = torch.zeros(1, states.shape[-1], dtype=torch.float32, device=states.device)
    size = max_rows(job["max_tokens"], kv, int(batch.encoded.input_ids.shape[1]))
    ids = [batch.label_ids[0], batch.label_ids[1]]
    got = run_rows(model, batch.encoded, prefix, (ids[0], ids[1]), states.float(), units, rows, size, states.dtype,
                   skip=False)  # a row per pair and layer: one trace for every layer, not one per layer
    keep = job["keep"]
    answers = answer_states(model, batch.encoded, prefix, ids, size, keep)
    return {"ld": got["ld"], "answers": answers, "states": states[:, keep].clone()}



def grid_session(model: Any, enc: Any, kv: bool, ids: tuple[int, int], states: Any, units: Any, rows: dict,
                 size: int, dtype: Any) -> dict:
    """The complete pass of one chunk, in one session (one request remotely): its prefix (KV path), then every row,
    each unsteered row in the forward of the steered rows whose KL is taken against it."""
    prefix = own_prefix(model, enc, int(enc.input_ids.shape[0])) if kv else None
    return run_rows(model, enc, prefix, ids, states, units, rows, size, dtype)


def _answer_inputs(enc: Any, seqs: list[int], answers: list[int], prefix: Prefix | None) -> dict:
    """Rows ``seqs`` followed by the answer tokens ``answers``: the last prompt token and the answer as two tokens
    over ``prefix`` (the prompt's cache but its last token), or the whole prompt and the answer (None)."""
    import torch

    s = torch.tensor(seqs, device=enc.input_ids.device)
    ans = torch.tensor(answers, device=enc.input_ids.device)[:, None]
    one = torch.ones_like(ans)
    mask = enc.attention_mask[s]
    pos = enc.position_ids[s]
    if prefix is None:
        return {"input_ids": torch.cat([enc.input_ids[s], ans], 1), "attention_mask": torch.cat([mask, one], 1),
                "position_ids": torch.cat([pos, pos[:, -1:] + 1], 1)}
    rows = torch.tensor([prefix.index[(q, None)] for q in seqs], dtype=torch.long, device=enc.input_ids.device)
    return {"input_ids": torch.cat([enc.input_ids[s][:, -1:], ans], 1),
            "attention_mask": torch.cat([mask[:, -(prefix.width + 1):], one], 1),
            "position_ids": torch.cat([pos[:, -1:], pos[:, -1:] + 1], 1),
            "cache": SharedPrefixCache(prefix.cache, rows)}


def answer_states(model: Any, enc: Any, prefix: Prefix | None, label_ids: list[int], max_rows: int,
                  layers: list[int] | None = None) -> Any:
    """The output of ``layers`` (None: every layer) at an appended answer token, ``[seqs, 2, layers, d]``: each row of
    ``enc`` followed by the
    token of label 1 (index 0) and of label 2 (index 1), two tokens over ``prefix`` (None: full forwards). The
    states contrastive activation addition contrasts (Rimsky et al. 2024: the answer letter's position)."""
    import nnsight
    import torch

    n_seqs = int(enc.input_ids.shape[0])
    jobs = [(q, a) for q in range(n_seqs) for a in range(2)]
    out: list = [None] * len(jobs)
    state = {"next": 0}

    def loop(size: int) -> None:
        while state["next"] < len(jobs):
            lo = state["next"]
            part = jobs[lo:lo + size]
            inputs = _answer_inputs(enc, [q for q, _ in part], [label_ids[a] for _, a in part], prefix)
            kw = {} if prefix is not None else {"use_cache": False}
            with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
                outs = [model.lm.model.layers[i].output for i in (range(model.n_layers) if layers is None else layers)]
                hs = nnsight.save(torch.stack([(o[0] if isinstance(o, tuple) else o)[:, -1] for o in outs], dim=1))
            for j in range(len(part)):
                out[lo + j] = hs[j]
            state["next"] = lo + len(part)

    halving(max_rows, loop)
    return torch.stack(out).reshape(n_seqs, 2, *out[0].shape)
