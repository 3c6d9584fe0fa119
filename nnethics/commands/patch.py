"""``nnethics patch``: activation patching / causal tracing on its own, with its options."""

from __future__ import annotations

import re

import click

COMPONENT_CHOICES = ("resid", "attn", "mlp")


def _components(ctx, param, value: str) -> tuple[str, ...]:
    comps = tuple(dict.fromkeys(c.strip() for c in value.split(",") if c.strip()))
    bad = [c for c in comps if c not in COMPONENT_CHOICES]
    if bad or not comps:
        raise click.BadParameter(f"unknown components {bad or value!r}; use a comma-separated subset of "
                                 f"{', '.join(COMPONENT_CHOICES)}")
    return comps


def _layers(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """``"0-5,10,12"`` -> (0, 1, 2, 3, 4, 5, 10, 12)."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise click.BadParameter(f"expected layers like '0-5,10', got {value!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise click.BadParameter(f"empty layer range {part!r}")
        out.extend(range(lo, hi + 1))
    return tuple(sorted(set(out)))


def _span(ctx, param, value: str) -> str:
    if value.startswith("regex:"):
        try:
            re.compile(value[len("regex:"):])
        except re.error as e:
            raise click.BadParameter(f"invalid regular expression: {e}") from None
    elif value not in ("option1", "option2", "options"):
        raise click.BadParameter(f"expected option1, option2, options or regex:<pattern>, got {value!r}")
    return value


def register(cli: click.Group) -> None:
    from ..cli import BadInput, _load, _prompts, friendly, model_options, prompt_options, store_options

    @cli.command()
    @model_options
    @prompt_options
    @click.option("--components", default="resid,attn,mlp", show_default=True, callback=_components,
                  help="Comma-separated states to patch: resid (layer output), attn, mlp (their contributions).")
    @click.option("--positions", type=click.Choice(["last", "grid", "all"]), default="last", show_default=True,
                  help="last: the decision position; grid: each aligned position on its own (position x layer); "
                       "all: every position at once.")
    @click.option("--corruption", type=click.Choice(["counterfactual", "noise"]), default="counterfactual",
                  show_default=True, help="Patch from the counterfactual prompt, or restore clean states into a "
                                          "noised base (Meng et al. 2022).")
    @click.option("--noise-scale", type=click.FloatRange(min=0), default=3.0, show_default=True,
                  help="Noise std as a multiple of the std of the clean embeddings over the span.")
    @click.option("--noise-std", type=click.FloatRange(min=0), default=None, help="Absolute noise std (overrides --noise-scale).")
    @click.option("--noise-samples", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Noise draws per prompt; the corrupted and restored logit differences are their mean "
                       "(ROME uses 10).")
    @click.option("--noise-span", default="option1", show_default=True, callback=_span,
                  help="Tokens to corrupt: option1, option2, options, or regex:<pattern> on the formatted prompt.")
    @click.option("--window", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Patch/restore this many neighbouring layers around each layer (ROME window).")
    @click.option("--layers", default=None, callback=_layers, help="Layers to patch, e.g. '0-5,10' (default: all).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
    @click.option("--atp/--no-atp", default=True, show_default=True, help="Attribution patching beside the exact values.")
    @click.option("--kv-cache", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="Reuse the prefix's key/value cache when only the last position is patched.")
    @store_options
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Pairs per chunk (halved on out-of-memory).")
    @click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
    @friendly
    def patch(model_spec, revision, device, device_map, dtype, quantize, remote, token, prompts_path, labels, chat,
              limit, components, positions, corruption, noise_scale, noise_std, noise_samples, noise_span, window, layers, seed, atp,
              kv_cache, store, overwrite, lock_timeout, batch_size, progress) -> None:
        """Activation patching / causal tracing of the decision; writes STORE/<model>/patching*.nc."""
        from ..analyses.patching import NAMES, SPECS
        from ..pipeline import ANALYSES, make_context, run_one

        for spec in SPECS:  # the grid/noise variants are default=False specs of the same module
            ANALYSES.setdefault(spec.name, spec)
        prompts = _prompts(prompts_path, labels, limit)
        model = _load(model_spec, revision, device, device_map, dtype, quantize, remote, token)
        if layers is not None and layers[-1] >= model.n_layers:
            raise BadInput(f"--layers {','.join(map(str, layers))}: the model has layers 0..{model.n_layers - 1}")
        if kv_cache == "on" and positions != "last":
            raise BadInput("--kv-cache on needs --positions last (only the last position can reuse the prefix cache)")
        extra = dict(components=list(components), layers=list(layers) if layers else None, window=window,
                     noise_scale=noise_scale, noise_std=noise_std, noise_samples=noise_samples, noise_span=noise_span, seed=seed, atp=atp,
                     kv_cache=kv_cache)
        ctx = make_context(model, prompts, chat, extra)
        name = NAMES[(corruption, positions)]
        path, summary = run_one(name, model, prompts, str(store), ctx, batch_size, progress, overwrite=overwrite,
                                lock_timeout=lock_timeout)
        click.echo(f"{name}: {path}")
        if summary:
            click.echo(f"  {summary}")
