"""HoloViews rendering of stored results: Dataset -> figure, report assembly, offline HTML/PNG.

``patching``, ``attribution``, ``lens`` and ``decisions`` turn one Dataset into HoloViews elements
(per-prompt views are ``carrier.PerPrompt``: data carried once, selected in the browser); ``write_report`` renders a store/<model-slug> folder
into one offline HTML file and ``compare.write_comparison`` several folders into one. Reads Datasets
only: never imports torch or nnsight.
"""

from . import attribution, decisions, lens, patching
from ._base import Figure, MissingData, mean_ci
from .compare import write_comparison
from .offline import PngExportError, export_pngs, save_html
from .report import ReportError, build_report, load_store, report_figures, write_report

__all__ = ["Figure", "MissingData", "PngExportError", "ReportError", "attribution", "build_report", "decisions",
           "export_pngs", "lens", "load_store", "mean_ci", "patching", "report_figures", "save_html",
           "write_comparison", "write_report"]
