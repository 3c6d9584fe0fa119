"""``nnethics lens``: train and evaluate tuned lenses, and compute lens.nc on its own."""

from __future__ import annotations

from pathlib import Path

import click

from ...commands.analysis import analysis_command
from ...commands.common import (
    DEFAULT_STORE,
    BadInput,
    FiniteFloat,
    checked_store,
    friendly,
    load_model_from_options,
    model_options,
)
from . import ANALYSIS

EVAL = "lens_eval"  # STORE/<model>/lens_eval.nc


def _corpus_errors():
    from ...data.corpus import CorpusError

    return CorpusError


@click.group("lens")
def lens_group() -> None:
    """Logit lens and tuned lens: train a tuned lens, evaluate it, compute lens.nc."""

@lens_group.command("train")
@model_options
@click.option("--corpus", multiple=True, type=click.Path(path_type=Path),
              help="Text file(s) to train on; documents are separated by blank lines (repeatable). "
                   "Default: the shipped corpus (MoralChoice scenarios + nnethics prompts).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Lens folder (default: $NNETHICS_CACHE/lenses/<model>/, which `nnethics run` picks up).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Positions per step.")
@click.option("--train-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Training tokens whose residuals are cached (float32: layers x tokens x d_model x 4 bytes).")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Held-out tokens `lens eval` uses by default.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per window.")
@click.option("--heldout", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="Fraction of documents held out for evaluation.")
@click.option("--chat-fraction", type=FiniteFloat(0, 1), default=0.5, show_default=True,
              help="Fraction of documents wrapped in the chat template, like the analysed prompts.")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--matmul-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="dtype of the unembedding matmuls while training (auto: bfloat16 where faster).")
@click.option("--restart", is_flag=True, help="Ignore a checkpoint left by an interrupted run.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: when stderr is a terminal).")
@friendly
def lens_train(model_spec, revision, device, device_map, dtype, quantize, remote, token, corpus, out, steps, lr,
               batch_tokens, train_tokens, eval_tokens, seq_len, heldout, chat_fraction, weight_decay, seed, matmul_dtype, restart,
               progress) -> None:
    """Train a tuned lens for a model (resumable from its last checkpoint).

    Per layer an affine translator h + A h + b (Belrose et al. 2023), zero at the start, is fitted to
    minimise KL(final ‖ lens) over every position of the corpus; a split of its documents is held out
    for `nnethics lens eval`.
    """
    from .training import TrainOptions, train_tuned_lens

    if remote:
        raise BadInput("training a tuned lens needs the model's weights locally; drop --remote")
    options = TrainOptions(steps=steps, lr=lr, batch_tokens=batch_tokens, train_tokens=train_tokens,
                           eval_tokens=eval_tokens, seq_len=seq_len, heldout=heldout, chat_fraction=chat_fraction,
                           weight_decay=weight_decay, seed=seed, matmul_dtype=matmul_dtype)
    from ...data.corpus import read_documents

    try:
        read_documents(list(corpus) or None)  # fail on a bad corpus before loading the model
    except _corpus_errors() as e:
        raise BadInput(str(e)) from None
    model = load_model_from_options(model_spec, revision, device, device_map, dtype, quantize, remote, token)
    try:
        _, info = train_tuned_lens(model, list(corpus) or None, options, out=out, progress=progress,
                                   resume=not restart, log=lambda m: click.echo(m, err=True))
    except _corpus_errors() as e:
        raise BadInput(str(e)) from None
    final = info["final_train_kl"]
    click.echo(f"tuned lens for {model.name}: {info['n_train_tokens']} training tokens, {steps} steps; "
               f"caching {info['cache_seconds']:.0f} s, training {info['train_seconds']:.0f} s"
               + (f"; final training KL {final:.3f} nats (mean over layers)" if final is not None else ""))
    click.echo(f"saved to {info['path']}")
    click.echo(f"held-out evaluation: nnethics lens eval --model {model_spec} --lens {info['path']}")

@lens_group.command("eval")
@model_options
@click.option("--lens", "lens_path", type=click.Path(path_type=Path), default=None,
              help="Tuned lens folder (default: the cached lens of the model).")
@click.option("--corpus", multiple=True, type=click.Path(path_type=Path),
              help="Evaluate on the held-out split of these files instead of the lens' training corpus.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=None, help="Held-out tokens (default: the lens' setting).")
@click.option("--store", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path), callback=checked_store,
              help="Output folder.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace a lens_eval.nc already in the model's folder (without it, one there stops the command "
                   "before the model loads).")
@friendly
def lens_eval(model_spec, revision, device, device_map, dtype, quantize, remote, token, lens_path, corpus, eval_tokens,
              store, overwrite) -> None:
    """Held-out KL of the logit lens and the tuned lens per layer; writes STORE/<model>/lens_eval.nc."""
    from ...engine import Run
    from ...engine.run import refuse_existing
    from ...models.loading import store_slug
    from . import evaluate_lenses
    from .lenses import TunedLens, find_cached_lens

    if remote:
        raise BadInput("lens evaluation needs the model's weights locally; drop --remote")
    # before the load: Run.write's own rule
    refuse_existing(Path(store) / store_slug(model_spec, quantize=quantize, remote=remote) / f"{EVAL}.nc", overwrite)
    model = load_model_from_options(model_spec, revision, device, device_map, dtype, quantize, remote, token)
    folder = lens_path or find_cached_lens(model)
    if folder is None:
        raise BadInput(f"no tuned lens cached for {model.name}; train one with `nnethics lens train --model {model_spec}` "
                       "or pass --lens")
    lens = TunedLens.load(folder, model)
    click.echo(f"evaluating {folder} ...", err=True)
    try:
        ds = evaluate_lenses(model, lens, list(corpus) or None, eval_tokens)
    except _corpus_errors() as e:
        raise BadInput(str(e)) from None
    options = {"lens": str(folder), "eval_tokens": ds.attrs["n_tokens"], "corpus": ds.attrs["corpus_files"]}
    with Run(model, store, overwrite=overwrite) as run:
        path = run.write(EVAL, ds, options)
    click.echo(f"held-out KL(final ‖ lens) in nats, {ds.attrs['n_tokens']} tokens:")
    click.echo(f"{'layer':>5}  {'logit':>8}  {'tuned':>8}  {'top1 logit':>10}  {'top1 tuned':>10}")
    kl, top1 = ds["kl"], ds["top1_agreement"]
    for layer in ds["layer"].values:
        click.echo(f"{layer:>5}  {float(kl.sel(lens='logit', layer=layer)):8.3f}  {float(kl.sel(lens='tuned', layer=layer)):8.3f}"
                   f"  {float(top1.sel(lens='logit', layer=layer)):10.3f}  {float(top1.sel(lens='tuned', layer=layer)):10.3f}")
    better = (kl.sel(lens="tuned") < kl.sel(lens="logit")).values[:-1]
    click.echo(f"tuned lens lower at {int(better.sum())} of {len(better)} layers before the last")
    click.echo(f"wrote {path}")

lens_group.add_command(analysis_command(ANALYSIS, name="run"))


def register(cli: click.Group) -> None:
    cli.add_command(lens_group)
