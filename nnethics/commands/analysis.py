"""Commands generated from the analysis registry: each analysis' click options come from its ``Options`` fields.

``nnethics patch``, ``nnethics attribute``, ``nnethics decisions`` and ``nnethics lens run`` are all
:func:`analysis_command` of their :class:`~nnethics.analyses.base.Analysis`; ``nnethics run --analyses`` takes
its choices from the registry when it parses (so an analysis registered later is offered too).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from ..analyses.base import ANALYSES, Analysis, OptionSpec, analyses, option_fields
from .common import (
    FiniteFloat,
    before_loading,
    friendly,
    load_model_from_options,
    load_prompt_set,
    model_options,
    prompt_options,
    store_options,
)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``tuple[str, ...]`` stays as is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _parser(spec: OptionSpec) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return spec.parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return convert


def click_option(f: dataclasses.Field, spec: OptionSpec, tp: Any, unset: str | None = None) -> Callable:
    """The click option of one Options field, its default the field's (in the option's text form where it has a
    parser, so ``--help`` shows it as typed); ``unset``: default None instead, and this text after the help (a run
    flag: the analysis keeps its own default)."""
    flag = "--" + f.name.replace("_", "-")
    base, _ = _base_type(tp)
    text_form = spec.parse is not None and f.default is not None and unset is None
    default = None if unset is not None else f.default
    kw: dict[str, Any] = {"default": _shown(default) if text_form else default,
                          "help": spec.help if unset is None else f"{spec.help} {unset}",
                          "metavar": spec.metavar, "show_default": default is not None}
    if base is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, **kw)
    if spec.parse is not None:
        return click.option(flag, f.name, type=str, callback=_parser(spec), **kw)
    if spec.choices is not None and base is str:
        return click.option(flag, f.name, type=click.Choice(spec.choices), **kw)
    if base is int and (spec.min, spec.max) == (None, None):
        return click.option(flag, f.name, type=int, **kw)
    if base is int:
        return click.option(flag, f.name, type=click.IntRange(min=spec.min, max=spec.max), **kw)
    if base is float:  # finite unless the field declares otherwise (one rule with check_values)
        kind = FiniteFloat if spec.finite else click.FloatRange
        return click.option(flag, f.name, type=kind(min=spec.min, max=spec.max, min_open=spec.min_open), **kw)
    if base is str:
        return click.option(flag, f.name, type=str, **kw)
    raise TypeError(f"{f.name}: no CLI syntax for {tp}; give the option a parse=")


def options_decorator(analysis: Analysis) -> Callable:
    """Every CLI field of the analysis' Options as click options."""
    opts = [click_option(f, spec, tp) for f, spec, tp in option_fields(analysis.options) if spec.cli]

    def apply(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


def run_flags(fn: Callable) -> Callable:
    """The Options fields the registered analyses offer to ``nnethics run`` (``Analysis.run_flags``: patching's
    ``--atp``), each a click option whose default (None) leaves the analysis' own; two analyses offering one name is
    a TypeError."""
    owners: dict[str, str] = {}
    for analysis in analyses():
        fields = {f.name: (f, spec, tp) for f, spec, tp in option_fields(analysis.options)}
        for name in analysis.run_flags:
            if name in owners or name not in fields:
                raise TypeError(f"analysis {analysis.name!r}: run flag {name!r} is " + (
                    f"offered by {owners[name]!r} already" if name in owners else "not one of its Options fields"))
            owners[name] = analysis.name
            flag = "--" + name.replace("_", "-")
            fn = click_option(*fields[name], unset=f"(The {analysis.name} analysis; default: its own, as "
                                                   f"`nnethics {analysis.command or analysis.name}`'s {flag}.)")(fn)
    return fn


class FlagsCommand(click.Command):
    """A command whose options end with the run flags of every analysis registered when it runs (:func:`run_flags`;
    a plug-in registered after ``nnethics.cli`` was imported included), before ``--help``."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        return params[:-1] + flag_params() + params[-1:]


def flag_params() -> list[click.Parameter]:
    """The click options :func:`run_flags` makes, in declaration order."""
    holder = run_flags(lambda: None)
    return list(reversed(getattr(holder, "__click_params__", [])))


def flag_overrides(flags: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The run flags given (not None), by the analysis that owns them: ``{"patching": {"atp": True}}``; None when
    none is given."""
    out = {a.name: {k: flags[k] for k in a.run_flags if flags.get(k) is not None} for a in analyses()}
    return {k: v for k, v in out.items() if v} or None


def run_options(fn: Callable) -> Callable:
    """--batch-size and --progress, for every command that computes over the prompts."""
    fn = click.option("--progress/--no-progress", default=None,
                      help="Progress on stderr (default: when stderr is a terminal; with --progress and stderr "
                           "redirected, one line with count and ETA at most every 30 s).")(fn)
    return click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                        help="Pairs per chunk (halved on out-of-memory).")(fn)


def analysis_command(analysis: Analysis, name: str | None = None) -> click.Command:
    """The command that runs ``analysis`` alone with every one of its options."""
    fields = [f.name for f, spec, _ in option_fields(analysis.options) if spec.cli]

    @model_options
    @prompt_options
    @options_decorator(analysis)
    @store_options
    @run_options
    @friendly
    def command(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat,
                limit, store, overwrite, lock_timeout, batch_size, progress, **values) -> None:
        from ..engine import Run, make_context

        # OptionError on a bad mix, before anything is loaded
        options = analysis.make_options(None, labels=tuple(labels), chat=chat, **{k: values[k] for k in fields})
        prompts = load_prompt_set(prompts_path, labels, limit)
        out = analysis.name_for(options)
        with before_loading(store, model_spec, quantize, remote, lock_timeout, prompts, {out: (analysis, options)},
                            overwrite):
            model = load_model_from_options(model_spec, revision, device, device_map, dtype, quantize, remote, token)
        ctx = make_context(model, prompts, chat)
        with Run(model, store, overwrite=overwrite, lock_timeout=lock_timeout, batch_size=batch_size,
                 progress=progress, note=lambda text: click.echo(f"note: {text}", err=True)) as run:
            path, summary = run.one(out, prompts, ctx, options)
        click.echo(f"{out}: {path}")
        if summary:
            click.echo(f"  {summary}")

    command.__doc__ = analysis.help
    return click.command(name or analysis.command or analysis.name)(command)


class AnalysisNames(click.ParamType):
    """A comma-separated list of registered analysis names; the choices are read from the registry when parsing."""

    name = "analyses"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(dict.fromkeys(x.strip() for x in str(value).split(",") if x.strip()))
        known = list(ANALYSES)
        bad = [n for n in names if n not in ANALYSES]
        if bad or not names:
            self.fail(f"unknown analyses {', '.join(map(repr, bad)) or repr(value)}; choose from {', '.join(known)} "
                      "(comma-separated)", param, ctx)
        return names

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "NAME[,NAME...]"

