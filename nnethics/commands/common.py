"""The pieces every nnethics command shares: exit code 2 for bad input, and the model, prompt and store options.

``nnethics.cli`` and the command modules import from here (never the other way round)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DEFAULT_PROMPTS = "prompts"
DEFAULT_STORE = "store"


class BadInput(click.ClickException):
    """Bad user input: printed as ``Error: ...`` with exit code 2."""

    exit_code = 2


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from ..analyses.base import OptionError
    from ..framings import FramingError
    from ..models.adapters import UnsupportedArchitectureError
    from ..models.builtin import BuiltinModelMissing
    from ..models.loading import ModelLoadError
    from ..models.secrets import ConfigError
    from ..prompts import LabelTokenError, PromptError
    from ..store import StoreBusy, StoreConflict, StoreError

    return (OptionError, FramingError, PromptError, LabelTokenError, ConfigError, UnsupportedArchitectureError, BuiltinModelMissing, ModelLoadError,
            StoreBusy, StoreConflict, StoreError)


def _remote_errors() -> tuple[type[BaseException], ...]:
    from nnsight.intervention.backends.remote import RemoteError

    return (RemoteError,)


def friendly(fn: Callable) -> Callable:
    """Turn known bad-input exceptions into exit code 2 with a clear, secret-free message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..models.secrets import redact

        try:
            return fn(*args, **kwargs)
        except _bad_input_errors() as e:
            text = f"{e.flag}: {e.message}" if hasattr(e, "flag") else str(e)  # OptionError: name the CLI flag
            raise BadInput(redact(text)) from None
        except _remote_errors() as e:
            raise click.ClickException(redact(str(e))) from None

    return wrapper


def parse_labels(value: str) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in value.split(","))
    if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
        raise click.BadParameter(f"expected two different comma-separated labels like '1,2' or 'A,B', got {value!r}")
    return labels


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check --device names a device this machine has, before anything is read or loaded."""
    if value is None:
        return None
    from ..models.loading import ModelLoadError, check_device

    try:
        check_device(value)
    except ModelLoadError as e:
        raise BadInput(str(e)) from None
    return value


def checked_store(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """Check --store is (or can become) a writable folder, before anything is read or loaded; creates nothing."""
    from ..store import StoreError, check_store

    try:
        check_store(value)
    except StoreError as e:
        raise BadInput(str(e)) from None
    return value


def store_options(fn: Callable) -> Callable:
    """--store, --overwrite and --lock-timeout, for every command that writes results."""
    options = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path),
                     envvar="NNETHICS_STORE", show_envvar=True, callback=checked_store,
                     help="Output folder (created if missing)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace stored results (and parts of an interrupted run) computed with other options; "
                          "without it such a run stops with exit code 2 and changes nothing."),
        click.option("--lock-timeout", type=click.FloatRange(min=0), default=None, envvar="NNETHICS_LOCK_TIMEOUT",
                     show_envvar=True,
                     help="Seconds to wait while another run writes to the same model folder, then stop with exit "
                          "code 2 (0: stop at once; default: wait until it is done)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def model_options(fn: Callable | None = None, *, multiple: bool = False) -> Callable:
    if fn is None:
        return functools.partial(model_options, multiple=multiple)
    options = [
        click.option("--model", "model_spec", default=("smollm2-135m-instruct",) if multiple else "smollm2-135m-instruct",
                     show_default=True, multiple=multiple,
                     help="Built-in name, hub id (org/name[@revision]), local folder, .gguf file or config/models.json key."
                     + (" Repeat for several models: each is loaded, analysed and unloaded in turn." if multiple else "")),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--device-map", default=None, help="accelerate device map, e.g. 'auto' for models larger than one device."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
                     help="Weights dtype (default: float32 on CPU, bfloat16 on CUDA)."),
        click.option("--quantize", type=click.Choice(["4bit", "8bit"]), default=None, help="bitsandbytes quantization."),
        click.option("--remote/--local", default=False, envvar="NNETHICS_REMOTE", show_envvar=True,
                     help="Run on NDIF (key from NDIF_API_KEY)."),
        click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True, show_default=False,
                     help="Hugging Face token (never printed or stored)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def prompt_options(fn: Callable) -> Callable:
    options = [
        click.option("--prompts", "prompts_path", default=DEFAULT_PROMPTS, show_default=True, type=click.Path(path_type=Path),
                     help="Folder with base_prompts.json + counterfactual_prompts.json, a .jsonl file or a MoralChoice .csv file."),
        click.option("--labels", default="1,2", show_default=True, callback=lambda c, p, v: parse_labels(v),
                     help="The two answer labels."),
        click.option("--chat/--no-chat", default=None, help="Wrap prompts in the chat template (default: when the tokenizer has one)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def load_model_from_options(model_spec: str, revision, device, device_map, dtype, quantize, remote, token) -> Any:
    from ..models import load_model

    click.echo(f"loading model {model_spec} ...", err=True)
    return load_model(model_spec, revision=revision, device=device, device_map=device_map, dtype=dtype,
                      quantize=quantize, remote=remote, token=token)


def load_prompt_set(path: Path, labels, limit):
    from ..prompts import load_prompts

    ps = load_prompts(path, labels)
    ps = ps.subset(limit=limit) if limit else ps
    for _, warning in ps.warnings:
        click.echo(f"warning: {warning}", err=True)
    return ps
