"""Lenses: decode a layer's residual stream into next-token logits.

``LogitLens`` applies the model's own final norm and unembedding to a layer's output (nostalgebraist 2020).
``TunedLens`` (Belrose et al. 2023) first applies a learned affine *translator* per layer, residually,
``h + A h + b`` with ``A = 0, b = 0`` at initialisation (so an untrained tuned lens is the logit lens),
then the same frozen norm and unembedding. Translators are trained to minimise KL(final ‖ lens) over every
position of a text corpus (:func:`train_tuned_lens`; the residuals are cached once from the frozen model).

Layer convention (the tuned-lens package's): there are ``n_layers`` translators; translator 0 reads the
embeddings (the input of layer 0), translator ``i`` reads the output of layer ``i - 1``. The output of the
last layer needs none: it *is* the model's final residual. nnethics reads layer outputs, so the lens for
the output of layer ``l`` uses translator ``l + 1`` (identity for the last layer); translator 0 stays at
zero when nnethics trains a lens.

On disk a lens is a folder: ``params.safetensors`` (keys ``layer_translators.{i}.weight/bias``) and
``config.json``. The config carries the model id and revision and ``unembed_sha256``, the sha256 of the
unembedding weight (float32 bytes), and refuses to load against another model. Folders written by the
tuned-lens package (``params.pt`` + ``config.json``) load too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .models.loading import ModelLoadError

FORMAT = "nnethics-tuned-lens"
PARAMS = "params.safetensors"
TL_PARAMS = "params.pt"  # the tuned-lens package's parameter file
CONFIG = "config.json"


class LensLoadError(ModelLoadError):
    """A lens could not be loaded, or does not belong to the model it is used with."""


# --------------------------------------------------------------------------- identity of a model's unembedding


def _lm_head(model: Any) -> nn.Module:
    return model.lm.lm_head._module


def _final_norm(model: Any) -> nn.Module:
    return model.lm.model.norm._module


def unembed_sha256(model: Any, rows: int = 8192) -> str | None:
    """sha256 of the unembedding weight's float32 bytes (row-major); ``None`` for a weightless (remote) model."""
    w = _lm_head(model).weight
    if w.device.type == "meta":
        return None
    digest = hashlib.sha256()
    for start in range(0, w.shape[0], rows):  # chunks: a 128k x 8k head is 4 GB in float32
        digest.update(w[start:start + rows].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tuned_lens_unembed_hash(model: Any) -> str | None:
    """The tuned-lens package's ``unembed_hash`` (sha256 of ``np.array_str(W, precision=1)``), for interop."""
    w = _lm_head(model).weight
    if w.device.type == "meta":
        return None
    return hashlib.sha256(np.array_str(w.detach().float().cpu().numpy(), precision=1).encode()).hexdigest()


def softcap_of(model: Any) -> float | None:
    attr = model.adapter.softcap_attr
    cap = getattr(model.config, attr, None) if attr else None
    return float(cap) if cap else None


class Unembed(nn.Module):
    """Final norm + unembedding (+ Gemma-2 soft-cap) as plain torch, outside any trace; frozen.

    The norm is copied (it is small); the unembedding weight is shared with the model, not copied.
    """

    def __init__(self, norm: nn.Module, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None):
        super().__init__()
        self.norm = copy.deepcopy(norm).requires_grad_(False)
        self._weight = weight.detach()
        self._bias = None if bias is None else bias.detach()
        self.softcap = softcap
        self._cast: dict[torch.dtype, Tensor] = {}

    @classmethod
    def from_model(cls, model: Any) -> Unembed:
        head = _lm_head(model)
        if head.weight.device.type == "meta":
            raise ValueError("this model has no local weights (remote); lens training and evaluation need a local model")
        return cls(_final_norm(model), head.weight, getattr(head, "bias", None), softcap_of(model))

    def weight(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self._weight.to(dtype)
        return self._cast[dtype]

    def logits_from_normed(self, n: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[..., d]`` post-norm states -> float32 logits ``[..., V]``; the matmul runs in ``dtype``."""
        z = (n.to(dtype) @ self.weight(dtype).T).float()
        if self._bias is not None:
            z = z + self._bias.float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def forward(self, h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[..., d]`` residual states -> float32 logits ``[..., V]``."""
        n = self.norm(h.to(self._weight.dtype) if h.dtype != self._weight.dtype else h)
        return self.logits_from_normed(n, dtype)


# --------------------------------------------------------------------------- config


@dataclass
class LensConfig:
    """A tuned lens' config: a superset of the tuned-lens package's ``TunedLensConfig`` (same field names),
    so each package can read the other's ``config.json``."""

    base_model_name_or_path: str
    d_model: int
    num_hidden_layers: int
    bias: bool = True
    base_model_revision: str | None = None
    unembed_hash: str | None = None  # the tuned-lens package's own hash, kept for interop
    lens_type: str = "linear_tuned_lens"
    unembed_sha256: str | None = None  # sha256 of the unembedding weight's float32 bytes
    format: str = FORMAT
    training: dict = field(default_factory=dict)  # how it was trained (options, corpus, timings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LensConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"base_model_name_or_path", "d_model", "num_hidden_layers"} - set(data)
        if missing:
            raise LensLoadError(f"lens config lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LensConfig:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- lenses


class Lens(nn.Module):
    """Maps layer outputs to the states the final norm + unembedding decode. Subclasses define :meth:`transform`."""

    name = "lens"

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers

    def transform(self, h: Tensor, layer: int) -> Tensor:
        """``h [..., d]``, the output of decoder layer ``layer`` -> the state to decode ``[..., d]``."""
        raise NotImplementedError

    def transform_stack(self, hs: Tensor) -> Tensor:
        """``hs [..., n_layers, d]`` (every layer's output) -> transformed ``[..., n_layers, d]``."""
        return torch.stack([self.transform(hs[..., i, :], i) for i in range(hs.shape[-2])], dim=-2)


class LogitLens(Lens):
    """The logit lens: every layer's output goes straight through the final norm and unembedding."""

    name = "logit"

    @classmethod
    def from_model(cls, model: Any) -> LogitLens:
        return cls(model.n_layers)

    def transform(self, h: Tensor, layer: int) -> Tensor:
        return h

    def transform_stack(self, hs: Tensor) -> Tensor:
        return hs


class TunedLens(Lens):
    """A tuned lens: ``h + A_l h + b_l`` per layer, then the frozen final norm and unembedding."""

    name = "tuned"

    def __init__(self, config: LensConfig):
        super().__init__(config.num_hidden_layers)
        self.config = config
        d = config.d_model
        self.layer_translators = nn.ModuleList(nn.Linear(d, d, bias=config.bias) for _ in range(config.num_hidden_layers))
        with torch.no_grad():
            for t in self.layer_translators:
                t.weight.zero_()
                if t.bias is not None:
                    t.bias.zero_()

    @classmethod
    def from_model(cls, model: Any, bias: bool = True) -> TunedLens:
        """A zero-initialised lens (equal to the logit lens) for ``model``, identified by its unembedding hash."""
        return cls(LensConfig(
            base_model_name_or_path=model.name, base_model_revision=model.revision, d_model=model.d_model,
            num_hidden_layers=model.n_layers, bias=bias, unembed_sha256=unembed_sha256(model),
            unembed_hash=tuned_lens_unembed_hash(model)))

    def translator(self, layer: int) -> nn.Linear | None:
        """The translator for the output of ``layer`` (``None`` for the last layer)."""
        return self.layer_translators[layer + 1] if layer + 1 < self.n_layers else None

    def transform(self, h: Tensor, layer: int) -> Tensor:
        layer = layer % self.n_layers
        t = self.translator(layer)
        if t is None:
            return h
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def transform_stack(self, hs: Tensor) -> Tensor:
        w = torch.stack([t.weight for t in self.layer_translators[1:]])  # [L-1, d, d]
        x = hs[..., :-1, :].to(w.dtype)
        delta = torch.einsum("...le,lde->...ld", x, w)
        if self.config.bias:
            delta = delta + torch.stack([t.bias for t in self.layer_translators[1:]])
        out = hs.clone()
        out[..., :-1, :] = hs[..., :-1, :] + delta.to(hs.dtype)
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, format: str = "nnethics") -> Path:
        """Write ``params.safetensors`` + ``config.json`` (or, with ``format="tuned-lens"``, the tuned-lens
        package's ``params.pt`` + ``config.json``) into the folder ``path``, atomically per file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.layer_translators.state_dict().items()}
        if format == "tuned-lens":
            _atomic(path / TL_PARAMS, lambda tmp: torch.save(state, tmp))
        elif format == "nnethics":
            _atomic(path / PARAMS, lambda tmp: save_file({f"layer_translators.{k}": v for k, v in state.items()}, tmp,
                                                         metadata={"format": FORMAT}))
        else:
            raise ValueError(f"unknown lens format {format!r}; use 'nnethics' or 'tuned-lens'")
        _atomic(path / CONFIG, lambda tmp: Path(tmp).write_text(self.config.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, strict: bool = True) -> TunedLens:
        """Load a lens folder (nnethics or tuned-lens format). With ``model`` given, refuse (``LensLoadError``)
        a lens made for another model unless ``strict=False``."""
        path = Path(path).expanduser()
        cfg_file = path / CONFIG
        if not cfg_file.exists():
            raise LensLoadError(f"{path}: no {CONFIG}; a lens folder holds {CONFIG} and {PARAMS} (or {TL_PARAMS})")
        try:
            config = LensConfig.from_json(cfg_file.read_text())
        except (json.JSONDecodeError, TypeError) as e:
            raise LensLoadError(f"{cfg_file}: not a lens config ({e})") from None
        if (path / PARAMS).exists():
            from safetensors.torch import load_file

            state = load_file(str(path / PARAMS))
        elif (path / TL_PARAMS).exists():
            state = torch.load(path / TL_PARAMS, map_location="cpu", weights_only=True)
            config.format = "tuned-lens"
        else:
            raise LensLoadError(f"{path}: neither {PARAMS} nor {TL_PARAMS} found")
        if model is not None and strict:
            check_compatible(config, model, where=str(path))
        state = {k.removeprefix("layer_translators."): v for k, v in state.items()
                 if k.split(".")[0].isdigit() or k.startswith("layer_translators.")}
        if not any(k.endswith(".bias") for k in state):
            config.bias = False
        lens = cls(config)
        try:
            lens.layer_translators.load_state_dict(state)
        except RuntimeError as e:
            raise LensLoadError(f"{path}: parameters do not fit the config (d_model={config.d_model}, "
                                f"num_hidden_layers={config.num_hidden_layers}): {e}") from None
        return lens


def check_compatible(config: LensConfig, model: Any, where: str = "lens") -> None:
    """Raise :class:`LensLoadError` if ``config`` was not made for ``model``."""
    made_for = f"{config.base_model_name_or_path}{'@' + config.base_model_revision if config.base_model_revision else ''}"
    if (config.d_model, config.num_hidden_layers) != (model.d_model, model.n_layers):
        raise LensLoadError(
            f"{where} was made for {made_for} (d_model={config.d_model}, {config.num_hidden_layers} layers), "
            f"not for {model.name} (d_model={model.d_model}, {model.n_layers} layers)")
    same_name = config.base_model_name_or_path == model.name
    if config.unembed_sha256:
        mine = unembed_sha256(model)
        if mine is not None and mine != config.unembed_sha256:
            raise LensLoadError(
                f"{where} was trained for {made_for}, whose unembedding has sha256 {config.unembed_sha256[:12]}…; "
                f"{model.name} has {mine[:12]}…. It is a different model (or different weights): train a lens for it with "
                f"`nnethics lens train --model {model.name}`")
        if mine is not None or same_name:
            return
    elif config.unembed_hash:
        mine = tuned_lens_unembed_hash(model)
        if mine == config.unembed_hash:
            return
        if same_name and mine is not None:
            warnings.warn(f"{where}: the unembedding hash differs from the lens' one (another dtype or numpy "
                          "version can cause this); using the lens anyway because the model ids match", stacklevel=2)
            return
    if not same_name:
        raise LensLoadError(f"{where} was made for {made_for}, not for {model.name}; "
                            f"train one with `nnethics lens train --model {model.name}`")


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a lens is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lens_cache_dir(slug: str) -> Path:
    """Default folder of a model's tuned lens: ``$NNETHICS_CACHE/lenses/<slug>/``."""
    from .models.builtin import cache_root

    return cache_root() / "lenses" / slug


def find_cached_lens(model: Any) -> Path | None:
    """The cached tuned lens folder for ``model``, if one was trained (``nnethics lens train``)."""
    folder = lens_cache_dir(model.slug)
    return folder if (folder / CONFIG).exists() and ((folder / PARAMS).exists() or (folder / TL_PARAMS).exists()) else None


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train_tuned_lens` trains. ``batch_tokens`` positions (drawn at random from the cached
    residuals) per step; Adam with linear warm-up over ``warmup`` of the steps, then cosine decay.
    ``matmul_dtype`` is the dtype of the unembedding matmuls while training (``auto``: bfloat16 where it
    is faster, e.g. CUDA or CPUs with bf16 units; the loss, softmax and evaluation stay in float32).
    ``chat_fraction`` of the documents are wrapped in the model's chat template (when it has one), as
    the analyses' prompts are (:func:`nnethics.data.corpus.chat_documents`)."""

    steps: int = 200
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.0
    batch_tokens: int = 128
    seq_len: int = 128
    train_tokens: int = 16384
    eval_tokens: int = 1024
    heldout: float = 0.1
    chat_fraction: float = 0.5
    seed: int = 0
    matmul_dtype: str = "auto"
    checkpoint_every: int = 25

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def collect_residuals(model: Any, windows: list[list[int]], batch_size: int = 8, progress: Any = None) -> Tensor:
    """Every layer's output at every position of ``windows`` (token-id lists), from one trace per batch.

    Returns float32 ``[n_layers, n_tokens, d]`` on the CPU (windows concatenated in order).
    """
    import nnsight

    lm, n_layers = model.lm, model.n_layers
    device = None if model.remote else lm.lm_head._module.weight.device
    total = sum(len(w) for w in windows)
    out = torch.empty(n_layers, total, model.d_model, dtype=torch.float32)
    at = 0
    groups: dict[int, list[list[int]]] = {}
    for w in windows:  # equal-length windows batch without padding
        groups.setdefault(len(w), []).append(w)
    for ws in groups.values():
        for i in range(0, len(ws), batch_size):
            ids = torch.tensor(ws[i:i + batch_size], dtype=torch.long, device=device)
            with model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                hs = nnsight.save([])
                for layer in lm.model.layers:
                    o = layer.output
                    hs.append((o[0] if isinstance(o, tuple) else o).clone())
            n = ids.numel()
            out[:, at:at + n] = torch.stack([h.float().cpu().reshape(n, -1) for h in hs])
            at += n
            if progress is not None:
                progress.update(len(ids))
    return out


def _matmul_dtype(name: str, unembed: Unembed) -> torch.dtype:
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    w = unembed.weight(torch.float32)
    if w.is_cuda:
        return torch.bfloat16
    import time

    x = torch.randn(256, w.shape[1])
    timings = {}
    for dt in (torch.float32, torch.bfloat16):
        xw, ww = x.to(dt), unembed.weight(dt)
        xw @ ww.T  # warm-up
        t0 = time.perf_counter()
        xw @ ww.T
        timings[dt] = time.perf_counter() - t0
    return torch.bfloat16 if timings[torch.bfloat16] < 0.7 * timings[torch.float32] else torch.float32


def _lr_factor(step: int, options: TrainOptions) -> float:
    warm = max(1, round(options.warmup * options.steps))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, options.steps - warm)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, frac)))


@torch.no_grad()
def _kl_and_grad(n: Tensor, p: Tensor, p_w: Tensor, p_b: Any, neg_entropy: Tensor, unembed: Unembed,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """KL(p ‖ softmax(unembed(n))) per row of post-norm states ``n [B, d]``, and the gradient of its mean
    with respect to ``n``.

    The gradient with respect to the logits is ``softmax(z) - p``; it goes through the frozen unembedding by
    hand, so no ``[B, V]`` autograd graph is kept. ``p_w = p @ W`` and ``p_b = p · bias`` make Σ p·z a
    ``[B, d]`` dot product when there is no soft-cap.
    """
    cap, w = unembed.softcap, unembed.weight(dtype)
    z = n.to(dtype) @ w.T
    if unembed._bias is not None:
        z += unembed._bias.to(dtype)
    if cap:
        z = torch.tanh(z.float() / cap) * cap
        p_z = (p * z).sum(-1)
    else:
        p_z = (n.float() * p_w).sum(-1) + p_b
    z_max, at = z.max(-1, keepdim=True)
    q = torch.softmax(z, -1, dtype=torch.float32)
    lse = (z_max.float() - q.gather(-1, at).log()).squeeze(-1)  # log-sum-exp from the softmax's max entry
    grad = q.sub_(p)
    if cap:  # z = cap·tanh(u/cap): dz/du = 1 - (z/cap)²
        grad.mul_(1 - (z / cap) ** 2)
    return neg_entropy - p_z + lse, (grad.to(dtype) @ w).to(n.dtype) / len(n)


def fit_tuned_lens(lens: TunedLens, unembed: Unembed, resid: Tensor, options: TrainOptions = TrainOptions(), *,
                   state: dict | None = None, on_checkpoint: Any = None, progress: Any = None) -> list[float]:
    """Train ``lens``'s translators in place on cached residuals ``resid [n_layers, n_tokens, d]``.

    Each step draws ``batch_tokens`` positions, computes the final distribution p from the last layer's
    output, and for every other layer minimises KL(p ‖ softmax(unembed(h + A h + b))). The gradient of
    the KL with respect to the lens logits is ``softmax(z) - p``; it is pushed through the (frozen)
    unembedding by hand so no ``[tokens, V]`` autograd graph is kept. ``state`` (from a checkpoint)
    resumes; ``on_checkpoint(state)`` is called every ``checkpoint_every`` steps and at the end.
    Returns the mean KL (nats, averaged over layers) of every step run.
    """
    n_layers, n_tokens, _ = resid.shape
    dtype = _matmul_dtype(options.matmul_dtype, unembed)
    trained = list(lens.layer_translators[1:])
    params = [p for t in trained for p in t.parameters()]
    try:  # the fused kernel is ~7x faster than the per-parameter loop on CPU
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, options))
    start = 0
    if state is not None:
        lens.layer_translators.load_state_dict(state["translators"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    w32, bias = unembed.weight(torch.float32), unembed._bias
    history: list[float] = []

    def snapshot(step: int) -> dict:
        return {"step": step, "translators": lens.layer_translators.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}

    for step in range(start, options.steps):
        gen = torch.Generator().manual_seed(options.seed * 1_000_003 + step)  # resumable without RNG state
        idx = torch.randint(n_tokens, (options.batch_tokens,), generator=gen)
        hs = resid[:, idx].to(w32.device)
        with torch.no_grad():
            log_p = unembed(hs[-1]).log_softmax(-1)
            p = log_p.exp()
            neg_entropy = (p * log_p).sum(-1)
            p_w = p @ w32  # Σ_v p_v W_v: without a soft-cap, Σ_v p_v z_v = n · p_w (+ p · bias)
            p_b = p @ bias.float() if bias is not None else 0.0
        # all translators at once (few small ops), then one unembedding per layer, then one backward
        weight = torch.stack([t.weight for t in trained])  # [L-1, d, d]
        x = hs[:-1] + torch.bmm(hs[:-1], weight.transpose(1, 2))
        if lens.config.bias:
            x = x + torch.stack([t.bias for t in trained])[:, None, :]
        n = unembed.norm(x)
        grad_n, kls = torch.empty_like(n), []
        for layer in range(n_layers - 1):
            kl, grad_n[layer] = _kl_and_grad(n[layer].detach(), p, p_w, p_b, neg_entropy, unembed, dtype)
            kls.append(float(kl.mean()))
        n.backward(grad_n)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        history.append(float(np.mean(kls)))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kl=f"{history[-1]:.3f}", refresh=False)
        done = step + 1
        if on_checkpoint is not None and (done % max(1, options.checkpoint_every) == 0 or done == options.steps):
            on_checkpoint(snapshot(done))
    return history


@torch.no_grad()
def layer_kl(unembed: Unembed, resid: Tensor, lenses: dict[str, Lens], chunk: int = 256) -> dict[str, dict[str, Tensor]]:
    """Held-out fit of each lens, per layer, in float32: ``{name: {"kl": [L], "top1": [L]}}``.

    ``kl`` is the mean over positions of KL(final ‖ lens) in nats; ``top1`` the fraction of positions where
    the lens' argmax token is the model's final argmax token.
    """
    n_layers, n_tokens, _ = resid.shape
    for lens in lenses.values():
        lens.to(unembed._weight.device)
    sums = {name: {"kl": torch.zeros(n_layers, dtype=torch.float64), "top1": torch.zeros(n_layers, dtype=torch.float64)}
            for name in lenses}
    for start in range(0, n_tokens, chunk):
        hs = resid[:, start:start + chunk].to(unembed._weight.device)
        log_p = unembed(hs[-1]).log_softmax(-1)
        p, final_top = log_p.exp(), log_p.argmax(-1)
        for name, lens in lenses.items():
            for layer in range(n_layers):
                log_q = unembed(lens.transform(hs[layer], layer)).log_softmax(-1)
                sums[name]["kl"][layer] += (p * (log_p - log_q)).sum(-1).clamp_min(0).sum().double().cpu()
                sums[name]["top1"][layer] += (log_q.argmax(-1) == final_top).sum().double().cpu()
    return {name: {k: (v / n_tokens).float() for k, v in d.items()} for name, d in sums.items()}


def train_tuned_lens(model: Any, corpus: list[str | Path] | None = None, options: TrainOptions = TrainOptions(), *,
                     out: str | Path | None = None, progress: bool | None = None, resume: bool = True,
                     log: Any = None) -> tuple[TunedLens, dict]:
    """Train a tuned lens for ``model`` on ``corpus`` (text files; default: the shipped corpus) and save it.

    The corpus is split into training and held-out documents (``options.heldout``); the residuals of
    ``options.train_tokens`` training tokens are cached once, then :func:`fit_tuned_lens` runs. A
    checkpoint in ``out`` (default :func:`lens_cache_dir`) makes an interrupted run resumable. Returns the
    lens and a dict with timings and the loss history; the held-out split is recorded in the lens config
    so that ``nnethics lens eval`` evaluates on exactly the held-out documents.
    """
    import sys
    import time

    from tqdm.auto import tqdm

    from .data.corpus import chat_documents, read_documents, split_documents, token_windows

    say = log or (lambda msg: print(msg, file=sys.stderr))
    show = sys.stderr.isatty() if progress is None else progress
    out = Path(out) if out is not None else lens_cache_dir(model.slug)
    unembed = Unembed.from_model(model)
    lens = TunedLens.from_model(model).to(unembed._weight.device)
    files = [str(Path(f).expanduser().resolve()) for f in corpus] if corpus else []
    docs, corpus_sha = read_documents(files or None)
    train_docs, _ = split_documents(docs, options.heldout, options.seed)
    key = hashlib.sha256(json.dumps([options.to_dict(), corpus_sha, lens.config.unembed_sha256]).encode()).hexdigest()
    ckpt_file, state = out / "checkpoint.pt", None
    if resume and ckpt_file.exists():
        saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            state = saved
            say(f"resuming from {ckpt_file} at step {state['step']}/{options.steps}")
        else:
            say(f"{ckpt_file} was made with other options, corpus or model: starting over")
    t0 = time.perf_counter()
    train_docs = chat_documents(model.tokenizer, train_docs, options.chat_fraction, options.seed)
    windows = token_windows(model.tokenizer, train_docs, options.seq_len, options.train_tokens)
    with tqdm(total=len(windows), desc="caching residuals", unit="window", file=sys.stderr, disable=not show) as bar:
        resid = collect_residuals(model, windows, progress=bar)
    t_cache = time.perf_counter() - t0

    def checkpoint(snap: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        _atomic(ckpt_file, lambda tmp: torch.save({**snap, "key": key}, tmp))

    t1 = time.perf_counter()
    with tqdm(total=options.steps, initial=state["step"] if state else 0, desc="training tuned lens", unit="step",
              file=sys.stderr, disable=not show) as bar:
        history = fit_tuned_lens(lens, unembed, resid, options, state=state, on_checkpoint=checkpoint, progress=bar)
    t_train = time.perf_counter() - t1
    info = {"options": options.to_dict(), "corpus_files": files, "corpus_sha256": corpus_sha,
            "n_train_tokens": int(resid.shape[1]), "n_documents": len(docs), "cache_seconds": round(t_cache, 1),
            "train_seconds": round(t_train, 1), "final_train_kl": history[-1] if history else None}
    lens.config.training = info
    lens.cpu().save(out)
    ckpt_file.unlink(missing_ok=True)
    return lens, {**info, "history": history, "path": str(out)}
