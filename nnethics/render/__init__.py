"""HoloViews rendering of stored results: Dataset -> figure, report assembly, offline HTML/PNG.

Each analysis' own figures modules (``Analysis.render``, e.g. ``nnethics.analyses.patching.figures``) turn one
Dataset into HoloViews elements (per-prompt views are ``carrier.PerPrompt``: data carried once, selected in the
browser); this package holds what they share: ``write_report`` renders a store/<model-slug> folder
into one offline HTML file and ``compare.write_comparison`` several folders into one. Reads Datasets
only: never imports torch or nnsight.
"""

from ._base import Figure, MissingData, mean_ci
from .compare import write_comparison
from .offline import PngExportError, export_pngs, save_html
from .report import ReportError, build_report, load_store, report_figures, write_report

__all__ = ["Figure", "MissingData", "PngExportError", "ReportError", "build_report", "export_pngs", "load_store",
           "mean_ci", "report_figures", "save_html", "write_comparison", "write_report"]


def __getattr__(name: str):
    """``nnethics.render.<analysis>`` (``from nnethics.render import lens``): the figures module that analysis
    declares last in ``Analysis.render`` (its own, e.g. ``nnethics.analyses.lens.figures``), read from the
    registry."""
    import importlib

    from ..analyses import ANALYSES

    analysis = ANALYSES.get(name)
    if analysis is None or analysis.name != name or not analysis.render:
        raise AttributeError(f"module 'nnethics.render' has no attribute {name!r}")
    return importlib.import_module(analysis.render[-1])
