"""Shared pieces of the render layer: the bokeh backend, colours, CI helpers, per-prompt views.

Rendering only reads Datasets (``render -> storage``); it never imports torch or nnsight.

Per-prompt views (a figure with a ``prompt`` selector) carry each prompt's data once, as columnar typed
arrays, and select in the browser: return a :class:`nnethics.render.carrier.PerPrompt` (or a
``PerPromptLayout`` of several panels) from the figure builder and mark the ``Figure`` ``per_prompt``.
A new section (e.g. attention heads) does the same in four steps:

1. ``frame(p)``: the HoloViews Overlay of one prompt (the reference picture: PNG export, tests);
   :func:`frame_limits` gives it the view's fixed x range and its own y range.
2. ``template``: the same Overlay with every element any prompt can show (hidden ones NaN).
3. The data of all prompts at once, vectorised from the Dataset, reindexed to ``prompts`` (missing
   prompts: NaN): ``columns[(element index, column name)] = array (n_prompts, n)``, ``spans``,
   ``titles`` (one string per prompt), ``ylim`` (:func:`row_limits`).
4. ``PerPrompt(prompts, frame, template, columns=..., titles=..., ylim=..., opts=frame_opts)``.

Numbers are stored float32 (ids int32), strings dictionary-coded; ``carrier.CARRY_JS`` copies row i into
the template's data sources when the selector changes. See ``nnethics.analyses.patching.figures_prompt.prompt_view``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the bokeh backend and its options)
import numpy as np
import xarray as xr

from .. import metrics
from ..metrics import ci_label  # noqa: F401  (the CI caption of every figure)

# Also fills ``hv.opts.<Element>`` for bokeh (a backend-switch hook); a no-op after hv.extension('bokeh').
hv.Store.set_current_backend("bokeh")

WIDTH = 520
WIDE = 1060
HEIGHT = 320

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
    per_prompt: bool = False  # a carrier.PerPrompt view (has a prompt selector)


def require(ds: xr.Dataset, *names: str) -> None:
    """Raise ``MissingData`` unless every variable/coordinate in ``names`` is in ``ds``."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise MissingData(f"{ds.attrs.get('analysis', 'dataset')}: missing {', '.join(missing)}")


def collect(builders: Iterable[Callable[[], Figure | list[Figure]]]) -> tuple[list[Figure], list[str]]:
    """Run figure builders; one whose data is missing is skipped and its reason returned.

    A builder that fails on an unexpected file layout is skipped too, with the error in the notes (and a
    warning), so one odd variable cannot cost the whole report at the end of a long run.
    """
    figures: list[Figure] = []
    skipped: list[str] = []
    for build in builders:
        try:
            out = build()
        except MissingData as e:
            skipped.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - reported in the page and as a warning
            msg = f"could not draw a figure: {type(e).__name__}: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            skipped.append(msg)
            continue
        figures.extend(out if isinstance(out, list) else [out])
    return figures, skipped


def values(da: xr.DataArray | np.ndarray) -> np.ndarray:
    return np.asarray(getattr(da, "values", da))


def mean_ci(da: xr.DataArray, dim: str | Sequence[str] = "prompt",
            seed: int = 0) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mean over ``dim`` and its 95% CI: :func:`nnethics.metrics.mean_ci` (BCa bootstrap,
    ``scipy.stats.bootstrap``, seeded), NaNs ignored; figures caption it with :func:`ci_label`.
    Computed by :func:`nnethics.metrics.mean_ci_batched`: the same intervals up to rounding (largest
    difference measured 2e-14), one bootstrap per group of cells (a 1,000-pair report spent 69 of 87 s in
    780 per-cell bootstraps).

    A NaN interval (no band) with fewer than 2 values, zero width when all values are equal.
    """
    dims = [dim] if isinstance(dim, str) else list(dim)
    da = da.astype(float).transpose(*dims, ...)
    rest = [d for d in da.dims if d not in dims]
    v = da.values.reshape((-1, *(da.sizes[d] for d in rest)))
    coords = {k: c for k, c in da.coords.items() if set(c.dims) <= set(rest)}
    return tuple(xr.DataArray(a, dims=rest, coords=coords) for a in metrics.mean_ci_batched(v, axis=0, seed=seed))


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
               empty: Callable[[str], hv.Element], shared_y: bool = False, **frame_opts: Any) -> hv.HoloMap:
    """A HoloMap over ``prompt`` with one frame per entry of ``prompts``, axes fixed across frames.

    The report's per-prompt views no longer use it (a frame per prompt does not scale: see ``carrier``);
    kept for small maps and for code written against it.

    Every per-prompt figure of a report uses the same ``prompts`` list, so their selectors can be
    linked. Prompts missing from this Dataset get the ``empty`` frame. ``frame_opts`` are plot options
    of each frame (e.g. width, legend_position). The x limits are shared by all frames, the y limits
    too with ``shared_y`` (else each prompt gets its own, ignoring ``reference`` lines such as y = 0).
    Limits are explicit and ranges framewise: HoloViews otherwise recomputes the ranges of every frame
    at each frame update, which is quadratic in the number of prompts. Options are set on each frame
    before it goes into the HoloMap: options on a container re-tag every element inside.
    """
    have = set(available)
    frames = {p: (frame(p) if p in have else empty(p)) for p in prompts}
    frames = fix_limits(frames, shared_y=shared_y, **frame_opts)
    return hv.HoloMap(frames, kdims=[hv.Dimension("prompt", label="prompt")], sort=False)


REFERENCE = "Reference"  # group of guide lines (y = 0) that should not stretch a per-prompt axis


def reference_hline(y: float = 0.0) -> hv.HLine:
    return hv.HLine(y, group=REFERENCE).opts(color="gray", line_dash="dotted", line_width=1)


def _axis_values(el: hv.Element) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if el.group == REFERENCE:
        return [], []
    if isinstance(el, hv.VLine):
        return [np.atleast_1d(np.asarray(el.data, dtype=float))], []
    if isinstance(el, hv.HLine):
        return [], [np.atleast_1d(np.asarray(el.data, dtype=float))]
    if isinstance(el, (hv.HeatMap, hv.Labels)) or len(el.kdims) >= 2:
        return [el.dimension_values(0)], [el.dimension_values(1)]
    if el.kdims and el.vdims:
        ys = [el.dimension_values(d) for d in el.vdims[:2 if isinstance(el, hv.Area) else 1]]
        return [el.dimension_values(0)], ys
    return [], []


def _limits(arrays: list[np.ndarray], pad: float) -> tuple[float, float] | None:
    vals = [np.asarray(a) for a in arrays if len(a)]
    if not vals or any(v.dtype.kind not in "biuf" for v in vals):
        return None  # categorical axis: fixed by its factors already
    v = np.concatenate([x.astype(float).ravel() for x in vals])
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    span = (hi - lo) or max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def _elements(fr: Any) -> list:
    return list(fr.values()) if isinstance(fr, hv.Overlay) else [fr]


def fix_limits(frames: dict[str, Any], pad: float = 0.05, shared_y: bool = True, **frame_opts: Any) -> dict[str, Any]:
    """Explicit x/y limits (shared by all frames; y per frame unless ``shared_y``) and ``frame_opts``
    on every frame; range computation made framewise."""
    values_ = list(frames.values())
    if not values_ or isinstance(values_[0], hv.Div):
        return frames
    types = {type(el).__name__ for fr in values_ for el in _elements(fr)}
    heat = bool(types & {"HeatMap", "Labels"})  # cells of width 1 centred on their (numeric) coordinates

    def limits(arrays: list[np.ndarray]) -> tuple[float, float] | None:
        lim = _limits(arrays, 0.0 if heat else pad)
        return (lim[0] - 0.5, lim[1] + 0.5) if heat and lim is not None else lim

    per_frame = {key: [_axis_values(el) for el in _elements(fr)] for key, fr in frames.items()}
    xlim = limits([x for axes in per_frame.values() for xs, _ in axes for x in xs])
    ylim = limits([y for axes in per_frame.values() for _, ys in axes for y in ys]) if shared_y else None
    out = {}
    for key, fr in frames.items():
        lims = {"xlim": xlim} if xlim is not None else {}
        own = ylim if shared_y else limits([y for _, ys in per_frame[key] for y in ys])
        if own is not None:
            lims["ylim"] = own
        fr = fr if isinstance(fr, hv.Overlay) else hv.Overlay([fr])  # overlay options (legend) for every frame
        inner = [getattr(hv.opts, t)(framewise=True) for t in sorted({type(e).__name__ for e in fr})]
        out[key] = fr.opts(*inner, hv.opts.Overlay(framewise=True, **lims, **frame_opts))
    return out


def row_limits(rows: np.ndarray, pad: float = 0.05) -> np.ndarray:
    """Per-row axis limits ``(n, 2)`` of ``rows (n, ...)``, NaNs ignored, padded like :func:`fix_limits`
    (a flat row spans ``max(|value|, 1)``); a row with no finite value gets NaN limits."""
    a = np.asarray(rows, dtype=float).reshape(len(rows), -1)
    finite = np.isfinite(a).any(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        lo, hi = np.nanmin(np.where(finite[:, None], a, 0.0), 1), np.nanmax(np.where(finite[:, None], a, 0.0), 1)
    span = hi - lo
    span = np.where(span > 0, span, np.maximum(np.abs(hi), 1.0))
    out = np.stack([lo - pad * span, hi + pad * span], 1)
    out[~finite] = np.nan
    return out


def frame_limits(fr: Any, xlim: tuple[float, float] | None, **frame_opts: Any) -> Any:
    """One prompt's frame as :func:`fix_limits` sets it in a view: its own y range, the view's ``xlim``."""
    (out,) = fix_limits({"_": fr}, shared_y=False, **frame_opts).values()
    return out.opts(hv.opts.Overlay(xlim=xlim)) if xlim is not None else out


def reindexed(da: xr.DataArray, prompts: Sequence[str], *dims: str) -> np.ndarray:
    """``da`` as a float array ``(len(prompts), *dims)``; prompts it lacks are NaN."""
    da = da.assign_coords(prompt=[str(p) for p in values(da["prompt"])])
    return values(da.reindex(prompt=list(prompts)).transpose("prompt", *dims)).astype(float)


def empty_curve(title: str, xlabel: str = "layer", ylabel: str = "value") -> Callable[[str], hv.Element]:
    def make(prompt: str) -> hv.Element:
        return hv.Overlay([hv.Curve(([], []), xlabel, ylabel)]).opts(title=f"{prompt}: {title}")

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


@dataclass
class Share:
    """A share of pairs: ``k`` of ``n`` (``value`` = k / n) with its Wilson 95% interval."""

    value: float
    low: float
    high: float
    k: int
    n: int

    def text(self) -> str:
        if not self.n or not np.isfinite(self.value):
            return "no pairs"
        ci = (f"; Wilson 95% CI {self.low:.0%} to {self.high:.0%}" if np.isfinite(self.low) and np.isfinite(self.high)
              else "")
        return f"{self.value:.0%}{ci}"


def share(ds: xr.Dataset, name: str, k: int, n: int, n_name: str | None = None) -> Share:
    """The share ``name`` as stored (with ``<name>_ci_low``/``_ci_high`` and its count ``n_name`` when stored; k
    recovered as share × n), else ``k`` of ``n`` counted here, with a Wilson interval; NaN with ``n = 0``."""
    if name not in ds.variables:
        lo, hi = metrics.proportion_ci(np.array([k]), np.array([n]))
        return Share(k / n if n else float("nan"), float(lo[0]), float(hi[0]), k, n)
    s = float(values(ds[name]))
    if n_name is not None and n_name in ds.variables:
        n = int(values(ds[n_name]))
    k = int(round(s * n)) if np.isfinite(s) else 0
    if f"{name}_ci_low" in ds.variables and f"{name}_ci_high" in ds.variables:
        lo, hi = float(values(ds[f"{name}_ci_low"])), float(values(ds[f"{name}_ci_high"]))
    else:
        lo, hi = (float(x[0]) for x in metrics.proportion_ci(np.array([k]), np.array([n])))
    return Share(s, lo, hi, k, n)
