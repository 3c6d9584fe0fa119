"""Figures in a notebook: a still PNG that reads anywhere, or the interactive HoloViews object.

A notebook saved with Bokeh output shows nothing on GitHub or in a PDF (the plots are JavaScript), so the
tutorials (``scripts/tutorials/``) show each figure with :func:`show`, which renders it to a PNG in headless
Chromium (the same driver as ``nnethics report --png``) and displays the image; ``show(fig, static=False)`` (or
displaying ``fig`` itself) gives the interactive figure with hover and selectors. Without Chromium and
chromedriver it says so once and shows the interactive figure.
"""

from __future__ import annotations

import atexit
import contextlib
import warnings
from typing import Any

import holoviews as hv

from .offline import PngExportError, chromium_driver
from .offline import static as first_frames

_DRIVER: dict[str, Any] = {}  # one headless Chromium per kernel, opened on first use, closed at exit


def _driver() -> Any:
    if "driver" not in _DRIVER:
        stack = contextlib.ExitStack()
        _DRIVER["driver"] = stack.enter_context(chromium_driver())
        atexit.register(stack.close)
    return _DRIVER["driver"]


def to_png(obj: Any) -> bytes | None:
    """``obj`` (a HoloViews object; a HoloMap shows its first frame) as PNG bytes; ``None`` for a text-only
    figure (a ``Div``). Raises :class:`~nnethics.render.offline.PngExportError` without Chromium/chromedriver."""
    import io
    import logging

    import holoviews.plotting.bokeh  # noqa: F401 - registers the renderer (hv.extension would print JS into the notebook)
    from bokeh.io.export import get_screenshot_as_png
    from bokeh.models import Div, Plot

    model = hv.render(first_frames(obj), backend="bokeh")
    if isinstance(model, Div):
        return None
    for plot in model.select({"type": Plot}):  # a still image has no use for the tools
        plot.toolbar_location = None
    if hasattr(model, "toolbar_location"):  # a grid of plots has one shared toolbar
        model.toolbar_location = None
    export_log = logging.getLogger("bokeh.io.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # headless Chromium's harmless WebGL-fallback notices
    try:
        image = get_screenshot_as_png(model, driver=_driver())
    finally:
        export_log.setLevel(level)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def show(obj: Any, static: bool = True) -> None:
    """Display ``obj`` in the notebook: a PNG when ``static`` (the default), else the interactive figure."""
    from IPython.display import HTML, Image, display

    if static:
        try:
            png = to_png(obj)
        except PngExportError as e:
            warnings.warn(f"{e}; showing the interactive figure instead", stacklevel=2)
        else:
            if png is None:  # text: show it as HTML, which every viewer renders
                import holoviews.plotting.bokeh  # noqa: F401

                display(HTML(hv.render(obj, backend="bokeh").text))
            else:
                display(Image(data=png))
            return
    display(obj)
