"""Logit lens and tuned lens at the decision position, for every layer, in one batched trace per lens.

The logit lens decodes each layer's output with the model's own final norm and unembedding (and the
Gemma-2 soft-cap); a tuned lens (:mod:`nnethics.analyses.lens.lenses`) first applies its per-layer translator. Inside the
trace the decoding is an ad-hoc call of the model's ``norm`` and ``lm_head`` on the stacked residuals of
all layers, and only small results (top-k, label logits, KL) come back, so the same code runs on NDIF.
Translators are never shipped into a trace (a 70B model's are 10.7 GB): the residuals come back, are
translated locally, and a second trace decodes them. That round trip (:func:`residual_round_trip`,
2.6 MB per pair each way for a 70B model) is why a remote run uses a tuned lens only when asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ...prompts import SIDES, PromptPair
from ..base import (
    Analysis,
    Function,
    OptionError,
    Prepared,
    SharedReads,
    chat_field,
    check_values,
    labels_field,
    option,
    register,
)
from ..common import encode_pairs
from . import tables as export_tables
from .hub_spec import SYNTAX, is_hub_spec, split_hub_spec
from .variables import VARIABLES

if TYPE_CHECKING:  # loaded when a lens runs: declaring the analysis needs no torch
    import torch

    from .lenses import TunedLens

CROSSING_DOC = ("first layer from which the finally chosen label's logit stays strictly above every other label's, "
                "up to the last layer; -1 if it is not strictly ahead even at the last layer (a tie)")


@dataclass(frozen=True)
class LensOptions:
    """Options of the lens analysis. ``tuned_lens`` is resolved once per run (:func:`prepare`) and the loaded lens
    passed to :func:`logit_lens`; called directly, :func:`logit_lens` takes the loaded lens as ``tuned_lens=``."""

    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    k: int = option(10, "Top tokens kept per layer.", min=1)
    tuned_lens: str | None = option(
        None, "Tuned lens folder, or hub:ORG/REPO[/subfolder][@revision] for a pretrained one in the hub cache "
        "(tuned-lens format; spaces/ or datasets/ before ORG for those repos); 'none' for the logit lens only "
        "(default: the model's cached lens, if any).", metavar="FOLDER|hub:ORG/REPO/SUB|none")

    def __post_init__(self) -> None:
        check_values(self)
        if is_hub_spec(self.tuned_lens) and split_hub_spec(self.tuned_lens) is None:  # before a model loads
            raise OptionError("tuned_lens", f"{self.tuned_lens}: {SYNTAX}")


def lens_readout(model: Any, inputs: dict, option_ids: Sequence[int], k: int = 10, states: torch.Tensor | None = None,
                 keep_states: bool = False) -> dict[str, torch.Tensor]:
    """Decode every layer at the last position of each row, in one trace.

    With ``states`` ``[N, L, d]`` (already translated by a tuned lens) those are decoded instead of the
    layer outputs, and the forward is stopped early. Returns CPU tensors: ``top_logit``, ``top_id``,
    ``top_prob`` ``[N, L, k]``, ``option_logit``, ``option_prob`` ``[N, L, n_options]``, ``kl`` ``[N, L]``
    (KL of the last layer's distribution, i.e. the model's own, from each layer's), and with
    ``keep_states`` also ``states`` ``[N, L, d]`` (the layer outputs).
    """
    import torch

    from .lenses import softcap_of

    cap = softcap_of(model)
    with torch.no_grad(), model.trace(inputs) as tracer:
        raw = decode_layers(model, option_ids, k, states, keep_states, cap=cap)
        if states is not None:
            tracer.stop()
    return finish_readout(raw)


def decode_layers(model: Any, option_ids: Sequence[int], k: int, states: Any = None, keep_states: bool = False,
                  after_forward: bool = False, cap: float | None = None) -> dict:
    """Inside a trace: the body of :func:`lens_readout`, returning what it saved. ``after_forward``: decode once
    the model's forward is over (in the chunk's shared trace, so the ad-hoc ``norm``/``lm_head`` calls never run
    while another invoke waits on those modules). ``cap``: the model's final-logit soft-cap (``softcap_of``)."""
    import nnsight
    import torch

    lm, n_layers, ids = model.lm, model.n_layers, list(option_ids)
    if states is None:
        outs = [lm.model.layers[i].output for i in range(n_layers)]
        hs = torch.stack([(o[0] if isinstance(o, tuple) else o)[:, -1] for o in outs], dim=1)
    else:
        hs = states
    if after_forward:
        lm.output.logits  # noqa: B018 - wait for the end of the forward
    logits = lm.lm_head(lm.model.norm(hs)).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    lse = logits.logsumexp(-1, keepdim=True)
    log_q = logits - lse
    log_p = log_q[:, -1:]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    top_logit, top_id = logits.topk(k, dim=-1)
    top_id = top_id.int()  # vocabularies fit int32: half the bytes of topk's int64
    option_logit = logits[..., ids]
    out = {"top_logit": top_logit, "top_id": top_id, "option_logit": option_logit, "kl": kl, "lse": lse}
    if keep_states:
        out["states"] = hs.clone()
    return nnsight.save(out)


def finish_readout(raw: dict) -> dict:
    """What :func:`decode_layers` saved, as :func:`lens_readout` returns it (CPU tensors; probabilities are
    logit - logsumexp, computed here rather than sent back)."""
    lse, top_logit, option_logit = raw["lse"], raw["top_logit"], raw["option_logit"]
    out = {"top_logit": top_logit, "top_id": raw["top_id"].long(), "top_prob": (top_logit - lse).exp(),
           "option_logit": option_logit, "option_prob": (option_logit - lse).exp(), "kl": raw["kl"]}
    if "states" in raw:
        out["states"] = raw["states"]
    return {key: value.detach().cpu() for key, value in out.items()}


def crossing_layer(option_logit: np.ndarray) -> np.ndarray:
    """``option_logit [..., layer, option]`` -> ``[...]``: see :data:`CROSSING_DOC`."""
    chosen = option_logit[..., -1, :].argmax(-1)[..., None, None]
    mine = np.take_along_axis(option_logit, np.broadcast_to(chosen, option_logit.shape[:-1] + (1,)), -1)[..., 0]
    others = np.where(np.arange(option_logit.shape[-1]) == chosen, -np.inf, option_logit).max(-1)
    ahead = mine > others  # [..., layer]
    stays = np.flip(np.cumprod(np.flip(ahead, -1), -1), -1).astype(bool)  # ahead at this layer and all later ones
    first = stays.argmax(-1)
    return np.where(stays[..., -1], first, -1).astype(np.int32)


def _token_strings(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    flat = tokenizer.convert_ids_to_tokens([int(i) for i in ids.ravel()])
    # NetCDF cuts strings at NUL, so escape it; byte-level BPE vocabularies never contain it anyway
    clean = [(t or "").replace("\x00", "\\x00") for t in flat]
    return np.array(clean, dtype=object).reshape(ids.shape).astype(str)


def _token_texts(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Each id decoded on its own (``" A"``, ``"\\n"``), as a reader sees it; NUL escaped as in ``_token_strings``."""
    uniq, inverse = np.unique(ids.ravel(), return_inverse=True)
    texts = [tokenizer.decode([int(i)]).replace("\x00", "\\x00") for i in uniq]
    return np.array(texts, dtype=object)[inverse].reshape(ids.shape).astype(str)


def with_tuned(model: Any, pairs: Sequence[PromptPair], options: LensOptions, label_ids: Sequence[int] | None = None,
               tuned_lens: TunedLens | None = None) -> xr.Dataset:
    """The logit and the tuned lens at the decision position of every pair, both sides: two traces (the residuals
    are translated here, between them); the logit lens alone reads the shared trace (:func:`_shares`).

    Returns a Dataset with dims ``prompt``, ``side`` (base, cf), ``lens`` (``logit`` and, with a tuned lens,
    ``tuned``), ``layer``, ``k``, ``option``: ``top_token``/``top_token_id``/``top_prob``/``top_logit``
    ``(prompt, side, lens, layer, k)``, ``label_logit``/``label_prob`` ``(prompt, side, lens, layer,
    option)`` (the label trajectory), ``kl_to_final (prompt, side, lens, layer)`` in nats,
    ``crossing_layer (prompt, side, lens)`` and ``final_choice (prompt, side)`` (the label the model prefers).
    Without ``tuned_lens``: the logit lens alone, in one trace of its own.
    """
    batch = encode_pairs(model, pairs, list(options.labels), options.chat, label_ids)
    inputs = batch.encoded.inputs()
    results = [lens_readout(model, inputs, batch.label_ids, options.k, keep_states=tuned_lens is not None)]
    if tuned_lens is None:
        return _lens_dataset(model, batch, options, results, ["logit"])
    states = results[0].pop("states")
    translated = tuned_lens.transform_stack(states.float()).to(states.dtype)
    if model.weights_device is not None:
        translated = translated.to(model.weights_device)
    results.append(lens_readout(model, inputs, batch.label_ids, options.k, states=translated))
    return _lens_dataset(model, batch, options, results, ["logit", "tuned"])


def _start(model: Any, batch: Any, options: LensOptions, prepared: dict) -> dict:
    from .lenses import softcap_of

    return {"_options": options, "k": options.k, "cap": softcap_of(model)}


def _read(model: Any, batch: Any, job: dict) -> dict:
    return decode_layers(model, batch.label_ids, job["k"], after_forward=True, cap=job["cap"])


def _build(model: Any, batch: Any, job: dict, got: dict) -> xr.Dataset:
    return _lens_dataset(model, batch, job["_options"], [finish_readout(got)], ["logit"])


def _shares(model: Any, options: LensOptions, prepared: dict) -> SharedReads | None:
    """The logit lens reads the shared trace; a tuned lens needs its own two traces."""
    return SharedReads(start=_start, read=_read, build=_build) if prepared.get("tuned_lens") is None else None


def _lens_dataset(model: Any, batch: Any, options: LensOptions, results: list[dict], names: list[str]) -> xr.Dataset:
    """The lens Dataset of a chunk from each lens' readout (rows ``[base..., cf...]``)."""
    pairs = batch.pairs
    n, n_layers = batch.n, model.n_layers

    def arrange(key: str) -> np.ndarray:  # rows [base..., cf...] -> [prompt, side, lens, ...]
        stacked = np.stack([r[key].numpy() for r in results], axis=1)  # [2n, lens, ...]
        return stacked.reshape(2, n, *stacked.shape[1:]).swapaxes(0, 1)

    top_id, option_logit = arrange("top_id"), arrange("option_logit")
    labels = list(options.labels)
    final_choice = np.array(labels, dtype=object)[option_logit[:, :, 0, -1].argmax(-1)].astype(str)
    tok = model.tokenizer
    dims5 = ("prompt", "side", "lens", "layer", "k")
    dimso = ("prompt", "side", "lens", "layer", "option")
    ds = xr.Dataset(
        {
            "top_token": (dims5, _token_strings(tok, top_id)),
            "top_token_text": (dims5, _token_texts(tok, top_id)),
            "top_token_id": (dims5, top_id.astype(np.int32)),
            "top_prob": (dims5, arrange("top_prob").astype(np.float32)),
            "top_logit": (dims5, arrange("top_logit").astype(np.float32)),
            "label_logit": (dimso, option_logit.astype(np.float32)),
            "label_prob": (dimso, arrange("option_prob").astype(np.float32)),
            "kl_to_final": (("prompt", "side", "lens", "layer"), arrange("kl").astype(np.float32)),
            "crossing_layer": (("prompt", "side", "lens"), crossing_layer(option_logit)),
            "final_choice": (("prompt", "side"), final_choice),
        },
        coords={
            "prompt": [p.prompt_id for p in pairs],
            "side": list(SIDES),
            "lens": names,
            "layer": np.arange(n_layers, dtype=np.int32),
            "k": np.arange(options.k, dtype=np.int32),
            "option": labels,
            "label_token_id": ("option", np.array(batch.label_ids, dtype=np.int32)),
            "label_token": ("option", _token_strings(tok, np.array(batch.label_ids))),
        },
    )
    return _describe(ds)


def _describe(ds: xr.Dataset) -> xr.Dataset:
    ds["top_token"].attrs["description"] = "tokenizer.convert_ids_to_tokens of top_token_id (NUL escaped as \\x00)"
    ds["top_token_text"].attrs["description"] = "tokenizer.decode([top_token_id]): the token as text"
    ds["kl_to_final"].attrs.update(units="nats", description="KL(final ‖ lens): the model's own next-token "
                                   "distribution against the lens' at this layer")
    ds["crossing_layer"].attrs["description"] = CROSSING_DOC
    ds["label_logit"].attrs["description"] = "the lens' logit of each answer label, per layer (the trajectory)"
    ds["final_choice"].attrs["description"] = "the label with the highest logit at the last layer"
    return ds


def _lens_digest(folder: Path) -> str:
    from .lenses import CONFIG, PARAMS, TL_PARAMS

    params = folder / PARAMS if (folder / PARAMS).exists() else folder / TL_PARAMS
    digest = hashlib.sha256((folder / CONFIG).read_bytes())
    digest.update(params.read_bytes())
    return digest.hexdigest()[:16]


def resolve_tuned_lens(model: Any, spec: str | Path | None) -> tuple[TunedLens | None, dict]:
    """Which tuned lens to use: ``spec`` a lens folder, ``""``/``"none"`` for none, ``None`` for the cached one
    (:func:`nnethics.analyses.lens.lenses.find_cached_lens`).

    Returns the lens (or None) and what to record: ``tuned_lens`` (the folder, ``""`` for none),
    ``tuned_lens_digest``, and ``tuned_lens_note`` when a cached lens was not used, saying why: it was made
    for another model, or the handle's traces are serialised (NDIF), where the lens would bring every
    layer's residual back and send it up again (:func:`residual_round_trip`). The caller shows the note.
    """
    from .lenses import LensLoadError, TunedLens, find_cached_lens

    if spec is not None and str(spec).lower() in ("", "none", "false"):
        return None, {"tuned_lens": ""}
    if is_hub_spec(spec):
        return _hub_lens(model, str(spec))
    folder = Path(spec).expanduser() if spec is not None else find_cached_lens(model)
    if folder is None:
        return None, {"tuned_lens": ""}
    if spec is None and model.serialized:
        return None, {"tuned_lens": "", "tuned_lens_note": (
            f"not using the cached tuned lens {folder} on NDIF: it would bring every layer's residual back "
            f"and send it up again ({residual_round_trip(model) / 2**20:.1f} MB per pair each way); ask for it "
            f"by adding `--tuned-lens {folder}` to `nnethics lens run`")}
    try:
        lens = TunedLens.load(folder, model)
    except LensLoadError as e:
        if spec is not None:
            raise
        return None, {"tuned_lens": "", "tuned_lens_note": f"ignoring the cached tuned lens: {e}"}
    return lens, {"tuned_lens": str(folder), "tuned_lens_digest": _lens_digest(folder)}


def _hub_lens(model: Any, spec: str) -> tuple[TunedLens, dict]:
    """A pretrained lens named ``hub:ORG/REPO[/subfolder]`` (:mod:`nnethics.analyses.lens.hub`), checked against ``model``."""
    from .hub import hub_lens_folder
    from .lenses import LensLoadError, TunedLens

    folder = hub_lens_folder(spec)
    try:
        lens = TunedLens.load(folder, model)
    except LensLoadError as e:
        raise LensLoadError(f"--tuned-lens {spec}: {str(e).replace(str(folder), 'the lens')}; name the subfolder "
                            f"of a lens trained for {model.name}, or train one with `nnethics lens train`") from None
    return lens, {"tuned_lens": spec, "tuned_lens_digest": _lens_digest(folder)}


def residual_round_trip(model: Any) -> int:
    """Bytes per prompt pair that a remote tuned lens moves each way: every layer's residual at the
    decision position of both prompts, in the model's dtype (translators never travel)."""
    width = 2 if model.dtype in ("bfloat16", "float16") else 4
    return 2 * model.n_layers * model.d_model * width


def prepare(model: Any, options: LensOptions) -> Prepared:
    """Once per run: the tuned lens to use (passed to every chunk), what provenance records of it, and notes."""
    lens, info = resolve_tuned_lens(model, options.tuned_lens)
    note = info.pop("tuned_lens_note", None)
    return Prepared({"tuned_lens": lens}, info, [note] if note else [])


def summarize(ds: xr.Dataset) -> str:
    parts = []
    for name in ds["lens"].values:
        cross = ds["crossing_layer"].sel(lens=name).values
        valid = cross[cross >= 0]
        med = f"{np.median(valid):.0f}" if valid.size else "n/a"
        mid = ds["kl_to_final"].sel(lens=name).isel(layer=ds.sizes["layer"] // 2).mean()
        parts.append(f"{name} lens: median crossing layer {med}, mean KL to final at layer {ds.sizes['layer'] // 2} "
                     f"{float(mid):.2f} nats")
    return f"{ds.sizes['prompt']} pairs, {ds.sizes['layer']} layers; " + "; ".join(parts)


def check_model(model: Any, options: LensOptions) -> None:
    """``k`` against the model's vocabulary (topk of more tokens than there are would fail mid-run)."""
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and options.k > vocab:
        raise OptionError("k", f"the model's vocabulary has {vocab} tokens (vocab_size in its config), got "
                               f"{options.k}; pass --k {vocab} or less")


ANALYSIS = register(Analysis(
    variables=VARIABLES, compare="nnethics.analyses.lens.figures", commands=("nnethics.analyses.lens.command",),
    functions={"logit_lens": Function(
        "The logit lens (and ``tuned_lens=``, a :class:`nnethics.TunedLens`, if given) at the decision position of "
        "every pair, both sides, as one chunk (see :mod:`nnethics.analyses.lens`).")},
    name="lens", options=LensOptions, compute=with_tuned, summarize=summarize, prepare=prepare, command="lens run",
    check=check_model,
    help="Compute STORE/<model>/lens.nc (logit lens, and the tuned lens when one is given or cached).",
    tables=export_tables.tables,
    render=("nnethics.analyses.lens.figures",), shares=_shares))


def evaluate_lenses(model: Any, tuned_lens: TunedLens, corpus: Sequence[str | Path] | None = None,
                    eval_tokens: int | None = None) -> xr.Dataset:
    """Held-out per-layer KL(final ‖ lens) and top-1 agreement of the logit lens and ``tuned_lens``.

    The held-out documents are those the lens was trained without (split, seed, window length and corpus
    from its config, unless ``corpus`` is given). Returns dims ``lens`` (logit, tuned), ``layer``:
    ``kl (lens, layer)`` in nats, ``top1_agreement (lens, layer)``; attrs ``n_tokens``, ``corpus_sha256``.
    """
    from ...data.corpus import chat_documents, read_documents, split_documents, token_windows
    from .lenses import LogitLens, Unembed
    from .training import TrainOptions, collect_residuals, layer_kl

    trained = tuned_lens.config.training or {}
    known = TrainOptions.__dataclass_fields__
    saved = trained.get("options", {})
    if saved and "chat_fraction" not in saved:  # trained before documents were chat-formatted
        saved = {**saved, "chat_fraction": 0.0}
    topts = TrainOptions(**{k: v for k, v in saved.items() if k in known})
    files = list(corpus) if corpus else trained.get("corpus_files") or None
    docs, sha = read_documents(files)
    _, held = split_documents(docs, topts.heldout, topts.seed)
    held = chat_documents(model.tokenizer, held, topts.chat_fraction, topts.seed)
    windows = token_windows(model.tokenizer, held, topts.seq_len, eval_tokens or topts.eval_tokens)
    resid = collect_residuals(model, windows)
    fits = layer_kl(Unembed.from_model(model), resid, {"logit": LogitLens(model.n_layers), "tuned": tuned_lens})
    names = ["logit", "tuned"]
    ds = xr.Dataset(
        {
            "kl": (("lens", "layer"), np.stack([fits[n]["kl"].numpy() for n in names]).astype(np.float32)),
            "top1_agreement": (("lens", "layer"), np.stack([fits[n]["top1"].numpy() for n in names]).astype(np.float32)),
        },
        coords={"lens": names, "layer": np.arange(model.n_layers, dtype=np.int32)},
        attrs={"n_tokens": int(resid.shape[1]), "corpus_sha256": sha, "heldout_fraction": float(topts.heldout),
               "split_seed": int(topts.seed), "corpus_files": ", ".join(map(str, files or [])) or "(default corpus)"},
    )
    ds["kl"].attrs.update(units="nats", description="mean over held-out positions of KL(final ‖ lens)")
    ds["top1_agreement"].attrs["description"] = "fraction of held-out positions where the lens' top token is the model's"
    return ds
