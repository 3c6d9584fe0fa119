"""HoloViews rendering of stored results: Dataset -> figure, report assembly, offline HTML/PNG.

Reads Datasets only; never imports torch or nnsight.
"""

from ._base import Figure, MissingData, mean_ci
from .report import ReportError, build_report, load_store, report_figures, write_report

__all__ = ["Figure", "MissingData", "ReportError", "build_report", "load_store", "mean_ci", "report_figures",
           "write_report"]
