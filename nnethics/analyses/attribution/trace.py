"""Direct logit attribution inside the trace: what runs next to the weights (locally or on NDIF).

:func:`collect` runs one trace over a batch and projects every part of the residual stream at the last
position (embeddings, each layer's attention and MLP, each head through its ``o_proj``, MoE experts)
onto the label directions there, so only :class:`Projections` (numbers per row) come back;
:func:`contributions` turns them into per-label contributions (float64). :func:`readout` returns the
label directions themselves, for projecting activations of your own; :func:`wire_bytes` counts what a
remote run brings back. The maths is in :mod:`nnethics.analyses.attribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
from torch import Tensor

from ...models.adapters import final_norm_eps, get_path
from ..unembed import logits_of

F64 = torch.float64


@dataclass
class Readout:
    """The linear readout of the label logits from the final residual, float64 on CPU.

    ``direction [O, d]``: W_U rows ⊙ final-norm gain (centred for LayerNorm); ``const [O]``: norm
    bias + lm_head bias; ``head_dir [L, O, H·dh]``: the direction (⊙ Gemma's post-attention gain)
    pulled back through each o_proj; ``attn_bias [L, O]``: the o_proj bias on that direction.
    """

    direction: Tensor
    const: Tensor
    head_dir: Tensor
    attn_bias: Tensor
    eps: float
    centre: bool
    n_heads: int
    post_eps: tuple[float, ...] | None  # Gemma: each layer's post-attention norm epsilon


@dataclass
class Projections:
    """What the trace brings back: every part already dotted with the label directions (rows first).

    Per row, unscaled (multiply by ``scale``): ``embed [N, O]``, ``layers [N, L, 2, O]`` (attn, mlp; every
    layer, for the sum). For the ``kept`` layers only: ``heads [N, K, H, O']`` (O' = O, or 1 for the
    label-1-minus-label-2 direction; float32, float16 for 16-bit models), ``post [N, K]`` (Gemma: the
    frozen post-attention norm scale, applies to heads and o_proj bias), ``experts [N, K, k, O]`` (routing
    weight applied) with ``expert_idx [N, K, k]``. Per row: ``scale [N]`` (frozen final-norm scale),
    ``pre_logits``/``logits [N, O]`` (before / after the soft-cap). Per chunk: ``const [O]`` (norm bias +
    lm_head bias), ``attn_bias [K, O]`` (o_proj bias on the direction, Gemma's post gain folded in).
    """

    scale: Tensor
    embed: Tensor
    layers: Tensor
    const: Tensor
    attn_bias: Tensor
    pre_logits: Tensor
    logits: Tensor
    kept: tuple[int, ...]
    heads: Tensor | None = None
    post: Tensor | None = None
    experts: Tensor | None = None
    expert_idx: Tensor | None = None

    def per_row_bytes(self) -> float:
        """Bytes of the per-row results divided by the rows (what :func:`wire_bytes` predicts)."""
        per_row = [self.scale, self.embed, self.layers, self.pre_logits, self.logits, self.heads, self.post,
                   self.experts, self.expert_idx]
        return sum(t.numel() * t.element_size() for t in per_row if t is not None) / self.scale.shape[0]


def wire_bytes(n_layers: int, n_heads: int, n_options: int = 2, kept: int | None = None, heads: bool = True,
               head_options: bool = True, half: bool = False, top_k: int = 0, post: bool = False) -> dict[str, int]:
    """Bytes per prompt (row) of each result the attribution trace brings back, before compression.

    ``kept``: layers stored (default all); ``half``: a 16-bit model (heads travel in float16); ``top_k``:
    MoE experts per token; ``post``: Gemma's post-attention norm. Everything else is float64. The
    per-chunk ``const``/``attn_bias`` and the container's overhead are not included. For an 80-layer,
    64-head bfloat16 model with difference-only heads: 12,856 bytes; with ``heads=False``: 2,616.
    """
    kept = n_layers if kept is None else kept
    out = {"scale": 8, "embed": 8 * n_options, "layers": 8 * n_layers * 2 * n_options,
           "pre_logits": 8 * n_options, "logits": 8 * n_options}
    if heads:
        out["heads"] = kept * n_heads * (n_options if head_options else 1) * (2 if half else 4)
    if post:
        out["post"] = 8 * kept
    if top_k:
        out["experts"] = 8 * kept * top_k * n_options
        out["expert_idx"] = 4 * kept * top_k
    return out


def is_half(model: Any) -> bool:
    """Whether the model computes in a 16-bit dtype (heads then travel in float16)."""
    return str(getattr(model, "dtype", "")).endswith("16")  # bfloat16, float16, 4bit/bfloat16


def dense_weight(proj: Any) -> Tensor:
    """A linear layer's weight as a dense ``[out, in]`` tensor (conv1d: ``[in, out]``), detached.

    ``proj`` is the layer's envoy (inside a trace) or the module. bitsandbytes keeps the weight packed:
    a 4-bit layer (``Params4bit``) is run on the identity, which gives exactly the weights its own kernel
    multiplies by whatever packing it uses (the CPU kernel repacks after a first forward); an int8 layer
    (``Int8Params``) is its int8 weight times its row scales (``SCB``, on the weight or the layer's
    ``state``). Plain Python and torch, so it ships to a server by value.
    """
    weight = proj.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        n_in = int(weight.quant_state.shape[-1])
        dtype = getattr(proj, "compute_dtype", None) or torch.float32
        eye = torch.eye(n_in, dtype=dtype, device=weight.device)
        wt = proj(eye)  # [in, out]: W^T + bias
        bias = getattr(proj, "bias", None)
        if bias is not None:
            wt = wt - bias.to(wt.dtype)
        return wt.T.detach().float()
    if kind == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(proj, "state", None), "SCB", None)
        if scb is None:
            raise ValueError("an int8 weight without row scales (SCB): run one forward first")
        return (weight.data.float() * (scb.float()[:, None] / 127.0)).detach()
    return weight.detach()


def label_directions(head: Any, norm: Any, ids: list[int], offset: bool, centre: bool) -> tuple[Tensor, Tensor]:
    """``direction [O, d]``: the unembedding rows of ``ids`` times the final norm's gain (``1 + w`` for
    Gemma's offset norm; centred for LayerNorm, which equals centring every part), and ``const [O]``: the
    norm's bias and the lm_head bias on them. float64, on the weights' device. Called inside traces with
    the ``lm_head`` and final-norm envoys."""
    u = head.weight[ids].detach().double()
    nw = getattr(norm, "weight", None)
    gain = u.new_ones(u.shape[-1]) if nw is None else nw.detach().double().to(u.device)
    direction = u * (gain + 1.0 if offset else gain)
    if centre:
        direction = direction - direction.mean(-1, keepdim=True)
    const = u.new_zeros(len(ids))
    nb, hb = getattr(norm, "bias", None), getattr(head, "bias", None)
    if nb is not None:
        const = const + u @ nb.detach().double().to(u.device)
    if hb is not None:
        const = const + hb[ids].detach().double().to(u.device)
    return direction, const


def o_proj_terms(proj: Any, post_norm: Any, direction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For one layer's ``o_proj`` envoy: its dense weight ``w`` (bitsandbytes dequantized), the direction
    as seen at its output ``d [O, d]`` (times Gemma's post-attention gain when ``post_norm`` is given) and
    the o_proj bias on it ``[O]`` (zeros without a bias). Called inside traces."""
    w = dense_weight(proj)
    d = direction.to(w.device)
    if post_norm is not None:
        d = d * (post_norm.weight.detach().double().to(w.device) + 1.0)
    b = getattr(proj, "bias", None)
    return w, d, (d @ b.detach().double()) if b is not None else d.new_zeros(d.shape[0])


def head_terms(proj: Any, w: Tensor, direction: Tensor, n_heads: int, conv1d: bool, half: bool) -> Tensor:
    """For one layer's ``o_proj`` envoy (inside a trace) with its dense weight ``w``: each head's o_proj
    input at the last position dotted with ``direction [O', d]`` pulled back through o_proj:
    ``[N, H, O']`` on the CPU, float16 for a 16-bit model (``half``) else float32."""
    pulled = direction @ (w.double().T if conv1d else w.double())  # [O', H*dh]
    z = proj.input[:, -1].detach().double()
    n_rows = z.shape[0]
    h = torch.einsum("nhk,ohk->nho", z.reshape(n_rows, n_heads, -1), pulled.reshape(pulled.shape[0], n_heads, -1))
    return (h.half() if half else h.float()).cpu()


def expert_terms(block: Any, n_rows: int, direction: Tensor) -> tuple[Tensor, Tensor]:
    """For one MoE block's envoy (inside a trace): every expert recomputed at the last position from the
    fused weights, the routed top-k kept and weighted, projected on ``direction``: ``[N, k, O]`` float64 and
    the routed expert ids ``[N, k]`` int32, both on the CPU."""
    hid = block.input[:, -1].detach()
    gate_out = block.gate.output
    k = gate_out[1].shape[-1]
    weight = gate_out[1].reshape(n_rows, -1, k)[:, -1].detach()
    idx = gate_out[2].reshape(n_rows, -1, k)[:, -1].detach()
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    gate, up = torch.einsum("eod,nd->neo", gate_up, hid).chunk(2, dim=-1)
    out = torch.einsum("edi,nei->ned", down, block.experts.act_fn(gate) * up)
    routed = out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1])).double() * weight.double()[..., None]
    return (routed.to(direction.device) @ direction.T).cpu(), idx.to(torch.int32).cpu()


def readout(model: Any, label_ids: Sequence[int]) -> Readout:
    """The readout weights for ``label_ids``, computed from the envoys' weights in one early-stopped trace.

    :func:`direct_logit_attribution` does not need it (its trace computes the same directions next to
    the weights); use it to project activations of your own. Only the small projections come back
    (the trace runs where the handle runs traces). The nnethics
    helpers the body calls (:func:`label_directions`, :func:`o_proj_terms`) ship by value (``nnsight.register``).
    """
    lm, ad = model.lm, model.adapter
    L, ids = model.n_layers, [int(i) for i in label_ids]
    head, norm = lm.lm_head, lm.model.norm
    o_projs = [model.o_proj(i) for i in range(L)]
    post = [get_path(model.layer(i), ad.attn_post_norm) for i in range(L)] if ad.attn_post_norm else None
    offset, centre, conv1d = ad.norm == "rms_offset", ad.norm == "layer", ad.o_proj_conv1d
    tiny = {"input_ids": torch.tensor([ids[:1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with torch.no_grad(), model.trace(tiny) as tracer:
        direction, const = label_directions(head, norm, ids, offset, centre)
        got = nnsight.save({"direction": direction.cpu(), "const": const.cpu(), "head_dir": [], "attn_bias": []})
        for i in range(L):
            w, d_i, bias = o_proj_terms(o_projs[i], post[i] if post else None, direction)
            got["head_dir"].append((d_i @ (w.double().T if conv1d else w.double())).cpu())  # [O, H*dh]
            got["attn_bias"].append(bias.cpu())
        tracer.stop()
    post_eps = tuple(final_norm_eps(ad, p._module) for p in post) if post else None
    return Readout(direction=got["direction"], const=got["const"], head_dir=torch.stack(got["head_dir"]),
                   attn_bias=torch.stack(got["attn_bias"]), eps=final_norm_eps(ad, norm._module), centre=centre,
                   n_heads=model.n_heads, post_eps=post_eps)


def collect(model: Any, inputs: dict[str, Tensor], label_ids: Sequence[int], heads: bool = True,
            kept: Sequence[int] | None = None, per_option: bool = True) -> Projections:
    """One trace over every row that projects inside the trace and brings back only :class:`Projections`.

    The body (:func:`project`) refers only to envoys and Python numbers and lists, detaches what it reads
    (servers may run with autograd on) and returns fresh tensors (no views of large storage), so it is the same
    code locally, in nnsight's dry run of the remote path and on NDIF.
    """
    n_rows = int(inputs["input_ids"].shape[0])
    with torch.no_grad(), model.trace(inputs):
        got = project(model, n_rows, label_ids, heads, kept, per_option, adhoc_logits=False, columns=None)
    return Projections(**got)


def read_projections(model: Any, batch: Any, job: dict) -> dict:
    """:func:`project` inside the chunk's shared trace (:mod:`nnethics.engine.trace`), whose forward keeps the last
    position's logits only: the label logits are unembedded from the full final-norm output here, as the plain
    forward of :func:`collect` does, so they keep its bits (on ``job["columns"]`` only: see :mod:`.unembed`)."""
    return project(model, 2 * batch.n, batch.label_ids, job["heads"], job["kept"], job["per_option"],
                   adhoc_logits=True, columns=job.get("columns"))


def _softcapped(logits: Tensor, cap: float | None) -> Tensor:
    """The model's final-logit soft-cap (Gemma 2), with its own operations, so the same bits come out."""
    if not cap:
        return logits
    return torch.tanh(logits / cap) * cap


def project(model: Any, n_rows: int, label_ids: Sequence[int], heads: bool, kept: Sequence[int] | None,
            per_option: bool, adhoc_logits: bool, columns: list[int] | None = None,
            tap: Callable[[int, str], None] | None = None) -> dict:
    """Inside a trace over ``n_rows`` rows: every part at the last position on the label directions (see
    :func:`collect`). Reads in forward order. ``adhoc_logits``: the label logits from an unembedding of the
    whole final-norm output after the forward (for a forward run with ``logits_to_keep=1``), on the lm_head
    ``columns`` only (:func:`.unembed.label_columns`; None: every one). ``tap(layer, where)``: the caller's reads,
    in forward order: ``(-1, "input")`` before the layer-0 input, per layer ``"z"`` before o_proj's input,
    ``"attn"`` before the attention output and ``"layer"`` after the MLP output."""
    lm, ad, tap = model.lm, model.adapter, tap or _no_tap
    L, H, ids = model.n_layers, model.n_heads, [int(i) for i in label_ids]
    keep = list(range(L)) if kept is None else [int(i) for i in kept]
    head, norm, first_layer = lm.lm_head, lm.model.norm, model.layer(0)
    o_projs, attn_outs, mlp_outs = ([get(i) for i in range(L)] for get in (model.o_proj, model.attn_out, model.mlp_out))
    post_norms = [get_path(model.layer(i), ad.attn_post_norm) for i in range(L)] if ad.attn_post_norm else []
    post_eps, eps = [final_norm_eps(ad, p._module) for p in post_norms], final_norm_eps(ad, norm._module)
    post, moe, attn_tuple, conv1d = bool(post_norms), ad.moe, ad.attn_out_is_tuple, ad.o_proj_conv1d
    offset, centre, half = ad.norm == "rms_offset", ad.norm == "layer", is_half(model)
    # The label directions, from the weights where they live: W_U rows ⊙ final-norm gain.
    direction, const = label_directions(head, norm, ids, offset, centre)
    tap(-1, "input")
    x0 = first_layer.inputs[0][0][:, -1].detach().double()
    embed = (x0.to(direction.device) @ direction.T).cpu()
    parts, head_parts, biases, post_parts, expert_parts, expert_idx = [], [], [], [], [], []
    for i in range(L):
        tap(i, "z")
        if i in keep:
            proj = o_projs[i]
            # Gemma: heads pass through the post-attention norm's gain (its scale frozen below)
            w, d_i, bias = o_proj_terms(proj, post_norms[i] if post else None, direction)
            biases.append(bias.cpu())
            if heads:
                head_parts.append(head_terms(proj, w, d_i if per_option else d_i[:1] - d_i[1:2], H, conv1d, half))
            if post:
                o = proj.output[:, -1].detach().double()
                post_parts.append(torch.rsqrt(o.pow(2).mean(-1) + post_eps[i]).cpu())
        tap(i, "attn")
        a = attn_outs[i].output
        a = (a[0] if attn_tuple else a)[:, -1].detach().double()
        a = (a.to(direction.device) @ direction.T).cpu()
        if moe and i in keep:
            routed, idx = expert_terms(mlp_outs[i], n_rows, direction)
            expert_parts.append(routed)
            expert_idx.append(idx)
        m = mlp_outs[i].output
        m = (m[0] if isinstance(m, tuple) else m)[:, -1].detach().double()
        parts.append(torch.stack([a, (m.to(direction.device) @ direction.T).cpu()], dim=1))  # [N, 2, O]
        tap(i, "layer")
    x = norm.input[:, -1].detach().double()
    var = x.var(-1, unbiased=False) if centre else x.pow(2).mean(-1)
    pre_logits, logits = _label_logits(model, ids, adhoc_logits, columns)
    return nnsight.save({
        "scale": torch.rsqrt(var + eps).cpu(), "embed": embed, "layers": torch.stack(parts, dim=1),
        "const": const.cpu(), "attn_bias": torch.stack(biases),
        "heads": torch.stack(head_parts, dim=1) if head_parts else None,
        "post": torch.stack(post_parts, dim=1) if post_parts else None,
        "experts": torch.stack(expert_parts, dim=1) if expert_parts else None,
        "expert_idx": torch.stack(expert_idx, dim=1) if expert_idx else None,
        "pre_logits": pre_logits, "logits": logits.detach().double().cpu(), "kept": tuple(keep),
    })


def _no_tap(layer: int, where: str) -> None:
    """:func:`project`'s ``tap`` when the caller reads nothing else."""


def _label_logits(model: Any, ids: list[int], adhoc_logits: bool, columns: list[int] | None) -> tuple[Tensor, Tensor]:
    """Inside a trace, :func:`project`'s last reads: the label logits before the final-logit soft-cap (float64, CPU)
    and after it, at the last position (``adhoc_logits``, ``columns``: see there)."""
    head, norm = model.lm.lm_head, model.lm.model.norm
    cap = getattr(model.config, "final_logit_softcapping", None)
    if adhoc_logits:  # the whole sequence unembedded as a forward without logits_to_keep does, label columns only
        normed = norm.output.detach()
        model.lm.output.logits  # noqa: B018 - wait for the end of the forward: the call below must not run inside it
        full, at = (head(normed), ids) if columns is None else (logits_of(head, normed, columns), range(len(ids)))
        return full[:, -1, list(at)].detach().double().cpu(), _softcapped(full, cap)[:, -1, list(at)]
    return head.output[:, -1, ids].detach().double().cpu(), model.lm.output.logits[:, -1, ids]


def contributions(p: Projections, n_experts: int | None = None) -> dict[str, Tensor]:
    """Per-row contributions to each label logit, float64, rows first.

    Returns ``scale [N]``, ``embed``/``const``/``softcap``/``logits``/``pre_logits [N, O]``, ``layers
    [N, L, 2, O]`` (attn, mlp; every layer), and for the kept layers ``attn_bias [N, K, O]``, ``heads [N, K,
    H, O']`` and ``experts [N, K, E, O]`` when the projections carry them.
    """
    s = p.scale.to(F64)

    def scaled(t: Tensor) -> Tensor:
        return t.to(F64) * s.view(-1, *([1] * (t.dim() - 1)))

    n, K = s.shape[0], len(p.kept)
    row = (torch.ones(n, K, dtype=F64) if p.post is None else p.post.to(F64)) * s[:, None]  # [N, K]
    pre, logits = p.pre_logits.to(F64), p.logits.to(F64)
    res = {
        "scale": s,
        "embed": scaled(p.embed),
        "layers": scaled(p.layers),
        "attn_bias": p.attn_bias.to(F64)[None] * row[..., None],
        "const": p.const.to(F64).expand(n, -1),
        "softcap": logits - pre,
        "logits": logits,
        "pre_logits": pre,
    }
    if p.heads is not None:
        res["heads"] = p.heads.to(F64) * row[..., None, None]
    if p.experts is not None:
        ex = scaled(p.experts)  # [N, K, k, O]
        E = n_experts or int(p.expert_idx.max()) + 1
        full = torch.zeros(n, K, E, ex.shape[-1], dtype=F64)
        res["experts"] = full.scatter_add_(2, p.expert_idx.long()[..., None].expand_as(ex), ex)
    return res
