"""The ``Analysis`` object: one per technique, the single source of truth about it.

An analysis declares, once:

* its ``name`` (the file ``store/<model>/<name>.nc``) and its ``variants``: other file names for fixed
  option values (patching's ``patching_grid`` is ``positions="grid"``);
* a frozen ``Options`` dataclass whose fields are declared with :func:`option` (default, help, choices,
  bounds, parser). The click options of its command and of ``nnethics run`` are generated from those
  fields (as tuned-lens generates its CLI from dataclasses), and every field lands in provenance
  (:meth:`Analysis.record`), so an option exists once in the code;
* how a chunk of pairs (dim ``prompt``) is computed, one of both: ``shares(model, options, prepared) ->
  SharedReads | None``, what the analysis reads from the chunk's **shared trace** of the base and counterfactual
  rows (and which extra rows it runs after it), or None where these options need a forward of its own; and
  ``compute(model, pairs, options, label_ids=None, **prepared) -> xr.Dataset``, that forward of its own. The
  engine (:mod:`nnethics.engine`) plans ONE trace per chunk (one request remotely) from the declarations of every
  analysis of a run, so analyses compose without knowing each other, and alone and together give the same bits.
  Compute code returns data and never prints; an analysis never imports the engine;
* optional ``prepare(model, options) -> Prepared``: what is resolved once per run with the model at hand (the
  tuned lens to use): ``values`` passed to every chunk, ``recorded`` in provenance, ``notes`` for the terminal;
  and optional ``resume(prepared, done)``: a resumed run tells it the Datasets it finds done (heads' running
  ranking starts from them);
* optional ``check(model, options)``: option values the model rules out (a layer it does not have), raised
  as :class:`OptionError` before any prompt runs; and optional ``check_pairs(options, pairs)``: option values the
  pairs rule out (steer's folds need 2 training pairs each), raised before the model loads;
* ``summarize(ds) -> str`` (one line for the terminal) and optional ``finalize(ds)`` (cross-prompt
  statistics, once, after the chunks are consolidated);
* optional ``complete(model, ds, pairs, options, label_ids=None, batch_size=8, **prepared) -> ds``: a pass over
  the pairs once ``finalize`` has run, for what only the cross-prompt statistics decide (heads: the attention of
  the top heads), in its own chunks of ``batch_size`` pairs (one request each remotely); the file is written
  after it, so a crash before it keeps the parts and a rerun redoes only this pass;
* ``render``: the modules of its report sections (each with ``SECTION`` and ``figures(ds, prompts)``, and
  ``variant_figures(ds, name)`` for the variants' files), and ``tables``: the export tables it owns
  (``tables(name, ds, data) -> {file stem: build() -> DataFrame | list of records}``, ``name`` the file's name,
  ``data`` every file of the store);
* what it writes and offers beyond its own command: ``variables`` (each variable's CF ``long_name`` and ``units``,
  added to the store's table by :func:`register`), ``compare`` (a module with ``compare_figures(stores,
  relative)`` for ``nnethics compare``), ``commands`` (modules with ``register(cli)``: lens' ``train``/``eval``),
  ``run_flags`` (Options fields that ``nnethics run`` offers too: patching's ``--atp``) and ``functions`` (its
  functions of the Python API, ``ne.activation_patching``: :class:`Function`).

Every hook is checked when the declaration is built (:func:`check_hooks`): one that cannot take the arguments the
engine passes fails there, as an abstract method left out fails when an ABC subclass is instantiated.

:data:`ANALYSES` is the registry: ``nnethics run --analyses``, the commands, the runner, the report, ``compare``
and ``export`` all read it. :func:`register` adds one (a module in ``nnethics/analyses`` registers itself at
import; a test or a plug-in may register its own). This module and the analysis declarations import no torch:
compute code imports its engines when it runs, so the report and ``import nnethics`` stay light.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import xarray as xr

SHARED = ("labels", "chat")  # fields every Options has; set from the prompt options (--labels, --chat)


class OptionError(ValueError):
    """An option value that cannot work; ``field`` names the Options field (the CLI shows ``--field-name``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.field = name
        self.message = message

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class OptionSpec:
    """What :func:`option` stores in a field's metadata (key ``"nnethics"``)."""

    help: str
    choices: tuple[str, ...] | None = None  # allowed values (for a tuple field: of each element)
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    parse: Callable[[str], Any] | None = None  # the text syntax of the option (e.g. parse_layers)
    metavar: str | None = None
    cli: bool = True  # False: API-only (a test keeps the list of those short and justified)
    finite: bool = True  # False: NaN and ±inf are allowed values (no field needs that today)


def option(default: Any, help: str, *, choices: Sequence[str] | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, cli: bool = True, finite: bool = True) -> Any:
    """A field of an analysis' ``Options`` dataclass, with what its CLI option and its validation need. A number
    must be finite (no NaN, no ±inf) unless ``finite=False``, then within ``min``/``max``."""
    spec = OptionSpec(help=help, choices=tuple(choices) if choices is not None else None, min=min, max=max,
                      min_open=min_open, parse=parse, metavar=metavar, cli=cli, finite=finite)
    return field(default=default, metadata={"nnethics": spec})


def labels_field() -> Any:
    return option(("1", "2"), "The two answer labels (set from --labels).", cli=False)


def chat_field() -> Any:
    return option(None, "Wrap prompts in the chat template (set from --chat/--no-chat; None: when the tokenizer "
                        "has one).", cli=False)


KV_CACHE = ("auto", "on", "off")  # the choices of a kv_cache option (patching, heads)


def max_tokens_field() -> Any:
    """``max_tokens`` of an analysis that packs patched rows into forwards (patching, heads)."""
    return option(16384, "Tokens per forward (rows x width); the rows per forward halve on out-of-memory.", min=1)


def spec_of(f: dataclasses.Field) -> OptionSpec | None:
    return f.metadata.get("nnethics")


def option_fields(cls: type) -> Iterator[tuple[dataclasses.Field, OptionSpec, Any]]:
    """``(field, spec, resolved type)`` of every declared option of an Options class, shared ones excluded."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        spec = spec_of(f)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with nnethics.analyses.base.option()")
        if f.name not in SHARED:
            yield f, spec, hints[f.name]


def check_values(opts: Any) -> None:
    """Validate an Options instance against its declared choices and bounds (call from ``__post_init__``)."""
    for f, spec, _ in option_fields(type(opts)):
        value = getattr(opts, f.name)
        if value is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise OptionError(f.name, "must not be empty")
        for item in items:
            if spec.choices is not None and item not in spec.choices:
                raise OptionError(f.name, f"{item!r} is not one of {', '.join(spec.choices)}")
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if spec.finite and not math.isfinite(item):  # NaN passes every bound below: refuse it first
                raise OptionError(f.name, f"must be a finite number, got {item}")
            if spec.min is not None and (item < spec.min or (spec.min_open and item == spec.min)):
                raise OptionError(f.name, f"must be {'>' if spec.min_open else '>='} {spec.min:g}, got {item}")
            if spec.max is not None and item > spec.max:
                raise OptionError(f.name, f"must be <= {spec.max:g}, got {item}")


def recorded_option(ds: xr.Dataset, key: str, default: Any) -> Any:
    """An option as the Dataset was computed with it, for a ``finalize`` (which gets the Dataset alone): from the
    provenance ``options`` (the gathered chunks carry the run's attrs, a chunk's own attrs are replaced), else the
    chunk's own attr ``key``, else ``default``."""
    import json

    try:
        value = json.loads(ds.attrs.get("options", "{}")).get(key)
    except (TypeError, ValueError, AttributeError):
        value = None
    return value if value is not None else ds.attrs.get(key, default)


# ----------------------------------------------------------------------------------------------
# option syntaxes (one parser each)

def parse_layers(value: str | None) -> tuple[int, ...] | None:
    """``"0-5,10,12"`` -> ``(0, 1, 2, 3, 4, 5, 10, 12)``; empty or ``"all"`` -> None (every layer)."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"{part!r} is not a layer number or range; use e.g. '0-5,28,29' (0-based, ranges "
                             "inclusive) or 'all'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{part!r} is an empty range; use 'first-last' with first <= last")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def parse_list(value: str) -> tuple[str, ...]:
    """``"resid, attn"`` -> ``("resid", "attn")`` (duplicates dropped, order kept)."""
    return tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))


def check_layers(name: str, layers: Sequence[int] | None, n_layers: int) -> None:
    """The ``layers`` option against a model with ``n_layers`` layers."""
    if layers is not None and (min(layers) < 0 or max(layers) >= n_layers):
        bad = [i for i in layers if not 0 <= i < n_layers]
        which = f"layer {bad[0]} does" if len(bad) == 1 else f"layers {format_layers(bad)} do"
        raise OptionError(name, f"{which} not exist: the model has layers 0-{n_layers - 1}")


def format_layers(layers: Sequence[int]) -> str:
    """``(0, 1, 2, 5, 7, 8)`` -> ``"0-2,5,7-8"``: the syntax :func:`parse_layers` reads."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# ----------------------------------------------------------------------------------------------
# the Analysis object and the registry

Compute = Callable[..., xr.Dataset]


@dataclass(frozen=True)
class SharedReads:
    """An analysis' use of the chunk's shared trace (see :mod:`nnethics.engine.trace`), as four steps.

    ``start(model, batch, options, prepared) -> job``: before the trace, on this machine (a plan of extra rows);
    ``read(model, batch, job) -> saved``: inside the shared trace, in an invoke of its own over every base and
    counterfactual row (left-padded as ``batch.encoded.inputs()``, ``logits_to_keep=1``); it reads in forward
    order and returns what it ``nnsight.save``-d; ``rows(model, batch, job, saved, prefix) -> got`` (optional):
    after the trace, in the same session (one request remotely), e.g. patched one-token rows over ``prefix``, the
    trace's key/value cache of every row but the last token (given when ``job["cache"]`` is true, else None);
    ``build(model, batch, job, got) -> xr.Dataset``: the chunk's Dataset, on this machine. The bodies of ``read``
    and ``rows`` ship by value to a server, so they touch only envoys, numbers, lists and tensors.
    """

    start: Callable[..., Any]
    read: Callable[..., Any]
    build: Callable[..., xr.Dataset]
    rows: Callable[..., Any] | None = None


class Prepared(NamedTuple):
    """What an analysis' ``prepare(model, options)`` resolves once per run: ``values`` passed to every chunk's
    ``compute`` (and to ``shares``/``complete``) as keywords, ``recorded`` in provenance beside the options, and
    ``notes`` for the terminal (why a cached tuned lens is not used)."""

    values: Mapping[str, Any] = {}
    recorded: Mapping[str, Any] = {}
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class Function:
    """A function of the Python API that an analysis declares (``ne.activation_patching``): the analysis on one
    chunk of pairs, ``(model, pairs, options=None, label_ids=None, **prepared) -> xr.Dataset``, with ``fixed``
    option values applied over the given (or default) options; ``doc`` is its docstring."""

    doc: str
    fixed: Mapping[str, Any] = field(default_factory=dict)


# The positional parameters each hook is called with (the engine's calls); a hook that cannot take them fails when
# its analysis is declared, not at the first chunk.
HOOKS = {"summarize": 1, "compute": 3, "finalize": 1, "complete": 4, "prepare": 2, "resume": 2, "check": 2,
         "tables": 3, "shares": 3, "check_pairs": 2}


def check_hooks(analysis: Any) -> None:
    """Each declared hook takes the positional arguments the engine passes it (:data:`HOOKS`), else TypeError."""
    import inspect

    for name, n in HOOKS.items():
        hook = getattr(analysis, name)
        if hook is None:
            continue
        if not callable(hook):
            raise TypeError(f"analysis {analysis.name!r}: {name} is not callable")
        try:
            inspect.signature(hook).bind(*range(n))
        except TypeError as e:
            raise TypeError(f"analysis {analysis.name!r}: {name} cannot be called with the {n} positional "
                            f"argument(s) the engine passes ({e})") from None
        except ValueError:  # a builtin without a signature: nothing to check
            continue
    if not dataclasses.is_dataclass(analysis.options):
        raise TypeError(f"analysis {analysis.name!r}: options must be a dataclass of option() fields")


@dataclass(frozen=True)
class Analysis:
    """One technique: see the module docstring for each part. A declaration that cannot run (neither
    ``compute`` nor ``shares``; ``resume`` without ``prepare``) fails here, when it is built."""

    name: str
    options: type
    summarize: Callable[[xr.Dataset], str]
    help: str
    compute: Compute | None = None  # (model, pairs, options, label_ids=None, **prepared.values) -> one chunk
    finalize: Callable[[xr.Dataset], xr.Dataset] | None = None
    complete: Callable[..., xr.Dataset] | None = None  # after finalize: complete(model, ds, pairs, options, ...)
    prepare: Callable[[Any, Any], Prepared] | None = None
    resume: Callable[[Prepared, list[xr.Dataset]], None] | None = None  # a resumed run: what it finds done
    check: Callable[[Any, Any], None] | None = None
    check_pairs: Callable[[Any, Sequence[Any]], None] | None = None  # (options, pairs): before the model loads
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # other file name -> fixed options
    command: str | None = None  # the CLI command (default: the name); "lens run" puts it in a group
    render: tuple[str, ...] = ()  # modules with SECTION and figures(ds, prompts) [+ variant_figures(ds, name)]
    tables: Callable[[xr.Dataset, Mapping[str, xr.Dataset]], dict[str, Any]] | None = None
    default: bool = True  # run by ``nnethics run`` without --analyses
    shares: Callable[[Any, Any, Mapping], SharedReads | None] | None = None  # (model, options, prepared values)
    variables: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # name -> (long_name, units) it writes
    compare: str | None = None  # module with compare_figures(stores, relative) for ``nnethics compare``
    commands: tuple[str, ...] = ()  # modules with register(cli): commands beyond its own (lens: train, eval)
    run_flags: tuple[str, ...] = ()  # Options fields ``nnethics run`` offers as its own flags (patching: atp)
    functions: Mapping[str, Function] = field(default_factory=dict)  # the Python API: ne.<name>(model, pairs, ...)

    def __post_init__(self) -> None:
        check_hooks(self)
        if self.compute is None and self.shares is None:
            raise TypeError(f"analysis {self.name!r} declares neither compute nor shares: nothing would run it")
        if self.resume is not None and self.prepare is None:
            raise TypeError(f"analysis {self.name!r} declares resume without prepare: resume updates what prepare "
                            "made")

    @property
    def names(self) -> tuple[str, ...]:
        """Every file name this analysis writes: its own, then its variants'."""
        return (self.name, *self.variants)

    def make_options(self, name: str | None = None, **values: Any) -> Any:
        """Options for ``name`` (one of :attr:`names`): the variant's fixed values over ``values``."""
        fixed = dict(self.variants.get(name, {})) if name not in (None, self.name) else {}
        return self.options(**{**values, **fixed})

    def name_for(self, options: Any) -> str:
        """The file name the options write to: the variant whose fixed values they match, else :attr:`name`."""
        for name, fixed in self.variants.items():
            if all(getattr(options, k) == v for k, v in fixed.items()):
                return name
        return self.name

    def record(self, options: Any) -> dict[str, Any]:
        """Every option, as provenance stores it (the shared labels/chat are recorded beside, not here)."""
        out = {}
        for f, _, _ in option_fields(type(options)):
            value = getattr(options, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


ANALYSES: dict[str, Analysis] = {}


def _same_declaration(a: Analysis, b: Analysis) -> bool:
    """The same declaration built again (its module reloaded): the same name and the same Options class by name."""
    return a.name == b.name and (a.options.__module__, a.options.__qualname__) == \
        (b.options.__module__, b.options.__qualname__)


def register(analysis: Analysis) -> Analysis:
    """Add an analysis to the registry (its name and its variants' names) and its variables to the store's table
    (:func:`nnethics.store.variables.declare`); returns it."""
    from ..store.variables import declare

    for name in analysis.names:
        other = ANALYSES.get(name)
        if other is not None and other is not analysis and not _same_declaration(other, analysis):
            raise ValueError(f"analysis name {name!r} is taken by {other.name}")
    declare(analysis.variables, analysis.name)
    for name in analysis.names:
        ANALYSES[name] = analysis
    return analysis


def unregister(analysis: Analysis) -> None:
    for name in analysis.names:
        if ANALYSES.get(name) is analysis:
            del ANALYSES[name]


def analyses() -> list[Analysis]:
    """Each registered analysis once, in registration order."""
    return list({id(a): a for a in ANALYSES.values()}.values())


def default_names() -> tuple[str, ...]:
    return tuple(a.name for a in analyses() if a.default)


def file_names() -> tuple[str, ...]:
    """Every result file name of every registered analysis, in registry order."""
    return tuple(name for a in analyses() for name in a.names)


def not_a_result(name: str, attrs: Mapping[str, Any]) -> str | None:
    """Why a file named ``<name>.nc`` is not an nnethics result of that analysis (its ``analysis`` attribute names
    no registered analysis, or another one; variants share their analysis'), in words; None when it is one."""
    if name in ANALYSES and ANALYSES.get(str(attrs.get("analysis", ""))) is ANALYSES[name]:
        return None
    return f"not an nnethics {name!r} result (its 'analysis' attribute is {attrs.get('analysis')!r})"
