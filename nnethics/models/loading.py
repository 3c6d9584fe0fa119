"""Load a model from any source nnethics accepts and wrap it for nnsight.

``load_model(spec)`` accepts the built-in name (the default), a Hugging Face hub id (optionally
``id@revision``), a local model folder, a ``.gguf`` file, or a key of ``config/models.json``.
It returns a :class:`~nnethics.models.handle.ModelHandle`: the nnsight model plus the adapter and the facts
the analyses and the store need (layers, heads, dtype, device, provenance), and the one place that decides
where traces run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from . import builtin
from .adapters import adapter_for
from .checks import check_adapter
from .errors import ModelLoadError
from .handle import ModelHandle, slug_of
from .remote.loading import load_remote_model
from .secrets import load_model_config, redact, resolve_token

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
QUANTIZE = ("4bit", "8bit")


def check_device(device: str | None) -> None:
    """Raise :class:`ModelLoadError` unless ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...) exists here."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelLoadError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                                 f"CUDA build {torch.version.cuda or 'none'}); use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                                 "pick one of those")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ModelLoadError(f"--device {device}: nnethics runs models on cpu, cuda or mps; use one of those")


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))} or 'auto'") from None


def _quantization_config(quantize: str | None, compute_dtype: torch.dtype) -> Any:
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"unknown quantization {quantize!r}; use one of {QUANTIZE}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            "quantization needs bitsandbytes; install it with: pip install 'nnethics[quantization]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _split_revision(spec: str) -> tuple[str, str | None]:
    if "@" in spec and not Path(spec).exists():
        name, rev = spec.rsplit("@", 1)
        return name, rev or None
    return spec, None


def wrap_model(hf_model: Any, tokenizer: Any, *, name: str, revision: str | None = None,
               dtype: str | None = None, device: str | None = None, quantization: str | None = None,
               source: str = "", check: bool = True) -> ModelHandle:
    """Wrap an already-loaded transformers model (e.g. a tiny one built from a config)."""
    import nnsight

    adapter = adapter_for(hf_model.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    hf_model.eval()
    lm = nnsight.TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation", rename=dict(adapter.rename))
    param = next(hf_model.parameters())
    handle = ModelHandle(
        lm=lm,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name,
        revision=revision,
        dtype=dtype or str(param.dtype).removeprefix("torch."),
        device=device or str(param.device),
        quantization=quantization,
        source=source,
    )
    if check:
        check_adapter(handle)
    return handle


def _where_from(spec: str, revision: str | None, token: str | None) -> tuple[str, str, str, str | None, dict]:
    """``(name, source, load_from, revision, from_pretrained kwargs)`` for the built-in model, a ``.gguf``
    file, a saved model folder or a hub id."""
    name, source, load_from = spec, spec, spec
    kwargs: dict[str, Any] = {}
    path = Path(spec).expanduser()
    if builtin.is_builtin(spec):
        folder = builtin.ensure_cached()
        name, source, load_from = builtin.BUILTIN_HUB_ID, f"builtin:{builtin.GGUF_NAME}", str(folder)
        revision = revision or f"{builtin.WHEEL}=={builtin.WHEEL_VERSION}"
    elif path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        load_from, kwargs["gguf_file"] = str(path.parent), path.name
        name = path.name
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json; point --model at a saved transformers model")
        load_from = str(path)
        name = path.resolve().name
    else:
        kwargs.update(revision=revision, token=token)
    return name, source, load_from, revision, kwargs


def _from_pretrained(spec: str, load_from: str, kwargs: dict, token: str | None) -> tuple[Any, Any]:
    """The tokenizer and the transformers model; a failure becomes a :class:`ModelLoadError` without the token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision", "token")}
        tokenizer = AutoTokenizer.from_pretrained(load_from, **tok_kwargs)
        return tokenizer, AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        hint = ""
        if not Path(spec).expanduser().exists() and "/" in spec:
            hint = " (is the hub reachable, and is HF_TOKEN set for gated models?)"
        raise ModelLoadError(redact(f"could not load model {spec!r}{hint}: {e}", token)) from None


def load_model(
    spec: str = builtin.BUILTIN_NAME,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    quantize: str | None = None,
    token: str | None = None,
    remote: bool | str = False,
    check: bool = True,
) -> ModelHandle:
    """Load a model and wrap it with :class:`nnsight.TransformersModel`.

    Args:
        spec: built-in name (default), hub id (``org/name`` or ``org/name@revision``), local
            folder, ``.gguf`` file, or a key of ``config/models.json``.
        dtype: ``float32``/``bfloat16``/``float16``/``auto``. Defaults to float32 on CPU and
            bfloat16 on CUDA.
        device / device_map: ``cpu``, ``cuda``, ``cuda:1``...; ``device_map="auto"`` spreads a model
            over the available devices (accelerate).
        quantize: ``4bit`` (nf4) or ``8bit`` through bitsandbytes; works on CPU too.
        token: a Hugging Face token; defaults to ``HF_TOKEN`` or the config entry. Never logged.
        remote: ``True`` for NDIF, or a server URL: only the config and tokenizer are fetched.
    """
    configured = load_model_config().get(spec)
    if configured is not None:
        spec = configured.name
        revision = revision or configured.revision
        dtype = dtype or configured.dtype
        remote = remote or configured.remote
    token = resolve_token(token, configured)
    spec, spec_rev = _split_revision(spec)
    revision = revision or spec_rev
    if remote:
        return load_remote_model(spec, revision=revision, token=token, remote=remote)

    check_device(device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and device_map is None else "cpu"
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    torch_dtype = _torch_dtype(dtype)
    compute_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
    qconfig = _quantization_config(quantize, compute_dtype)

    name, source, load_from, revision, kwargs = _where_from(spec, revision, token)
    kwargs["dtype"] = torch_dtype
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs.setdefault("device_map", device_map or device)
    elif device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer, hf_model = _from_pretrained(spec, load_from, kwargs, token)
    if qconfig is None and device_map is None:
        hf_model.to(device)
    dtype_name = str(dtype) if not quantize else f"{quantize}/{str(compute_dtype).removeprefix('torch.')}"
    return wrap_model(hf_model, tokenizer, name=name, revision=revision, dtype=dtype_name,
                      device=str(device_map) if device_map else str(device), quantization=quantize, source=source,
                      check=check)


def store_slug(spec: str = builtin.BUILTIN_NAME, *, quantize: str | None = None, remote: bool | str = False) -> str:
    """The store folder (:attr:`ModelHandle.slug`) that :func:`load_model` with these arguments gives, found without
    loading anything, so that a busy folder or a conflicting stored result is reported before a long load. Exact
    for the built-in model, a local folder, a ``.gguf`` file and a hub id loaded here; for a hub id on NDIF the
    loaded handle carries the hub's spelling of the id, whose last part may differ (a renamed repository), in which
    case the run locks and checks the loaded model's folder after the load, as before."""
    configured = load_model_config().get(spec)
    if configured is not None:
        spec, remote = configured.name, remote or configured.remote
    spec, _ = _split_revision(spec)
    path = Path(spec).expanduser()
    if builtin.is_builtin(spec):
        name = builtin.BUILTIN_HUB_ID
    elif remote:  # the id NDIF knows it by where already looked up (no hub look-up here); no runtime quantization
        from nnsight.modeling.huggingface import _ID_CACHE

        return slug_of(_ID_CACHE.get(spec, spec))
    elif path.suffix == ".gguf":
        name = path.name
    elif path.is_dir():
        name = path.resolve().name
    else:
        name = spec
    return slug_of(name, None if remote else quantize)


def model_cache_info() -> dict[str, str]:
    """Where the built-in model's de-quantized copy lives."""
    return {"cache": str(builtin.cached_dir()), "exists": str(builtin.cached_dir().exists())}

