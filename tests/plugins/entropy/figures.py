"""The figures of the entropy example: its report section (one histogram) and its comparison figure."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from nnethics.render._base import Figure, MissingData, collect
from nnethics.render.compare import SECTION as COMPARISON
from nnethics.render.compare import Stores

SECTION = "Next-token entropy"


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    def histogram() -> Figure:
        values = ds["entropy"].values.ravel()
        counts, edges = np.histogram(values, bins=10)
        hist = hv.Histogram((edges, counts), kdims=["entropy"], vdims=["prompts"])
        return Figure("entropy_hist", f"Entropy at the decision position (n={values.size} prompts)", hist, SECTION)

    return collect([histogram])


def compare_figures(stores: Stores, relative: bool) -> list:
    def mean_entropy() -> Figure:
        rows = [(model, float(d["entropy"]["entropy"].mean())) for model, d in stores.items() if "entropy" in d]
        if not rows:
            raise MissingData("compare: no entropy.nc")
        return Figure("compare_entropy", "Mean next-token entropy by model",
                      hv.Bars(rows, kdims=["model"], vdims=["nats"]), COMPARISON)

    return [mean_entropy]
