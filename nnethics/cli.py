"""The ``nnethics`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .analyses import default_names, file_names
from .commands.analysis import AnalysisNames, FlagsCommand, analysis_command, flag_overrides, run_options
from .commands.common import (
    BadInput,
    before_loading,
    friendly,
    load_model_from_options,
    load_prompt_set,
    model_options,
    parse_labels,
    prompt_options,
    store_options,
)
from .commands.envvars import epilog


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=epilog())
@click.version_option(__version__, prog_name="nnethics")
def cli() -> None:
    """nnethics: where and how a language model decides an ethical dilemma."""


@cli.command(cls=FlagsCommand)
@model_options(multiple=True)
@prompt_options
@store_options
@run_options
@click.option("--analyses", type=AnalysisNames(), default=None,
              help="Comma-separated analyses to run, each with its default options (default: "
                   f"{', '.join(default_names())}; any of: {', '.join(file_names())}).")
@click.option("--framings", default=None, metavar="SPEC",
              help="Run the analyses in these framings (template.labels.order) of the structured pairs, plus the cloze "
                   "readout and the verdict across framings: 'default', 'all' (4 templates x 3 label sets x 2 orders), "
                   "'binding' (the content swap and the label swap), or a comma-separated list of ids, '*' allowed "
                   "(e.g. 'moralchoice.*.*'). Writes STORE/<model>/framings/<id>/, cloze.nc and framings.nc.")
@click.option("--templates", "templates_path", default=None, type=click.Path(path_type=Path),
              help="A JSON file {name: template text} of extra templates for --framings (placeholders {scenario}, "
                   "{option_1}, {option_2}, {label_1}, {label_2}; optional {label_a}, {label_b}, {question}).")
@click.option("--per-request", type=click.IntRange(min=1), default=1, show_default=True,
              help="Chunks of --batch-size pairs per NDIF request for the analyses that share a trace (each chunk is "
                   "still stored as its own part, so a failed request loses only its chunks). Fewer requests wait "
                   "fewer times in NDIF's queue; locally it changes nothing.")
@friendly
def run(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat, limit,
        store, overwrite, lock_timeout, batch_size, analyses, framings, templates_path, per_request,
        progress, **flags) -> None:
    """Run the analyses on a model and a prompt set; write NetCDF files under STORE/<model>/."""
    from .analyses import ANALYSES
    from .engine import Run
    from .models.registry import ModelRegistry
    from .models.remote import STATS

    wanted = list(analyses or default_names())
    prompts = load_prompt_set(prompts_path, labels, limit)
    chosen = _chosen_framings(framings, templates_path, prompts)
    registry = ModelRegistry()
    # the stored files' options, checked before each load (without --framings: those write other folders)
    overrides = flag_overrides(flags)  # {analysis: {field: value}} of the run flags given (patching's --atp)
    early = None if chosen else {n: (ANALYSES[n], ANALYSES[n].make_options(
        n, labels=tuple(prompts.labels), chat=chat, **(overrides or {}).get(n, {}))) for n in wanted}
    for spec in model_spec:
        with before_loading(store, spec, quantize, remote, lock_timeout, prompts, early, overwrite):
            model = registry.add(spec, load_model_from_options(spec, revision, device, device_map, dtype, quantize,
                                                               remote, token))
        STATS.reset()
        # One writer per model folder for the whole run: the analyses and the report that reads them.
        with Run(model, store, overwrite=overwrite, lock_timeout=lock_timeout, batch_size=batch_size,
                 progress=progress, per_request=per_request,
                 note=lambda text: click.echo(f"note: {text}", err=True)) as r:
            if chosen:
                from .framings_run import run_framings

                results = run_framings(r, prompts, chosen, wanted, chat, overrides)
            else:
                results = r.analyses(prompts, wanted, chat, overrides)
            _print_results(results, Path(store) / model.slug)
            if model.remote:
                click.echo(STATS.report(n_pairs=len(prompts) * max(1, len(chosen))), err=True)
            _finish_store(Path(store) / model.slug)
            if chosen:
                _print_framings(Path(store) / model.slug)
            else:
                _print_verdict(Path(store) / model.slug)
        if len(model_spec) > 1:
            info = registry.memory_info()
            registry.unload(spec)
            after = registry.memory_info()
            click.echo(f"unloaded {spec}: process memory {info['rss_bytes'] / 2**20:.0f} MiB -> "
                       f"{after['rss_bytes'] / 2**20:.0f} MiB", err=True)


def _print_results(results: dict, model_dir: Path) -> None:
    """Each file and its summary line; a framed run's per-framing files in one line per framing (the lines that
    compare the framings come after, from framings.nc)."""
    framed: dict[str, list[str]] = {}
    for name, (path, summary) in results.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "framings":
            framed.setdefault(parts[1], []).append(parts[2])
            continue
        click.echo(f"{name}: {path}")
        if summary:
            click.echo(f"  {summary}")
    if framed:
        click.echo(f"{len(framed)} framing(s) in {model_dir / 'framings'}/<id>/: "
                   f"{', '.join(dict.fromkeys(n for names in framed.values() for n in names))} each")


def _chosen_framings(spec: str | None, templates_path: Path | None, prompts) -> list:
    """The framings --framings names, checked with the prompts before the model loads ([] without --framings)."""
    if spec is None:
        if templates_path is not None:
            raise BadInput("--templates: given without --framings; name the framings to run, e.g. --framings "
                           "'mine.*.*' for a template named mine")
        return []
    from .framings import load_templates, select
    from .framings_run import prepare

    chosen = select(spec, load_templates(templates_path) if templates_path is not None else None)
    _, free = prepare(prompts, chosen)
    if free:
        click.echo(f"note: {len(free)} of {len(prompts)} pairs are free text (no scenario and options: "
                   f"{', '.join(free[:3])}{', ...' if len(free) > 3 else ''}); they have only their own framing and "
                   "are left out of --framings", err=True)
    return chosen


def _print_framings(model_dir: Path) -> None:
    """The decision across framings (framings.nc): a line per framing, pooled, cloze, then its verdict."""
    import xarray as xr

    from .framings_verdict import summary_lines
    from .verdict import wrap

    path = model_dir / "framings.nc"
    if not path.exists():
        return
    ds = xr.load_dataset(path)
    click.echo(f"across framings ({path}):")
    for line in summary_lines(ds):
        click.echo(f"  {line}")
    text = ds.attrs.get("framings_verdict")
    if text:
        click.echo(f"verdict across framings:\n{wrap(str(text))}")


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
    """Write the HTML report for a model's store."""
    from .commands.report import warn_unreadable
    from .render.report import write_report

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
@click.option("--labels", default="1,2", show_default=True, callback=lambda c, p, v: parse_labels(v))
@friendly
def prompts_check(path: Path, labels) -> None:
    """Validate a prompt set and summarise it."""
    from collections import Counter

    ps = load_prompt_set(path, labels, None)
    cats = Counter(p.category or "(none)" for p in ps.pairs)
    click.echo(f"{path}: {len(ps)} valid pairs, sha256 {ps.sha256[:12]}")
    for cat, n in sorted(cats.items()):
        click.echo(f"  {cat}: {n}")
    structured = sum(p.dilemma is not None for p in ps.pairs)
    click.echo(f"structured: {structured} (carry scenario and options: run in every framing)")
    click.echo(f"free text: {len(ps) - structured} (run only in their own framing)")


@cli.command()
@model_options
@prompt_options
@friendly
def tokens(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat, limit) -> None:
    """Tokenization diagnostics: how the labels and prompts tokenize for a model."""
    from .prompts import tokenization_report

    ps = load_prompt_set(prompts_path, labels, limit)
    model = load_model_from_options(model_spec, revision, device, device_map, dtype, quantize, remote, token)
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


def _add_commands() -> None:
    """One command per registered analysis (generated from its Options), the commands the analyses declare beyond
    (``Analysis.commands``: lens' group), then the report commands."""
    import importlib

    from .analyses import analyses
    from .commands import report

    for analysis in analyses():
        if " " not in (analysis.command or analysis.name):
            cli.add_command(analysis_command(analysis))
        for module in analysis.commands:
            importlib.import_module(module).register(cli)
    report.register(cli)


_add_commands()


def main() -> None:
    cli(prog_name="nnethics")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

