"""The analyses. Each module declares one :class:`~nnethics.analyses.base.Analysis` and registers it at import;
:data:`ANALYSES` is the registry every command, the report and export read. The built-in ones are imported here
in the order ``nnethics run`` runs them."""

import importlib

from .base import (
    ANALYSES,
    Analysis,
    OptionError,
    Prepared,
    analyses,
    default_names,
    file_names,
    not_a_result,
    option,
    register,
    unregister,
)

BUILTIN = ("decisions", "patching", "attribution", "lens", "heads", "cloze", "steer")
for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

# The analyses the rest of nnethics builds on, by role: this registry is the one place outside the analyses
# themselves that names one.
DECISIONS = "decisions"  # the decision readout: every framing runs it, framings.nc and the verdict read it
CLOZE = "cloze"  # the cloze readout of the structured pairs (run --framings)
BINDING_SOURCES = ("patching", "patching_grid")  # the files binding.nc compares between a content and a label swap

__all__ = ["ANALYSES", "BINDING_SOURCES", "BUILTIN", "CLOZE", "DECISIONS", "Analysis", "OptionError", "Prepared", "analyses", "default_names", "file_names",
           "not_a_result", "option", "register", "unregister"]
