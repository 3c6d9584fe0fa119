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

BUILTIN = ("decisions", "patching", "attribution", "lens", "heads", "cloze")
for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["ANALYSES", "BUILTIN", "Analysis", "OptionError", "Prepared", "analyses", "default_names", "file_names",
           "not_a_result", "option", "register", "unregister"]
