"""The report section of the entropy example: one histogram."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from nnethics.render._base import Figure, collect

SECTION = "Next-token entropy"


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    def histogram() -> Figure:
        values = ds["entropy"].values.ravel()
        counts, edges = np.histogram(values, bins=10)
        hist = hv.Histogram((edges, counts), kdims=["entropy"], vdims=["prompts"])
        return Figure("entropy_hist", f"Entropy at the decision position (n={values.size} prompts)", hist, SECTION)

    return collect([histogram])
