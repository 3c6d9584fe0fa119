"""``nnethics attribute``: direct logit attribution over a prompt set (store/<model>/attribution.nc)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def parse_layers(value: str | None) -> list[int] | None:
    """``"0-5,28,29"`` -> ``[0, 1, 2, 3, 4, 5, 28, 29]``; ``None``/empty -> ``None`` (all layers)."""
    if value is None or not value.strip():
        return None
    layers: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            start, end = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not a layer number or range; use e.g. '0-5,28,29' (0-based, ranges inclusive)"
            ) from None
        if start < 0 or end < start:
            raise click.BadParameter(f"{part!r} is not a valid range; use 'first-last' with 0 <= first <= last")
        layers.update(range(start, end + 1))
    return sorted(layers)


def register(cli: click.Group) -> None:
    # Imported here: nnethics.cli imports this module at its end, after these names exist.
    from ..cli import BadInput, _load, _prompts, friendly, model_options, prompt_options, store_options

    @cli.command()
    @model_options
    @prompt_options
    @store_options
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Pairs per batch (halved on out-of-memory).")
    @click.option("--layers", default=None, callback=lambda c, p, v: parse_layers(v),
                  help="Only store these layers, e.g. '0-5,28,29' (default: all); the rest are summed into "
                       "other_layers_contribution.")
    @click.option("--heads/--no-heads", default=True, show_default=True, help="Also split attention by head.")
    @click.option("--progress/--no-progress", default=None,
                  help="Progress bar on stderr (default: when stderr is a terminal).")
    @friendly
    def attribute(model_spec: str, revision: Any, device: Any, device_map: Any, dtype: Any, quantize: Any,
                  remote: Any, token: Any, prompts_path: Path, labels: Any, chat: Any, limit: Any, store: Path,
                  overwrite: bool, lock_timeout: float | None, batch_size: int, layers: list[int] | None, heads: bool, progress: Any) -> None:
        """Direct logit attribution: each layer's attention and MLP (and each head / expert) contribution
        to the label logits at the decision token; writes STORE/<model>/attribution.nc."""
        from ..pipeline import make_context, run_one

        prompts = _prompts(prompts_path, labels, limit)
        model = _load(model_spec, revision, device, device_map, dtype, quantize, remote, token)
        if layers and layers[-1] >= model.n_layers:
            raise BadInput(f"--layers: layer {layers[-1]} does not exist; {model.name} has layers 0-{model.n_layers - 1}")
        ctx = make_context(model, prompts, chat, extra={"layers": layers, "heads": heads})
        path, summary = run_one("attribution", model, prompts, str(store), ctx, batch_size, progress,
                                overwrite=overwrite, lock_timeout=lock_timeout)
        click.echo(f"attribution: {path}")
        if summary:
            click.echo(f"  {summary}")
