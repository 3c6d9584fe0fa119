"""Shared pieces of the render layer: the bokeh backend, colours, CI helpers, per-prompt HoloMaps.

Rendering only reads Datasets (``render -> storage``); it never imports torch or nnsight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the bokeh backend and its options)
import numpy as np
import xarray as xr

# Also fills ``hv.opts.<Element>`` for bokeh (a backend-switch hook); a no-op after hv.extension('bokeh').
hv.Store.set_current_backend("bokeh")

WIDTH = 520
WIDE = 1060
HEIGHT = 320
Z95 = 1.959963984540054

COMPONENT_COLORS = {"resid": "#4c72b0", "attn": "#dd8452", "mlp": "#55a868", "total": "#8172b3"}
SIDE_DASH = {"base": "solid", "cf": "dashed"}
SIDE_NAMES = {"base": "base", "cf": "counterfactual"}
OPTION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")
LENS_DASH = {"logit": "solid", "tuned": "dashed"}


class MissingData(LookupError):
    """A figure's inputs are not in this Dataset (an older or partial file): the figure is skipped."""


@dataclass
class Figure:
    """One figure of a report: a HoloViews object plus where it goes and what it is called."""

    name: str  # file-safe id, also the PNG file name
    title: str
    obj: Any
    section: str = ""
    note: str = ""
    per_prompt: bool = False  # a HoloMap over ``prompt`` (has a selector)
    tags: dict = field(default_factory=dict)


def require(ds: xr.Dataset, *names: str) -> None:
    """Raise ``MissingData`` unless every variable/coordinate in ``names`` is in ``ds``."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise MissingData(f"{ds.attrs.get('analysis', 'dataset')}: missing {', '.join(missing)}")


def collect(builders: Iterable[Callable[[], Figure | list[Figure]]]) -> tuple[list[Figure], list[str]]:
    """Run figure builders; a builder whose data is missing is skipped and its reason returned."""
    figures: list[Figure] = []
    skipped: list[str] = []
    for build in builders:
        try:
            out = build()
        except MissingData as e:
            skipped.append(str(e))
            continue
        figures.extend(out if isinstance(out, list) else [out])
    return figures, skipped


def values(da: xr.DataArray | np.ndarray) -> np.ndarray:
    return np.asarray(getattr(da, "values", da))


def mean_ci(da: xr.DataArray, dim: str | Sequence[str] = "prompt") -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mean over ``dim`` and a normal-approximation 95% CI (mean ± 1.96·SEM); NaNs ignored.

    With a single sample the CI collapses onto the mean.
    """
    dims = [dim] if isinstance(dim, str) else list(dim)
    da = da.astype(float)
    n = da.notnull().sum(dims)
    mean = da.mean(dims, skipna=True)
    sd = da.std(dims, ddof=1, skipna=True).where(n > 1, 0.0)
    sem = sd / np.sqrt(n.where(n > 0, 1))
    return mean, mean - Z95 * sem, mean + Z95 * sem


def band_and_curve(x: np.ndarray, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, label: str, color: str,
                   kdim: str = "layer", vdim: str = "effect", dash: str = "solid") -> hv.Overlay:
    """A mean curve with its CI band, sharing one legend entry."""
    x, mean, lo, hi = (np.asarray(a, dtype=float) for a in (x, mean, lo, hi))
    band = hv.Area((x, lo, hi), kdims=[kdim], vdims=[f"{vdim}_lo", f"{vdim}_hi"], label=label).opts(
        color=color, alpha=0.2, line_alpha=0, show_legend=False)
    curve = hv.Curve((x, mean), kdim, vdim, label=label).opts(color=color, line_width=2, line_dash=dash,
                                                              tools=["hover"])
    return band * curve


def prompt_map(prompts: Sequence[str], frame: Callable[[str], hv.Element], available: Iterable[str],
               empty: Callable[[str], hv.Element]) -> hv.HoloMap:
    """A HoloMap over ``prompt`` with one frame per entry of ``prompts``.

    Every per-prompt figure of a report uses the same ``prompts`` list, so Panel merges their
    selectors into one linked selector (widgets with the same name are linked when embedding) and
    the embedded state grows with the number of prompts, not with its power. Prompts missing from
    this Dataset get the ``empty`` frame.
    """
    have = set(available)
    frames = {p: (frame(p) if p in have else empty(p)) for p in prompts}
    return hv.HoloMap(frames, kdims=[hv.Dimension("prompt", label="prompt")], sort=False)


def empty_curve(title: str, xlabel: str = "layer", ylabel: str = "value") -> Callable[[str], hv.Element]:
    def make(prompt: str) -> hv.Element:
        return hv.Curve(([], []), xlabel, ylabel).opts(title=f"{prompt}: {title}")

    return make


def prompt_order(*datasets: xr.Dataset | None) -> list[str]:
    """The union of the ``prompt`` coordinates of ``datasets``, in first-seen order."""
    seen: dict[str, None] = {}
    for ds in datasets:
        if ds is not None and "prompt" in ds.coords:
            for p in ds["prompt"].values.tolist():
                seen.setdefault(str(p), None)
    return list(seen)


def layers_of(ds: xr.Dataset) -> np.ndarray:
    return values(ds["layer"]).astype(int)


def side_name(side: str) -> str:
    return SIDE_NAMES.get(str(side), str(side))


def model_name(ds: xr.Dataset, fallback: str = "model") -> str:
    a = ds.attrs
    return str(a.get("model_id") or a.get("model_slug") or a.get("model") or fallback)


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "figure"
