"""``nnethics report``, ``nnethics compare`` and ``nnethics export``: outputs from stored results.

These commands read NetCDF files only; they never load a model (so no torch import either).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from .common import BadInput

STORE_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _bad_input(err: Exception) -> click.ClickException:
    return BadInput(str(err))


def left_out(store_dir: Path) -> list[tuple[Path, str]]:
    """The ``*.nc`` files of a model folder that the report leaves out, each with why and what to do: unreadable
    ones (truncated, not NetCDF) and someone else's named like a result (``export`` refuses those)."""
    from ..analyses import file_names, not_a_result
    from ..store import read_attrs, result_files, unreadable_results

    out = [(path, f"cannot be read ({reason}); {{what}} leaves it out; recompute it with `nnethics run` or remove it")
           for path, reason in unreadable_results(store_dir)]
    files = result_files(store_dir)
    for name in file_names():
        if name in files and files[name] not in {p for p, _ in out}:
            with contextlib.suppress(OSError, ValueError, RuntimeError):  # unreadable now: the next reader says so
                if (foreign := not_a_result(name, read_attrs(files[name]))) is not None:
                    out.append((files[name], f"is {foreign}; {{what}} leaves it out; move it out of {store_dir} or "
                                             "recompute it with `nnethics run`"))
    return out


def warn_unreadable(store_dir: Path, what: str = "the report") -> None:
    """Say on stderr which result files ``what`` (the report, the comparison) has to leave out (the page lists
    them too), and which settings differ between the files the report puts side by side."""
    from ..store import mixed_settings

    bad = left_out(store_dir)
    for path, reason in bad:
        click.echo(f"warning: {path} {reason.replace('{what}', what)}", err=True)
    if what != "the report":
        return
    for difference in mixed_settings(store_dir, skip={p for p, _ in bad}):
        click.echo(f"warning: {store_dir}: {difference}; the report compares them side by side (rerun the odd one "
                   "out with --overwrite to make them match)", err=True)


@click.command()
@click.argument("store_dir", type=STORE_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output HTML file (default: STORE_DIR/report.html).")
@click.option("--png", is_flag=True, help="Also write one PNG per figure (needs chromium, chromedriver, selenium).")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None,
              help="Offer only the first N prompts in the per-prompt selectors (default: every prompt; each is "
                   "carried once, compactly, so 1,000 pairs stay small). Aggregate figures always use all.")
def report(store_dir: Path, out: Path | None, png: bool, max_prompts: int | None) -> None:
    """Write one self-contained, offline report.html for STORE_DIR (a store/<model-slug> folder)."""
    from ..render import ReportError, write_report
    from ..render.offline import PngExportError
    from ..store import StoreError

    t0 = time.monotonic()
    warn_unreadable(store_dir)
    try:
        path = write_report(store_dir, out=out, png=png, max_prompts=max_prompts)
    except (ReportError, StoreError) as e:  # StoreError: a full disk or a folder that cannot be written
        raise _bad_input(e) from None
    except PngExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {path} ({_size(path)}, {time.monotonic() - t0:.1f} s)")
    if png:
        folder = path.parent / f"{path.stem}_png"
        click.echo(f"png: {folder} ({len(list(folder.glob('*.png')))} figures)")

@click.command()
@click.argument("store_dirs", nargs=-1, required=True, type=STORE_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output HTML file (default: compare.html next to the first STORE_DIR).")
@click.option("--png", is_flag=True, help="Also write one PNG per figure.")
@click.option("--depth", type=click.Choice(["auto", "layer", "relative"]), default="auto", show_default=True,
              help="x axis: layer index, or relative depth (auto: relative when layer counts differ).")
@click.option("--name", "names", multiple=True,
              help="Legend label of each STORE_DIR, once per folder in the same order (default: the model id).")
def compare(store_dirs: tuple[Path, ...], out: Path | None, png: bool, depth: str, names: tuple[str, ...]) -> None:
    """Overlay the figures of several models (STORE_DIRS are store/<model-slug> folders); where they hold framings.nc,
    also each model's ethical preference per framing and pooled."""
    from ..render import MissingData, ReportError
    from ..render.compare import write_comparison
    from ..render.offline import PngExportError
    from ..store import StoreError

    if len(store_dirs) < 2:
        raise _bad_input(ValueError("compare needs at least two store folders"))
    if names and (len(names) != len(store_dirs) or len(set(names)) != len(names)):
        raise _bad_input(ValueError(f"--name: given {len(names)} time(s) ({len(set(names))} different) for "
                                    f"{len(store_dirs)} store folders; pass one different --name per STORE_DIR, "
                                    "in the same order, or none"))
    relative = None if depth == "auto" else depth == "relative"
    t0 = time.monotonic()
    for store_dir in store_dirs:
        warn_unreadable(store_dir, "the comparison")
    try:
        path = write_comparison(list(store_dirs), out=out, png=png, relative=relative, names=names or None)
    except (ReportError, MissingData, StoreError) as e:
        raise _bad_input(e) from None
    except PngExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"comparison: {path} ({_size(path)}, {time.monotonic() - t0:.1f} s)")

@click.command()
@click.argument("store_dir", type=STORE_DIR)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"], case_sensitive=False), default="csv",
              show_default=True, help="Table format (the lens top-k files are always JSON).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: STORE_DIR/export).")
@click.option("--seed-names", is_flag=True,
              help="The original scripts' names: column causal_score for effect, file tuned_lens.json for "
                   "tuned_lens_topk.json.")
def export(store_dir: Path, fmt: str, out: Path | None, seed_names: bool) -> None:
    """Write flat CSV/JSON tables (detailed_layer_data, summary_results, attribution, lens, ...) and metadata.json
    (each table's source, the constants left out of its rows, each file's provenance)."""
    from ..export import ExportError, export_store
    from ..store import StoreError

    try:
        paths = export_store(store_dir, fmt=fmt.lower(), out=out, seed_names=seed_names)
    except (ExportError, StoreError) as e:  # StoreError: a full disk or a folder that cannot be written
        raise _bad_input(e) from None
    for p in paths:
        click.echo(f"{p} ({_size(p)})")


def register(cli: click.Group) -> None:
    for command in (report, compare, export):
        cli.add_command(command)
