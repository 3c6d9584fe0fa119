"""Tuned-lens training: the KL gradient, held-out KL going down, resuming, the corpus, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from nnethics.analyses.lens import evaluate_lenses
from nnethics.analyses.lens import training as T
from nnethics.analyses.lens.lenses import TunedLens, Unembed
from nnethics.analyses.lens.training import TrainOptions


def _kl_grad_reference(unembed, n, p):
    n = n.detach().clone().requires_grad_(True)
    log_q = unembed.logits_from_normed(n).log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1)
    kl.mean().backward()
    return kl.detach(), n.grad


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_manual_kl_gradient_matches_autograd(tiny_models, family):
    model = tiny_models(family)
    unembed = Unembed.from_model(model)
    g = torch.Generator().manual_seed(0)
    n = torch.randn(6, model.d_model, generator=g)
    p = torch.softmax(3 * torch.randn(6, model.config.vocab_size, generator=g), -1)
    want_kl, want_grad = _kl_grad_reference(unembed, n, p)
    w = unembed.weight(torch.float32)
    b = unembed._bias
    kl, grad = T._kl_and_grad(n, p, p @ w, p @ b if b is not None else 0.0, (p * p.log()).sum(-1), unembed, torch.float32)
    torch.testing.assert_close(kl, want_kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_first_training_loss_is_the_logit_lens_kl(tokenizer, prompt_set, family):
    """The translators start at zero, so the loss of step 0 is the logit lens' KL(final ‖ layer) averaged over the
    layers before the last: computed here from hooked layer outputs with the model's own final norm, unembedding and
    soft-cap (no nnethics), one token at a time (a one-token cache: every position drawn is that token)."""
    from conftest import STRONG_STD, make_tiny

    model = make_tiny(family, tokenizer, init_std=STRONG_STD)
    hf = model.lm._module
    L = model.n_layers
    ids = torch.tensor([tokenizer(prompt_set.pairs[0].base, add_special_tokens=False)["input_ids"][:6]])
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in hooks:
            h.remove()
    resid = torch.stack([outs[i][0] for i in range(L)]).float()  # [L, tokens, d]
    cap = getattr(hf.config, "final_logit_softcapping", None)

    def log_softmax_of(h):
        z = hf.lm_head(hf.model.norm(h)).double()
        return torch.log_softmax(cap * torch.tanh(z / cap) if cap else z, -1)

    unembed = Unembed.from_model(model)
    opts = TrainOptions(steps=1, batch_tokens=8, matmul_dtype="float32")
    losses, wants = [], []
    for t in range(resid.shape[1]):
        with torch.no_grad():
            log_p = log_softmax_of(resid[-1, t])
            wants.append(np.mean([float((log_p.exp() * (log_p - log_softmax_of(resid[k, t]))).sum())
                                  for k in range(L - 1)]))
        (loss,) = T.fit_tuned_lens(TunedLens.from_model(model), unembed, resid[:, t:t + 1], opts)  # one step
        losses.append(loss)
    np.testing.assert_allclose(losses, wants, rtol=1e-4, atol=1e-6)
    assert min(wants) > 0.05 and np.ptp(wants) > 0.01  # real, token-dependent KLs, not 0 == 0


def _tiny_corpus(tmp_path, prompt_set):
    text = "\n\n".join(p.base for p in prompt_set.pairs) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return [path]


TINY = TrainOptions(steps=20, lr=3e-3, batch_tokens=64, seq_len=32, train_tokens=768, eval_tokens=256,
                    heldout=0.2, checkpoint_every=5, matmul_dtype="float32")


def test_training_lowers_heldout_kl(tiny_models, tmp_path, prompt_set):
    model = tiny_models("llama")
    corpus = _tiny_corpus(tmp_path, prompt_set)
    lens, info = T.train_tuned_lens(model, corpus, TINY, out=tmp_path / "lens", progress=False, log=lambda m: None)
    assert info["history"][-1] < info["history"][0]
    assert not (tmp_path / "lens" / "checkpoint.pt").exists()
    ds = evaluate_lenses(model, TunedLens.load(tmp_path / "lens", model))
    kl = ds["kl"]
    assert (kl.sel(lens="tuned") < kl.sel(lens="logit")).values[:-1].all(), kl.values
    # clearly below at every non-final layer, the second-to-last included: 20 steps take it to 0.72 and 0.61 of the
    # logit lens' KL here, while a lens trained toward another layer than the last stays at 1.00 of it there
    ratio = (kl.sel(lens="tuned") / kl.sel(lens="logit")).values[:-1]
    assert (ratio < 0.85).all() and len(ratio) == model.n_layers - 1, kl.values
    assert float(abs(kl.sel(lens="tuned").isel(layer=-1))) < 1e-5
    assert ds.attrs["n_tokens"] == 256
    assert lens.config.training["corpus_files"] == [str(corpus[0].resolve())]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_heldout_evaluation_matches_a_hook_reference(tokenizer, tmp_path, prompt_set, family):
    """evaluate_lenses' per-layer KL(final ‖ lens) and top-1 agreement, for the logit lens and a random tuned
    lens, equal the mean over every held-out position of a plain-hook computation (the model's own output
    distribution against each layer decoded by hand, translators applied from their raw weights)."""
    from conftest import make_tiny
    from reference.lens import lens_fit

    from nnethics.data.corpus import chat_documents, read_documents, split_documents, token_windows

    # Weights at std 1: peaked distributions whose layers disagree by nats. With broad ones (std 0.2, or
    # Gemma's soft-cap) KL(p‖q) and KL(q‖p) agree to second order and a reversed KL hides in any tolerance.
    model = make_tiny(family, tokenizer, init_std=1.0)
    corpus = _tiny_corpus(tmp_path, prompt_set)
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lens.config.training = {"options": TINY.to_dict(), "corpus_files": [str(corpus[0])]}
    ds = evaluate_lenses(model, lens, eval_tokens=96)
    # the held-out windows, chosen as the lens' record says
    docs, _ = read_documents(corpus)
    _, held = split_documents(docs, TINY.heldout, TINY.seed)
    windows = token_windows(tokenizer, chat_documents(tokenizer, held, TINY.chat_fraction, TINY.seed), TINY.seq_len, 96)
    L = model.n_layers
    weights = [(t.weight.detach().double(), t.bias.detach().double()) for t in lens.layer_translators]

    def tuned(layer, h):  # the output of layer l uses translator l + 1; the last layer's output is untouched
        if layer == L - 1:
            return h
        w, b = weights[layer + 1]
        return (h.double() + h.double() @ w.T + b).to(h.dtype)

    hf = model.lm._module
    sums = {name: [torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)] for name in ("logit", "tuned")}
    n = 0
    for w in windows:
        ids = torch.tensor([w])
        for name, fn in (("logit", None), ("tuned", tuned)):
            kl, top1 = lens_fit(hf, ids, fn)
            sums[name][0] += kl.sum(-1)
            sums[name][1] += top1.double().sum(-1)
        n += len(w)
    assert ds.attrs["n_tokens"] == n
    for name in ("logit", "tuned"):
        kl, top1 = sums[name][0] / n, sums[name][1] / n
        assert kl[:-1].min() > 0.05, kl  # far from 0, where KL(p‖q) and KL(q‖p) would both vanish
        np.testing.assert_allclose(ds["kl"].sel(lens=name).values[:-1], kl[:-1].numpy(), rtol=1e-4, atol=1e-6)
        assert abs(float(ds["kl"].sel(lens=name).values[-1])) < 1e-5
        np.testing.assert_allclose(ds["top1_agreement"].sel(lens=name).values, top1.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(ds["kl"].sel(lens="tuned").values[:-1], ds["kl"].sel(lens="logit").values[:-1], rtol=1e-2)


def test_evaluation_formats_held_out_documents_as_the_lens_was_trained(tiny_models, tmp_path, prompt_set):
    """The held-out text is chat-formatted with the lens' own ``chat_fraction``; a lens saved before the
    option existed (no ``chat_fraction`` in its record) was trained on plain text and is evaluated so."""
    model = tiny_models("llama")
    corpus = _tiny_corpus(tmp_path, prompt_set)
    plain = dataclasses.replace(TINY, steps=2, chat_fraction=0.0)
    lens, _ = T.train_tuned_lens(model, corpus, plain, out=tmp_path / "lens", progress=False, log=lambda m: None)
    as_trained = evaluate_lenses(model, lens)
    old = TunedLens.load(tmp_path / "lens", model)
    del old.config.training["options"]["chat_fraction"]
    chatty = TunedLens.load(tmp_path / "lens", model)
    chatty.config.training["options"]["chat_fraction"] = 1.0
    xr.testing.assert_identical(evaluate_lenses(model, old), as_trained)
    assert not np.allclose(evaluate_lenses(model, chatty)["kl"], as_trained["kl"])


def test_training_resumes_from_checkpoint(tiny_models, tmp_path, prompt_set, monkeypatch):
    model = tiny_models("llama")
    corpus = _tiny_corpus(tmp_path, prompt_set)
    opts = dataclasses.replace(TINY, steps=8)
    whole, _ = T.train_tuned_lens(model, corpus, opts, out=tmp_path / "a", progress=False, log=lambda m: None)

    real_fit = T.fit_tuned_lens

    def interrupted(*args, on_checkpoint=None, **kwargs):
        def save_then_stop(snap):
            on_checkpoint(snap)
            raise KeyboardInterrupt

        return real_fit(*args, on_checkpoint=save_then_stop, **kwargs)

    monkeypatch.setattr(T, "fit_tuned_lens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train_tuned_lens(model, corpus, opts, out=tmp_path / "b", progress=False, log=lambda m: None)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    monkeypatch.setattr(T, "fit_tuned_lens", real_fit)
    said = []
    resumed, _ = T.train_tuned_lens(model, corpus, opts, out=tmp_path / "b", progress=False, log=said.append)
    assert any("resuming" in s and "step 5/8" in s for s in said), said
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_defaults_match_train_options():
    from nnethics.cli import cli

    defaults = {p.name: p.default for p in cli.commands["lens"].commands["train"].params}
    for name, value in TrainOptions().to_dict().items():
        if name in defaults:
            assert defaults[name] == value, name


def test_cli_train_eval_run_on_a_saved_tiny_model(tiny_model_dir, tmp_path, prompt_set):
    from nnethics.cli import cli
    from nnethics.store import load

    corpus = _tiny_corpus(tmp_path, prompt_set)
    runner = CliRunner()
    lens_dir, store = tmp_path / "lens", tmp_path / "store"
    model = ["--model", str(tiny_model_dir)]
    res = runner.invoke(cli, ["lens", "train", *model, "--corpus", str(corpus[0]), "--out", str(lens_dir), "--steps", "20",
                              "--lr", "3e-3", "--batch-tokens", "64", "--seq-len", "32", "--train-tokens", "1024",
                              "--eval-tokens", "256", "--heldout", "0.2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (lens_dir / "params.safetensors").exists() and "saved to" in res.output
    res = runner.invoke(cli, ["lens", "eval", *model, "--lens", str(lens_dir), "--store", str(store)])
    assert res.exit_code == 0, res.output
    ev = load(store / tiny_model_dir.name.lower() / "lens_eval.nc")
    assert dict(ev.sizes) == {"lens": 2, "layer": 3} and ev.attrs["analysis"] == "lens_eval"
    assert "tuned lens lower at 2 of 2 layers" in res.output
    # a second evaluation never replaces the first silently: exit 2 before the model loads, the file unchanged
    before = (store / tiny_model_dir.name.lower() / "lens_eval.nc").read_bytes()
    res = runner.invoke(cli, ["lens", "eval", *model, "--lens", str(lens_dir), "--store", str(store)])
    assert res.exit_code == 2 and "lens_eval.nc exists; rerun with --overwrite" in res.output, res.output
    assert "loading model" not in res.output
    assert (store / tiny_model_dir.name.lower() / "lens_eval.nc").read_bytes() == before
    res = runner.invoke(cli, ["lens", "eval", *model, "--lens", str(lens_dir), "--store", str(store), "--overwrite"])
    assert res.exit_code == 0 and "tuned lens lower at 2 of 2 layers" in res.output, res.output
    res = runner.invoke(cli, ["lens", "run", *model, "--limit", "2", "--store", str(store), "--tuned-lens", str(lens_dir),
                              "--k", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    ds = load(store / tiny_model_dir.name.lower() / "lens.nc")
    assert dict(ds.sizes) == {"prompt": 2, "side": 2, "lens": 2, "layer": 3, "k": 4, "option": 2}
    assert json.loads(ds.attrs["options"])["tuned_lens"] == str(lens_dir)


def test_corpus_split_chat_formatting_and_windows(tokenizer):
    from nnethics.data.corpus import CorpusError, chat_documents, read_documents, split_documents, token_windows

    docs, sha = read_documents()
    assert len(docs) > 100 and len(sha) == 64
    train, held = split_documents(docs, 0.1, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == len(docs)
    assert (train, held) == split_documents(docs, 0.1, seed=0) and held != split_documents(docs, 0.1, seed=1)[1]
    chat = chat_documents(tokenizer, held, 0.5, seed=0)
    wrapped = [c for c, d in zip(chat, held) if c != d]
    assert len(wrapped) == round(0.5 * len(held)) and chat == chat_documents(tokenizer, held, 0.5, seed=0)
    assert all(c.startswith("<|im_start|>") and c.endswith("<|im_start|>assistant\n") for c in wrapped)
    assert chat_documents(tokenizer, held, 0.0, seed=0) == held
    windows = token_windows(tokenizer, chat, seq_len=64, max_tokens=1024)
    assert len(windows) == 16 and {len(w) for w in windows} == {64}
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sum(w.count(im_start) for w in windows) >= 2  # the template's special tokens, not their spelling
    with pytest.raises(CorpusError, match="chat fraction"):
        chat_documents(tokenizer, held, 1.5, seed=0)
    with pytest.raises(CorpusError, match="seq_len"):
        token_windows(tokenizer, held, seq_len=1, max_tokens=10)
