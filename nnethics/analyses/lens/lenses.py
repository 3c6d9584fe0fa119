"""Lenses: decode a layer's residual stream into next-token logits.

``LogitLens`` applies the model's own final norm and unembedding to a layer's output (nostalgebraist 2020).
``TunedLens`` (Belrose et al. 2023) first applies a learned affine *translator* per layer, residually,
``h + A h + b`` with ``A = 0, b = 0`` at initialisation (so an untrained tuned lens is the logit lens),
then the same frozen norm and unembedding. Translators are trained to minimise KL(final ‖ lens) over every
position of a text corpus (:func:`nnethics.analyses.lens.training.train_tuned_lens`; the residuals are
cached once from the frozen model).

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...models.loading import ModelLoadError
from ...store.atomic import write_via_temp

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
            write_via_temp(path / TL_PARAMS, lambda tmp: torch.save(state, tmp))
        elif format == "nnethics":
            tensors = {f"layer_translators.{k}": v for k, v in state.items()}
            write_via_temp(path / PARAMS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        else:
            raise ValueError(f"unknown lens format {format!r}; use 'nnethics' or 'tuned-lens'")
        write_via_temp(path / CONFIG, lambda tmp: Path(tmp).write_text(self.config.to_json()))
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


def lens_cache_dir(slug: str) -> Path:
    """Default folder of a model's tuned lens: ``$NNETHICS_CACHE/lenses/<slug>/``."""
    from ...models.builtin import cache_root

    return cache_root() / "lenses" / slug


def find_cached_lens(model: Any) -> Path | None:
    """The cached tuned lens folder for ``model``, if one was trained (``nnethics lens train``)."""
    folder = lens_cache_dir(model.slug)
    return folder if (folder / CONFIG).exists() and ((folder / PARAMS).exists() or (folder / TL_PARAMS).exists()) else None
