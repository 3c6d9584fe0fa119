"""The per-model report: every figure of whichever result files exist, in one offline HTML file.

``write_report(store/<model-slug>)`` reads the file of every registered analysis and of its variants
(:func:`nnethics.analyses.file_names`; missing ones are skipped), draws each with the render modules its
analysis declares, in registry order, and writes ``report.html`` next to them (plus
``report_png/<figure>.png`` with ``png=True``).
"""

from __future__ import annotations

import contextlib
import html
import importlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import xarray as xr

from ..analyses import analyses, default_names, file_names, not_a_result
from ..store import load, result_files, write_problem
from . import framings
from ._base import WIDE, WIDTH, Figure, MissingData, model_name, prompt_order
from .embed import Rendered, link_selectors, render
from .offline import export_pngs, save_lazy

DEFAULT_MAX_PROMPTS = None  # every prompt: per-prompt data is carried once, compactly (carrier.py)
PROVENANCE_KEYS = ("model_id", "model_revision", "dtype", "device", "quantization", "prompt_set",
                   "prompt_set_sha256", "labels", "nnethics_version", "nnsight_version", "created")


class ReportError(ValueError):
    """A store folder with nothing to report (bad user input)."""


def load_store(store_dir: str | Path) -> tuple[dict[str, xr.Dataset], list[str]]:
    """The result files of one model folder, fully loaded (files are closed), and notes on unreadable ones."""
    folder = Path(store_dir)
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder; pass a store/<model-slug> folder")
    data: dict[str, xr.Dataset] = {}
    notes: list[str] = []
    files = result_files(folder)
    for name in file_names():
        path = files.get(name)
        if path is None:
            continue
        try:
            ds = load(path)  # in the current schema, whatever version wrote it
        except (OSError, ValueError) as e:
            notes.append(f"{path.name}: unreadable ({e})")
            continue
        if (foreign := not_a_result(name, ds.attrs)) is not None:  # someone else's file named like a result
            notes.append(f"{path.name}: {foreign}")
            continue
        data[name] = ds
    extra, extra_notes = framings.load_files(folder)  # framings.nc and the framings' patching files, when present
    data.update(extra)
    notes += extra_notes
    if not data and notes:  # every file is someone else's or unreadable: say which, not "none found"
        raise ReportError(f"{folder}: no result files to report ({'; '.join(notes)}); move those files out of {folder} "
                          "or recompute them with `nnethics run`")
    if not data:
        found = ", ".join(sorted(p.name for p in folder.glob("*.nc"))) or "none"
        raise ReportError(f"{folder}: no result files to report (looked for {', '.join(f + '.nc' for f in file_names())};"
                          f" found {found})")
    return data, notes


def sections() -> list[str]:
    """The report's sections in registry order (each analysis' render modules, in the order it lists them)."""
    return framings.with_sections(list(dict.fromkeys(importlib.import_module(m).SECTION for a in analyses()
                                                     for m in a.render)))


def _builders(prompts: list[str]) -> list[tuple[str, Any]]:
    """``(file name, build(ds) -> (figures, skipped))`` for every file of every registered analysis."""
    out: list[tuple[str, Any]] = []
    for analysis in analyses():
        for module in map(importlib.import_module, analysis.render):
            out.append((analysis.name, lambda ds, m=module: m.figures(ds, prompts)))
            out += [(name, lambda ds, m=module, name=name: m.variant_figures(ds, name))
                    for name in analysis.variants if hasattr(module, "variant_figures")]
    return out


def report_figures(data: Mapping[str, xr.Dataset], max_prompts: int | None = DEFAULT_MAX_PROMPTS
                   ) -> tuple[list[Figure], list[str], list[str]]:
    """All figures for the Datasets in ``data`` (keyed by file name, as :func:`load_store` returns them).

    Returns (figures, prompts offered by the per-prompt selectors, notes on skipped figures).
    """
    prompts = prompt_order(*(data.get(a.name) for a in analyses()))
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    figs: list[Figure] = []
    skipped: list[str] = []
    for name, build in _builders(prompts):
        if name not in data:
            continue
        try:
            f, s = build(data[name])
        except MissingData as e:
            f, s = [], [str(e)]
        figs += f
        skipped += s
    f, s = framings.folder_figures(data, prompts)  # across framings; content vs label swap
    return figs + f, prompts, skipped + s


def provenance_html(data: Mapping[str, xr.Dataset]) -> str:
    first = next(iter(data.values()))
    rows = [(k, first.attrs[k]) for k in PROVENANCE_KEYS if str(first.attrs.get(k, "")) != ""]
    files = []
    for name in file_names():
        if name in data:
            ds = data[name]
            dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
            files.append(f"<li><b>{name}.nc</b> ({html.escape(dims)}; {html.escape(str(ds.attrs.get('created', '')))})</li>")
        elif name in default_names():
            files.append(f"<li style='color:#888'>{name}.nc: not in this store</li>")
    files += framings.file_items(data)
    table = "".join(f"<tr><td style='padding:1px 12px 1px 0;color:#555'>{html.escape(k)}</td>"
                    f"<td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table style='font-size:13px'>{table}</table><ul style='font-size:13px'>{''.join(files)}</ul>"


def _is_narrow(model: Any) -> bool:
    from bokeh.models import Plot

    return isinstance(model, Plot) and (model.width or 0) <= WIDTH + 80


def _block(fig: Figure, r: Rendered) -> Any:
    from bokeh.layouts import column
    from bokeh.models import Div

    head = f"<h3 style='margin:14px 0 2px 0'>{html.escape(fig.title)}</h3>"
    if fig.note:
        head += f"<p style='margin:0;color:#444;font-size:13px;max-width:{WIDE}px'>{html.escape(fig.note)}</p>"
    width = WIDTH if _is_narrow(r.model) else WIDE
    parts = [Div(text=head, width=width)] + ([r.select] if r.select is not None else []) + [r.model]
    return column(*parts)


def build_report(data: Mapping[str, xr.Dataset], title: str | None = None,
                 max_prompts: int | None = DEFAULT_MAX_PROMPTS, notes: list[str] | None = None) -> tuple[Any, list[Figure]]:
    """A Bokeh layout of every figure for ``data`` (per-prompt views with linked prompt selectors)
    and the list of figures."""
    from bokeh.layouts import column, row
    from bokeh.models import Div

    figs, prompts, skipped = report_figures(data, max_prompts)
    name = model_name(next(iter(data.values())))
    title = title or f"nnethics report: {name}"
    n_all = len(prompt_order(*data.values()))
    intro = (f"<h1 style='margin:4px 0'>{html.escape(title)}</h1>"
             f"<p style='font-size:13px;color:#333;max-width:{WIDE}px'>Where and how the model decides each ethical "
             "dilemma. Figures with a <b>prompt</b> selector show one prompt pair at a time; the selectors are "
             "linked (changing one changes all). Hover over plots for values; the toolbar zooms and pans.")
    if max_prompts is not None and n_all > len(prompts):
        intro += f" The selectors offer the first {len(prompts)} of {n_all} prompts; aggregate figures use all."
    intro += "</p>" + provenance_html(data)
    extra = list(notes or []) + skipped
    if extra:
        intro += ("<details style='font-size:12px;color:#666'><summary>skipped figures</summary><ul>"
                  + "".join(f"<li>{html.escape(s)}</li>" for s in extra) + "</ul></details>")
    items: list[Any] = [Div(text=intro, width=WIDE)]
    rendered: list[Rendered] = []
    for section in sections():
        in_section = [f for f in figs if f.section == section]
        if not in_section:
            continue
        items.append(Div(text=f"<h2 style='margin:26px 0 0 0;border-bottom:1px solid #ccc;width:{WIDE}px'>"
                              f"{html.escape(section)}</h2>", width=WIDE))
        pending = None  # a narrow block waiting for a neighbour
        for fig in in_section:
            r = render(fig.obj)
            rendered.append(r)
            block = _block(fig, r)
            if r.select is None and _is_narrow(r.model):
                if pending is None:
                    pending = block
                    continue
                items.append(row(pending, block))
                pending = None
                continue
            if pending is not None:
                items.append(pending)
                pending = None
            items.append(block)
        if pending is not None:
            items.append(pending)
    link_selectors(rendered)
    return column(*items, styles={"margin": "10px 20px"}), figs


def write_report(store_dir: str | Path, out: str | Path | None = None, png: bool = False,
                 max_prompts: int | None = DEFAULT_MAX_PROMPTS) -> Path:
    """Write ``report.html`` for one model folder ``store/<model-slug>``; return its path.

    ``out`` defaults to ``<store_dir>/report.html``. With ``png=True`` every figure is also written
    as ``<out stem>_png/<figure>.png`` (first prompt for per-prompt figures); that needs Chromium,
    chromedriver and selenium.
    """
    store_dir = Path(store_dir)
    data, notes = load_store(store_dir)
    fix = (f"write the report elsewhere with `nnethics report {store_dir} --out FILE`" if out is None else
           "pass --out with a file in another folder you can write to")
    out = Path(out) if out is not None else store_dir / "report.html"
    layout, figs = build_report(data, max_prompts=max_prompts, notes=notes)
    with writing(out, fix), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bokeh/panel deprecation chatter; not the user's concern
        save_lazy(layout, out, title=f"nnethics: {model_name(next(iter(data.values())))}")
        if png:
            export_pngs(figs, out.parent / f"{out.stem}_png")
    return out


@contextlib.contextmanager
def writing(out: Path, fix: str) -> Iterator[None]:
    """A full disk or a folder that cannot be written while ``out`` (or its PNGs) is written becomes a
    :class:`~nnethics.store.StoreError` naming the file and ending in ``fix``; the old ``out`` stays as it was."""
    try:
        yield
    except OSError as err:
        failed = Path(str(err.filename)) if err.filename else out
        ours = failed == out or failed.name.startswith(f".{out.name}.")  # the page or its temp file
        problem = write_problem(err, out.parent if ours else failed.parent, out.name if ours else failed.name, fix)
        if problem is None:
            raise
        raise problem from None
