"""The pieces every nnethics command shares: exit code 2 for bad input, and the model, prompt and store options.

``nnethics.cli`` and the command modules import from here (never the other way round)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

DEFAULT_PROMPTS = "prompts"
DEFAULT_STORE = "store"


class BadInput(click.ClickException):
    """Bad user input: printed as ``Error: ...`` with exit code 2."""

    exit_code = 2


REMOTE_EXIT_CODE = 3
"""The exit code of a remote (NDIF) request that failed on the server's side or never got through (unreachable
after every attempt, timed out, refused): neither a crash (1) nor bad input (2), so a script can retry later."""


class RemoteFailure(click.ClickException):
    """A remote request that failed: printed as ``Error: ...`` with exit code :data:`REMOTE_EXIT_CODE`."""

    exit_code = REMOTE_EXIT_CODE


class FiniteFloat(click.FloatRange):
    """click's ``FloatRange`` that refuses NaN and ±inf as well: every numeric CLI option uses it (one rule with
    :mod:`nnethics.numbers`). click's own lets ``nan`` through any bound, as every comparison with NaN is false."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; give a number {self._describe_range()}"
                      if self.min is not None or self.max is not None else
                      f"{value!r} is not a finite number; give a number like 0.5", param, ctx)
        return super().convert(number, param, ctx)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from ..analyses.base import OptionError
    from ..framings import FramingError
    from ..models.adapters import UnsupportedArchitectureError
    from ..models.builtin import BuiltinModelMissing
    from ..models.loading import ModelLoadError
    from ..models.secrets import ConfigError
    from ..numbers import NumberError
    from ..prompts import LabelTokenError, PromptError
    from ..store import StoreBusy, StoreConflict, StoreError

    return (OptionError, FramingError, PromptError, LabelTokenError, ConfigError, UnsupportedArchitectureError, BuiltinModelMissing, ModelLoadError,
            StoreBusy, StoreConflict, StoreError, NumberError)


def _remote_errors() -> tuple[type[BaseException], ...]:
    from nnsight.intervention.backends.remote import RemoteError

    return (RemoteError,)


def _remote_failure(e: BaseException, text: str) -> click.ClickException:
    """A failed remote request as the CLI reports it: a rejected key is bad input (2), a failure of the code inside
    the trace a crash (1), anything else (NDIF unreachable or silent after every attempt, a refused request) exit
    code :data:`REMOTE_EXIT_CODE` (3)."""
    from ..models.remote.errors import RemoteAuthError, RemoteExecutionError

    if isinstance(e, RemoteAuthError):
        return BadInput(text)
    if isinstance(e, RemoteExecutionError):
        return click.ClickException(text)
    return RemoteFailure(text)


def friendly(fn: Callable) -> Callable:
    """Turn known bad-input exceptions into exit code 2, and failed remote requests into exit code
    :data:`REMOTE_EXIT_CODE` (3), each with a clear, secret-free message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..models.secrets import redact

        try:
            return fn(*args, **kwargs)
        except _bad_input_errors() as e:
            text = f"{e.flag}: {e.message}" if hasattr(e, "flag") else str(e)  # OptionError: name the CLI flag
            raise BadInput(redact(text)) from None
        except _remote_errors() as e:
            raise _remote_failure(e, redact(str(e))) from None

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


def _remote(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """With --remote, check the NDIF retry settings (NNETHICS_NDIF_*) before anything is read or loaded."""
    if value:
        from ..models.remote.settings import RetryPolicy
        from ..numbers import NumberError

        try:
            RetryPolicy.from_env()
        except NumberError as e:
            raise BadInput(str(e)) from None
    return value


def checked_store(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    """Check --store is (or can become) a writable folder, before anything is read or loaded; creates nothing."""
    from ..store import StoreError, check_store

    if not str(value).strip():  # Path("") is ".": the results would land in the current folder
        raise BadInput(f"--store {value!r}: is empty; pass a folder name like {DEFAULT_STORE} (it is created if missing)")
    value = Path(value)
    try:
        check_store(value)
    except StoreError as e:
        raise BadInput(str(e)) from None
    return value


def store_options(fn: Callable) -> Callable:
    """--store, --overwrite and --lock-timeout, for every command that writes results."""
    options = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, type=click.Path(),  # a Path in checked_store
                     envvar="NNETHICS_STORE", show_envvar=True, callback=checked_store,
                     help="Output folder (created if missing)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace stored results (and parts of an interrupted run) computed with other options; "
                          "without it such a run stops with exit code 2 and changes nothing."),
        click.option("--lock-timeout", type=FiniteFloat(min=0), default=None, envvar="NNETHICS_LOCK_TIMEOUT",
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
        click.option("--remote/--local", default=False, envvar="NNETHICS_REMOTE", show_envvar=True, callback=_remote,
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


@contextlib.contextmanager
def before_loading(store: Path, spec: str, quantize: str | None, remote: bool | str, lock_timeout: float | None,
                   prompts: Any = None, wanted: dict | None = None, overwrite: bool = False) -> Iterator[None]:
    """Around the load of model ``spec``: first its store folder (found from the spec) is checked, so that a busy
    folder (waited for, or refused with --lock-timeout 0: held while the model loads) and a stored result of other
    options (``wanted``: ``{file name: (analysis, options)}``) are reported before a long load, not after it."""
    from ..models.loading import store_slug
    from ..store.early import early_conflicts, early_lock

    for analysis, options in (wanted or {}).values():  # options the pairs rule out (steer's folds), first
        if analysis.check_pairs is not None and prompts is not None:
            analysis.check_pairs(options, prompts.pairs)
    folder = Path(store) / store_slug(spec, quantize=quantize, remote=remote)
    with early_lock(folder, lock_timeout):
        if wanted:
            early_conflicts(folder, wanted, prompts, overwrite)
        yield


def load_model_from_options(model_spec: str, revision, device, device_map, dtype, quantize, remote, token) -> Any:
    from ..models import load_model
    from ..models.builtin import check_cache, is_builtin
    from ..models.secrets import load_model_config

    configured = load_model_config().get(model_spec)  # NNETHICS_CONFIG naming no file: one line, not a hub look-up
    if is_builtin(configured.name if configured else model_spec):
        check_cache()  # NNETHICS_CACHE a file or read-only: one line before the model loads
    click.echo(f"loading model {model_spec} ...", err=True)
    return load_model(model_spec, revision=revision, device=device, device_map=device_map, dtype=dtype,
                      quantize=quantize, remote=remote, token=token)


def load_prompt_set(path: Path, labels, limit):
    from ..prompts import load_prompts

    ps = load_prompts(path, labels)
    ps = ps.subset(limit=limit) if limit else ps
    for pid, warning in ps.warnings:
        click.echo(f"{'warning' if pid else 'note'}: {warning}", err=True)  # pid "": a note on the input as a whole
    return ps
