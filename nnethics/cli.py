"""The ``nnethics`` command line."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__

DEFAULT_PROMPTS = "prompts"
DEFAULT_STORE = "store"


class BadInput(click.ClickException):
    """Bad user input: printed as ``Error: ...`` with exit code 2."""

    exit_code = 2


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .models.adapters import UnsupportedArchitectureError
    from .models.builtin import BuiltinModelMissing
    from .models.loading import ModelLoadError
    from .models.secrets import ConfigError
    from .prompts import LabelTokenError, PromptError
    from .store import StoreConflict, StoreError
    from .storelock import StoreBusy

    return (PromptError, LabelTokenError, ConfigError, UnsupportedArchitectureError, BuiltinModelMissing, ModelLoadError,
            StoreBusy, StoreConflict, StoreError)


def _remote_errors() -> tuple[type[BaseException], ...]:
    from nnsight.intervention.backends.remote import RemoteError

    return (RemoteError,)


def friendly(fn: Callable) -> Callable:
    """Turn known bad-input exceptions into exit code 2 with a clear, secret-free message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .models.secrets import redact

        try:
            return fn(*args, **kwargs)
        except _bad_input_errors() as e:
            raise BadInput(redact(str(e))) from None
        except _remote_errors() as e:
            raise click.ClickException(redact(str(e))) from None

    return wrapper


def _labels(value: str) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in value.split(","))
    if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
        raise click.BadParameter(f"expected two different comma-separated labels like '1,2' or 'A,B', got {value!r}")
    return labels


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check --device names a device this machine has, before anything is read or loaded."""
    if value is None:
        return None
    from .models.loading import ModelLoadError, check_device

    try:
        check_device(value)
    except ModelLoadError as e:
        raise BadInput(str(e)) from None
    return value


def checked_store(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """Check --store is (or can become) a writable folder, before anything is read or loaded; creates nothing."""
    from .store import StoreError, check_store

    try:
        check_store(value)
    except StoreError as e:
        raise BadInput(str(e)) from None
    return value


def store_options(fn: Callable) -> Callable:
    """--store, --overwrite and --lock-timeout, for every command that writes results."""
    options = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path),
                     callback=checked_store, help="Output folder (created if missing)."),
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
                     help="Folder with base_prompts.json + counterfactual_prompts.json, or a .jsonl file."),
        click.option("--labels", default="1,2", show_default=True, callback=lambda c, p, v: _labels(v),
                     help="The two answer labels."),
        click.option("--chat/--no-chat", default=None, help="Wrap prompts in the chat template (default: when the tokenizer has one)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _load(model_spec: str, revision, device, device_map, dtype, quantize, remote, token) -> Any:
    from .models import load_model

    click.echo(f"loading model {model_spec} ...", err=True)
    return load_model(model_spec, revision=revision, device=device, device_map=device_map, dtype=dtype,
                      quantize=quantize, remote=remote, token=token)


def _prompts(path: Path, labels, limit):
    from .prompts import load_prompts

    ps = load_prompts(path, labels)
    ps = ps.subset(limit=limit) if limit else ps
    for _, warning in ps.warnings:
        click.echo(f"warning: {warning}", err=True)
    return ps


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nnethics")
def cli() -> None:
    """nnethics: where and how a language model decides an ethical dilemma."""


@cli.command()
@model_options(multiple=True)
@prompt_options
@store_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Pairs per batch (halved on out-of-memory).")
@click.option("--analyses", default=None,
              help="Comma-separated analyses to run (default: all: decisions, patching, attribution, lens).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@friendly
def run(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat, limit,
        store, overwrite, lock_timeout, batch_size, analyses, progress) -> None:
    """Run the analyses on a model and a prompt set; write NetCDF files under STORE/<model>/."""
    from .models.registry import ModelRegistry
    from .models.remote import STATS
    from .pipeline import ANALYSES, DEFAULT_ANALYSES, run_all
    from .storelock import store_lock

    wanted = [a.strip() for a in analyses.split(",") if a.strip()] if analyses else list(DEFAULT_ANALYSES)
    unknown = [a for a in wanted if a not in ANALYSES]
    if unknown:
        raise BadInput(f"unknown analyses {unknown}; choose from {sorted(ANALYSES)}")
    prompts = _prompts(prompts_path, labels, limit)
    registry = ModelRegistry()
    for spec in model_spec:
        model = registry.add(spec, _load(spec, revision, device, device_map, dtype, quantize, remote, token))
        STATS.reset()
        # One writer per model folder for the whole run: the analyses and the report that reads them.
        with store_lock(Path(store) / model.slug, timeout=lock_timeout):
            results = run_all(model, prompts, store=str(store), analyses=wanted, chat=chat, batch_size=batch_size,
                              progress=progress, overwrite=overwrite, lock_timeout=lock_timeout)
            for name, (path, summary) in results.items():
                click.echo(f"{name}: {path}")
                if summary:
                    click.echo(f"  {summary}")
            if model.remote:
                click.echo(STATS.report(n_pairs=len(prompts)), err=True)
            _finish_store(Path(store) / model.slug)
            _print_verdict(Path(store) / model.slug)
        if len(model_spec) > 1:
            info = registry.memory_info()
            registry.unload(spec)
            after = registry.memory_info()
            click.echo(f"unloaded {spec}: process memory {info['rss_bytes'] / 2**20:.0f} MiB -> "
                       f"{after['rss_bytes'] / 2**20:.0f} MiB", err=True)


def _print_verdict(model_dir: Path) -> None:
    """The verdict stored in the model's ``decisions.nc`` (the last thing a run prints)."""
    import xarray as xr

    from .verdict import wrap

    path = model_dir / "decisions.nc"
    if not path.exists():
        return
    with xr.open_dataset(path) as ds:
        text = ds.attrs.get("verdict")
    if text:
        click.echo(f"verdict ({path}):\n{wrap(str(text))}")


def _finish_store(model_dir: Path) -> None:
    """Write the HTML report for a model's store when the render layer is available."""
    try:
        from .render.report import write_report
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("nnethics.render"):
            return
        raise
    from .commands.report import warn_unreadable

    warn_unreadable(model_dir)
    path = write_report(model_dir)
    click.echo(f"report: {path}")


@cli.command()
@friendly
def models() -> None:
    """List the built-in model, configured models and supported architectures."""
    from .models import supported_families
    from .models.builtin import BUILTIN_HUB_ID, BUILTIN_NAME, INSTALL_HINT, cached_dir, gguf_path
    from .models.secrets import config_path, load_model_config

    try:
        where = str(gguf_path())
    except Exception:  # noqa: BLE001
        where = f"not installed ({INSTALL_HINT})"
    click.echo(f"built-in: {BUILTIN_NAME} ({BUILTIN_HUB_ID})\n  gguf: {where}\n  cache: {cached_dir()}")
    configured = load_model_config()
    click.echo(f"configured ({config_path()}): {len(configured)}")
    for key, m in configured.items():
        click.echo(f"  {key}: {m.name}{'@' + m.revision if m.revision else ''} token={'set' if m.token else 'none'}")
    click.echo("supported architectures:")
    for fam in supported_families():
        click.echo(f"  {fam}")


@cli.group()
def prompts() -> None:
    """Prompt-set tools."""


@prompts.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--labels", default="1,2", show_default=True, callback=lambda c, p, v: _labels(v))
@friendly
def prompts_check(path: Path, labels) -> None:
    """Validate a prompt set and summarise it."""
    from collections import Counter

    ps = _prompts(path, labels, None)
    cats = Counter(p.category or "(none)" for p in ps.pairs)
    click.echo(f"{path}: {len(ps)} valid pairs, sha256 {ps.sha256[:12]}")
    for cat, n in sorted(cats.items()):
        click.echo(f"  {cat}: {n}")


@cli.command()
@model_options
@prompt_options
@friendly
def tokens(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat, limit) -> None:
    """Tokenization diagnostics: how the labels and prompts tokenize for a model."""
    from .prompts import tokenization_report

    ps = _prompts(prompts_path, labels, limit)
    model = _load(model_spec, revision, device, device_map, dtype, quantize, remote, token)
    click.echo(tokenization_report(model.tokenizer, ps, chat))


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@friendly
def show(path: Path) -> None:
    """Summarise a stored NetCDF file (or every file of a model folder)."""
    from .store import summarize

    files = sorted(path.glob("*.nc")) if path.is_dir() else [path]
    if not files:
        raise BadInput(f"{path}: no .nc files here; pass a file or a store/<model> folder")
    for f in files:
        try:
            click.echo(summarize(f))
        except (OSError, ValueError) as e:
            raise BadInput(f"{f}: not a readable NetCDF file ({e})") from None
        click.echo()


# Analysis-specific commands live in their own modules; each exposes ``register(cli)``.
for _name in ("patch", "attribute", "lens", "report"):
    try:
        _module = importlib.import_module(f"nnethics.commands.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"nnethics.commands.{_name}":
            raise
        continue
    _module.register(cli)


def main() -> None:
    cli(prog_name="nnethics")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

