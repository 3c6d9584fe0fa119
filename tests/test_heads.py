"""Per-head activation patching (``heads``) against the plain-hook reference in tests/reference/heads.py, eager
``output_attentions``, exact identities, finalize's ranking, the remote dry run, the CLI and the README schema."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import FAMILIES, PROMPTS, SHORT_PAIRS, STRONG_STD, make_tiny, save_tiny
from reference import heads as ref
from reference import patching as ref_patching

import nnethics as ne
from nnethics.analyses import ANALYSES
from nnethics.analyses.attribution import AttributionOptions
from nnethics.analyses.common import encode_pairs
from nnethics.analyses.heads import ANALYSIS, HeadsOptions, complete_attention, finalize, head_patching, top_heads
from nnethics.analyses.heads.candidates import CANDIDATES
from nnethics.analyses.patching import PatchingOptions
from nnethics.engine import activation_patching, direct_logit_attribution
from nnethics.prompts import PromptPair, load_prompts

TOL = dict(rtol=0, atol=1e-4)
ATT_TOL = dict(rtol=0, atol=1e-5)
PLAIN = dict(chat=False)
SHORT = SHORT_PAIRS[:2]


def _tokens(model, pairs, chat=False):
    batch = encode_pairs(model, pairs, ["1", "2"], chat=chat)
    toks = [(torch.tensor([batch.encoded.tokens(batch.row(i, "base"))]),
             torch.tensor([batch.encoded.tokens(batch.row(i, "cf"))])) for i in range(batch.n)]
    return tuple(batch.label_ids), toks


def _every_head_attention(model, ds, pairs, options):
    """The ``complete`` pass' fallback with every head chosen: ``[prompt, side, layer, head, token]``; the
    candidates the chunk ``ds`` brought back (a chunk of ``pairs``) are the same bits."""
    L, H = ds.sizes["layer"], ds.sizes["head"]
    done = complete_attention(model, finalize(ds.drop_vars(CANDIDATES), top=L * H, n_resamples=10), pairs, options)
    assert done["attention"].attrs["fallback_prompts"] == ds.sizes["prompt"] and not set(CANDIDATES) & set(done)
    att = np.full((ds.sizes["prompt"], 2, L, H, done.sizes["token"]), np.nan, np.float32)
    for r, (la, h) in enumerate(zip(done["top_layer"].values, done["top_head"].values)):
        att[:, :, la, h] = done["attention"].values[:, :, r]
    assert sorted(zip(done["top_layer"].values, done["top_head"].values)) == [(la, h) for la in range(L)
                                                                              for h in range(H)]
    assert ds.sizes["candidate"] == min(2 * options.top_heads, L * H)
    for i in range(ds.sizes["prompt"]):
        for j, (la, h) in enumerate(zip(ds["candidate_layer"].values[i], ds["candidate_head"].values[i])):
            np.testing.assert_array_equal(ds["candidate_attention"].values[i, :, j], att[i, :, la, h])
    return att


def _check_against_reference(model, ds, pairs, chat=False, layers=None, spread=1e-2, options=None):
    hf = model.lm._module
    ids, toks = _tokens(model, pairs, chat)
    assert len({b.shape[1] for b, _ in toks}) > 1  # left padding is exercised
    rows = slice(None) if layers is None else layers
    every = _every_head_attention(model, ds, pairs, options or HeadsOptions(chat=chat))
    for i, (b, c) in enumerate(toks):
        want = ref.head_sweep(hf, b, c, ids, layers).numpy()[rows]
        assert want.std() > spread  # the heads do move the decision: the comparison means something
        np.testing.assert_allclose(ds["patched_logit_diff"].values[i][rows], want, **TOL)
        np.testing.assert_allclose(float(ds["base_logit_diff"][i]), ref_patching.logit_diff(hf, b, ids), **TOL)
        np.testing.assert_allclose(float(ds["cf_logit_diff"][i]), ref_patching.logit_diff(hf, c, ids), **TOL)
        for s, x in enumerate((b, c)):
            att = ref.decision_attention(hf, x).numpy()
            got = every[i, s]
            np.testing.assert_allclose(got[..., :x.shape[1]], att, **ATT_TOL)
            assert np.isnan(got[..., x.shape[1]:]).all()  # padded at the end, as input_ids are
            np.testing.assert_array_equal(ds["input_ids"].values[i, s, :x.shape[1]], x[0].numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_matches_the_hook_reference_and_attention_matches_eager(family, strong_models):
    """Every (layer, head) on the KV path (in layer blocks) and on full forwards; attention vs eager."""
    model = strong_models(family)
    kv = head_patching(model, SHORT, HeadsOptions(**PLAIN, kv_cache="on"))
    full = head_patching(model, SHORT, HeadsOptions(**PLAIN, kv_cache="off"))
    assert set(kv["forward_path"].values) == {"kv_cache"} and set(full["forward_path"].values) == {"full"}
    for ds, kv_cache in ((kv, "on"), (full, "off")):
        _check_against_reference(model, ds, SHORT, options=HeadsOptions(**PLAIN, kv_cache=kv_cache))
    np.testing.assert_allclose(kv["patched_logit_diff"], full["patched_logit_diff"], rtol=0, atol=1e-5)
    assert model.lm._module.config._attn_implementation != "eager" or family.startswith("gemma")  # restored


@pytest.mark.slow
def test_builtin_model_matches_the_reference(builtin_model, prompt_set):
    """The built-in SmolLM2 (GQA: 9 query heads, 3 key/value heads) on 2 chat-formatted pairs; the reference (one
    ~100-token forward per head) on 5 layers of the 30, one in each layer block of the KV path and the last."""
    pairs = [prompt_set.pairs[i] for i in (0, 3)]
    ds = head_patching(builtin_model, pairs)
    assert ds.sizes["head"] == 9 and "query heads" in ds.attrs["heads"]
    _check_against_reference(builtin_model, ds, pairs, chat=None, layers=[0, 7, 16, 23, 29], spread=1e-3)


def test_identities(strong_models):
    """A head patched from the base itself changes nothing; per-head AtP sums to patching's attention AtP; head DLA
    is attribution's head_contribution."""
    model = strong_models("llama")
    same = PromptPair("same", SHORT[0].base, SHORT[0].base, "1", "1")
    for kv in ("on", "off"):
        ds = head_patching(model, [same, SHORT[1]], HeadsOptions(**PLAIN, kv_cache=kv))
        np.testing.assert_allclose(ds["patched_logit_diff"].values[0], float(ds["base_logit_diff"][0]), **TOL)
        assert not bool(ds["effect_defined"][0]) and np.isnan(ds["effect"].values[0]).all()
        assert not ds["flipped"].values[0].any() and np.abs(ds["atp_delta"].values[0]).max() == 0
    for family, kv in itertools.product(("llama", "gpt2"), ("on", "off")):  # o_proj is linear: the heads' AtP
        model = strong_models(family)                                     # terms add up to the attention output's
        heads = head_patching(model, SHORT, HeadsOptions(**PLAIN, kv_cache=kv))
        layers = activation_patching(model, SHORT, PatchingOptions(**PLAIN, components=("attn",), atp=True))
        np.testing.assert_allclose(heads["atp_delta"].sum("head"), layers["atp_delta"].values[..., 0], rtol=1e-4,
                                   atol=1e-5)
        dla = direct_logit_attribution(model, SHORT, AttributionOptions(**PLAIN))
        np.testing.assert_allclose(heads["head_dla"].values, dla["head_contribution"].values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_cache", ["on", "off"])
def test_without_atp_the_same_patching_and_attention(strong_models, kv_cache):
    """``atp=False`` drops the backward only: the same bits of the patched LDs and the candidates' attention as with AtP (on the KV
    path the base and cf rows' forward then runs without gradients), no AtP, and the fallback still gives the
    candidates' bits."""
    model = strong_models("qwen2")
    opts = dict(**PLAIN, kv_cache=kv_cache)
    with_atp = head_patching(model, SHORT, HeadsOptions(**opts))
    without = head_patching(model, SHORT, HeadsOptions(**opts, atp=False))
    assert np.isfinite(with_atp["atp_delta"].values).all() and "atp_delta" not in without and "atp_effect" not in without
    for name in ("patched_logit_diff", "base_logit_diff", "cf_logit_diff", "head_dla", "candidate_attention"):
        np.testing.assert_array_equal(without[name].values, with_atp[name].values, err_msg=name)
    _every_head_attention(model, without, SHORT, HeadsOptions(**opts, atp=False))


def test_derived_values(strong_models):
    model = strong_models("qwen2")
    ds = head_patching(model, SHORT, HeadsOptions(**PLAIN, min_gap=0.0))
    b, c, p = (ds[v].values.astype(np.float64) for v in ("base_logit_diff", "cf_logit_diff", "patched_logit_diff"))
    np.testing.assert_allclose(ds["effect"].values, (p - b[:, None, None]) / (c - b)[:, None, None], rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_array_equal(ds["flipped"].values, (p > 0) != (b[:, None, None] > 0))
    a = ds["atp_delta"].values.astype(np.float64)
    np.testing.assert_allclose(ds["atp_effect"].values, a / (c - b)[:, None, None], rtol=1e-3, atol=1e-4)
    for i in range(len(SHORT)):
        want = np.corrcoef(a[i].ravel(), (p[i] - b[i]).ravel())[0, 1]
        np.testing.assert_allclose(float(ds["atp_correlation"][i]), want, atol=1e-4)


def test_finalize_ranks_by_mean_abs_effect_then_dla_and_complete_adds_the_top_attention(strong_models):
    model = strong_models("mistral")
    opts = HeadsOptions(**PLAIN, min_gap=0.0)
    ds = head_patching(model, SHORT, opts)
    # the chunk brings back its candidates' attention only (here every head: 2 x 8 top heads > 3 x 4)
    assert [v for v in ds.data_vars if "token" in ds[v].dims and v not in ("input_ids", "token_text")] == [
        "candidate_attention"]
    assert ds["candidate_attention"].shape == (2, 2, 12, ds.sizes["token"])
    out = finalize(ds, top=5, n_resamples=200)
    mean = np.abs(np.nanmean(ds["effect"].values, axis=0))
    want = sorted(((la, h) for la in range(3) for h in range(4)), key=lambda c: -mean[c])[:5]
    assert list(zip(out["top_layer"].values, out["top_head"].values)) == want
    assert "attention" not in out  # the complete pass adds it
    every = _every_head_attention(model, ds, SHORT, opts)
    pairs = [SHORT[1], PromptPair("other", "x", "y", "1", "2"), SHORT[0]]  # matched by id; extra pairs ignored
    for source, batch_size in itertools.product((out, out.drop_vars(CANDIDATES)), (1, 8)):  # candidates, fallback
        done = complete_attention(model, source, pairs, opts, batch_size=batch_size)
        assert done["attention"].dims == ("prompt", "side", "rank", "token")
        assert done["attention"].shape == (2, 2, 5, ds.sizes["token"])
        assert done["attention"].attrs["fallback_prompts"] == (0 if source is out else 2)
        for r, (la, h) in enumerate(want):  # rank r is head want[r], whatever order the trace read them in
            np.testing.assert_allclose(done["attention"].values[:, :, r], every[:, :, la, h], rtol=0,
                                       atol=0 if batch_size == 8 or source is out else 1e-6)
    # finalize again (a rerun of the finished file): the same heads keep their attention, other heads drop it
    np.testing.assert_array_equal(finalize(done, top=5, n_resamples=10)["attention"], done["attention"])
    assert "attention" not in finalize(done, top=3, n_resamples=10)
    for source in (out, out.drop_vars(CANDIDATES)):
        one = complete_attention(model, source, [SHORT[1]], opts)  # a prompt without its pair stays NaN
        assert np.isnan(one["attention"].values[0]).all()
        np.testing.assert_allclose(one["attention"].values[1], done["attention"].values[1], rtol=0, atol=1e-6)
    assert (out["effect_ci_low"] <= out["mean_effect"] + 1e-6).all()
    assert (out["mean_effect"] <= out["effect_ci_high"] + 1e-6).all()
    np.testing.assert_allclose(out["mean_head_dla"], ds["head_dla"].mean(("prompt", "side")), rtol=1e-6)
    # ties in |mean effect| are broken by |DLA|
    tie = ds.copy()
    tie["effect"] = xr.full_like(ds["effect"], 0.5)
    dla = np.zeros_like(ds["head_dla"].values)
    dla[:, :, 2, 3], dla[:, :, 0, 1] = 2.0, -1.0
    tie["head_dla"] = (ds["head_dla"].dims, dla)
    assert top_heads(tie, 3) == [(2, 3), (0, 1), (0, 0)]


def test_traces_pass_the_remote_dry_run(strong_models):
    """Every trace serialises and runs under nnsight's remote="local" and gives the local numbers."""
    model = strong_models("llama")
    for kv in ("on", "off"):
        local = head_patching(model, SHORT, HeadsOptions(**PLAIN, kv_cache=kv))
        dry = head_patching(model.using(remote="local"), SHORT, HeadsOptions(**PLAIN, kv_cache=kv))
        for v in ("patched_logit_diff", "base_logit_diff", "atp_delta", "head_dla"):
            np.testing.assert_allclose(dry[v], local[v], rtol=0, atol=1e-6)
        opts = HeadsOptions(**PLAIN, kv_cache=kv, top_heads=5)
        att = [complete_attention(m, finalize(local, n_resamples=10), SHORT, opts)["attention"]
               for m in (model, model.using(remote="local"))]
        np.testing.assert_allclose(att[1], att[0], rtol=0, atol=1e-6)


def test_registry_options_and_cli(tokenizer, tmp_path):
    from nnethics.cli import cli
    from nnethics.store import load

    assert ANALYSES["heads"] is ANALYSIS and not ANALYSIS.default
    with pytest.raises(ValueError, match="top_heads"):
        HeadsOptions(top_heads=0)
    res = CliRunner().invoke(cli, ["heads", "--top-heads", "0"])
    assert res.exit_code == 2 and "--top-heads" in res.output
    model = make_tiny("llama", tokenizer)
    folder = save_tiny(model, tokenizer, tmp_path / "tiny-llama")
    common = ["--model", str(folder), "--limit", "3", "--store", str(tmp_path / "store"), "--no-progress"]
    res = CliRunner().invoke(cli, ["heads", *common, "--batch-size", "2", "--top-heads", "4"])
    assert res.exit_code == 0, res.output
    ds = load(tmp_path / "store" / "tiny-llama" / "heads.nc")
    assert ds.sizes["prompt"] == 3 and ds.sizes["rank"] == 4 and json.loads(ds.attrs["options"])["top_heads"] == 4
    assert "mean_effect" in ds and ds["attention"].dims == ("prompt", "side", "rank", "token")
    pairs = load_prompts(PROMPTS).pairs[:3]
    want = finalize(head_patching(model, pairs, HeadsOptions(top_heads=4)))
    np.testing.assert_allclose(ds["patched_logit_diff"], want["patched_logit_diff"], atol=1e-5)
    np.testing.assert_array_equal(ds["top_head"], want["top_head"])
    want = complete_attention(model, want, pairs, HeadsOptions(top_heads=4), batch_size=2)
    np.testing.assert_allclose(ds["attention"], want["attention"], rtol=0, atol=1e-6)
    res = CliRunner().invoke(cli, ["heads", *common, "--top-heads", "99"])
    assert res.exit_code == 2 and "--top-heads" in res.output
    res = CliRunner().invoke(cli, ["run", "--analyses", "heads", *common, "--store", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "tiny-llama" / "heads.nc").exists()


def test_a_crash_in_the_complete_pass_keeps_the_parts_and_a_rerun_redoes_only_it(tokenizer, tmp_path, monkeypatch):
    from nnethics.analyses.heads import attention as heads_attention
    from nnethics.analyses.heads import engine as heads_engine
    from nnethics.cli import cli
    from nnethics.store import load

    folder = save_tiny(make_tiny("llama", tokenizer), tokenizer, tmp_path / "tiny-llama")
    args = ["heads", "--model", str(folder), "--limit", "3", "--store", str(tmp_path / "store"), "--no-progress",
            "--batch-size", "2"]
    real_attention, real_heads = heads_attention.fallback_attention, heads_engine.execute

    def lost(*a, **k):
        raise RuntimeError("the connection dropped")

    _miss(monkeypatch)  # every chunk's candidates miss a top head: the complete pass computes them again
    monkeypatch.setattr(heads_attention, "fallback_attention", lost)
    assert CliRunner().invoke(cli, args).exit_code != 0
    final = tmp_path / "store" / "tiny-llama" / "heads.nc"
    assert not final.exists() and len([p for p in final.parent.rglob("*.nc")]) == 2  # the two chunks' parts
    monkeypatch.setattr(heads_attention, "fallback_attention", real_attention)
    calls = []
    monkeypatch.setattr(heads_engine, "execute", lambda *a, **k: calls.append(a) or real_heads(*a, **k))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert not calls  # no chunk is computed again: only the complete pass runs
    ds = load(final)
    assert ds.sizes["prompt"] == 3 and np.isfinite(ds["attention"].values[..., 0]).all()
    assert ds["attention"].attrs["fallback_prompts"] == 3 and "3 pairs computed again" in res.output
    assert not [v for v in ds.variables if "candidate" in v]  # the candidates stay in the parts
    assert not [p for p in final.parent.rglob("*.nc") if p != final]  # the parts are gone once the file is written
    monkeypatch.setattr(heads_attention, "fallback_attention", lost)  # a rerun of the finished file computes none
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert not calls
    again = load(final)
    np.testing.assert_array_equal(again["attention"], ds["attention"])
    np.testing.assert_array_equal(again["top_head"], ds["top_head"])


def _miss(monkeypatch, chunks=None, count=1, others=None):
    """Chunks ``chunks`` (by call number; None: every one) bring back ``count`` candidate heads, the others
    ``others`` (None: as ranked): one misses the top heads (more than one), so the ``complete`` pass' fallback
    computes them; every head misses none."""
    from nnethics.analyses.heads import candidates as heads_candidates

    real, calls = heads_candidates.ranking_job, []

    def job(*a):
        calls.append(a)
        out = real(*a)
        if chunks is None or len(calls) - 1 in chunks:
            return {**out, "count": count}
        return out if others is None else {**out, "count": others}

    monkeypatch.setattr(heads_candidates, "ranking_job", job)
    return calls


def test_candidates_give_the_attention_of_the_fallback_in_one_request_per_chunk(strong_models, prompt_set, monkeypatch):
    """The top heads' attention from the chunks' candidates equals, bit for bit, the fallback's, whether every
    chunk's candidates hold the top heads, some chunks' or none's; a random model's heads rank differently from
    prompt to prompt, so the chunks ranked on the prompts so far miss some (here the first chunks)."""
    model = strong_models("llama")  # 3 layers x 4 heads; 3 top heads -> 6 candidates
    pairs, opts = prompt_set.pairs[:6], HeadsOptions(top_heads=3)
    calls = _miss(monkeypatch, count=12)
    hit = ne.analyze(model, pairs, ["heads"], batch_size=2, heads=opts)["heads"]
    assert hit["attention"].attrs["fallback_prompts"] == 0 and not [v for v in hit.variables if "cand" in v]
    assert np.isfinite(hit["attention"].values[..., 0]).all()
    assert len(calls) == 3 and calls[0][0] is calls[2][0] and calls[2][0].sums is not None  # prepare's RunningRank
    monkeypatch.undo()
    natural = ne.analyze(model, pairs, ["heads"], batch_size=2, heads=opts)["heads"]
    assert natural["attention"].attrs["fallback_prompts"] in (2, 4)  # the first chunk misses; the last does not
    np.testing.assert_array_equal(natural["attention"], hit["attention"])
    from nnethics.analyses.heads import attention as heads_attention

    real = heads_attention.fallback_attention
    for chunks, fallback in (({1}, 2), (None, 6)):
        _miss(monkeypatch, chunks=chunks, others=12)
        asked = []  # one session for every chunk that misses; it computes the heads a chunk's one candidate misses
        monkeypatch.setattr(heads_attention, "fallback_attention", lambda *a, asked=asked, **k: asked.append(a[1]) or real(*a, **k))
        ds = ne.analyze(model, pairs, ["heads"], batch_size=2, heads=opts)["heads"]
        assert ds["attention"].attrs["fallback_prompts"] == fallback and len(asked) == 1
        assert [len(pairs) for pairs, _, _ in asked[0]] == [2] * (fallback // 2)
        assert {len(heads) for _, heads, _ in asked[0]} <= {2, 3} and min(len(h) for _, h, _ in asked[0]) == 2
        np.testing.assert_array_equal(ds["attention"], hit["attention"])
        monkeypatch.undo()


def test_the_chunk_ranking_adds_the_previous_chunks_sums(strong_models, prompt_set):
    """The server-side ranking over the previous chunks' sums plus this chunk's effects is finalize's ranking of
    all those prompts (hand-made: far-apart scores; from a model: the chunk ranking of the last chunk); the
    running sums are the parts'."""
    from nnethics.analyses.heads.attention import rank_candidates
    from nnethics.analyses.heads.candidates import RunningRank, assemble
    from nnethics.store.parts import combine

    model = strong_models("llama")
    opts = HeadsOptions(**PLAIN, min_gap=0.0)
    first, second = head_patching(model, SHORT, opts), head_patching(model, list(prompt_set.pairs[:2]), opts)
    running = RunningRank()
    running.update(first)
    job = running.job(3, 4, 0.0, 5)
    np.testing.assert_allclose(job["effect_sum"], np.nansum(first["effect"].values, 0), rtol=1e-6)
    np.testing.assert_array_equal(job["effect_count"], np.isfinite(first["effect"].values).sum(0))
    np.testing.assert_allclose(job["dla_sum"], np.abs(first["head_dla"].values).sum((0, 1)), rtol=1e-6)
    both = combine([first, second])
    got = rank_candidates(second["patched_logit_diff"].values, np.concatenate(
        [second["base_logit_diff"].values, second["cf_logit_diff"].values]), second["head_dla"].values.transpose(
        1, 0, 2, 3), job)
    assert got == sorted(top_heads(both, 5))
    # hand-made: the prior alone decides against this chunk's effects; ties by |DLA|
    patched = np.zeros((1, 2, 2))
    patched[0, 1, 1] = 0.5                       # effect 0.5 of head (1, 1) in this chunk (base 0, cf 1)
    prior = {"effect_sum": np.array([[3.0, 0.0], [-2.0, 0.0]]), "effect_count": np.full((2, 2), 2.0),
             "dla_sum": np.array([[0.0, 5.0], [0.0, 1.0]]), "min_gap": 0.1, "count": 3}
    # means over 3 prompts: |3/3| (0,0) > |-2/3| (1,0) > 0.5/3 (1,1) > 0 (0,1)
    assert rank_candidates(patched, [0.0, 1.0], np.zeros((2, 2, 2)), prior) == [(0, 0), (1, 0), (1, 1)]
    prior["count"] = 2
    assert rank_candidates(patched, [0.0, 1.0], np.zeros((2, 2, 2)), prior) == [(0, 0), (1, 0)]
    prior["effect_sum"] = np.zeros((2, 2))        # (1,1) leads; (0,0), (0,1), (1,0) tie at 0: |DLA| 5 first
    assert rank_candidates(patched, [0.0, 1.0], np.zeros((2, 2, 2)), prior) == [(0, 1), (1, 1)]
    # assemble: rank r takes candidate where[chosen[r]]; the heads a prompt misses are left to the fallback
    cand = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    layer, head = np.array([[0, 1, 2], [0, 1, -1]]), np.array([[3, 2, 1], [3, 2, -1]])
    att = np.full((2, 2, 2, 5), np.nan, np.float32)
    assert assemble([(2, 1), (0, 3)], layer, head, cand, att, [0, 1]) == {1: [0]}
    np.testing.assert_array_equal(att[0, :, 0, :4], cand[0, :, 2])
    np.testing.assert_array_equal(att[0, :, 1, :4], cand[0, :, 0])
    np.testing.assert_array_equal(att[1, :, 1, :4], cand[1, :, 0])
    assert np.isnan(att[..., 4]).all() and np.isnan(att[1, :, 0]).all()


def test_a_larger_limit_adds_prompts_to_a_finished_file(tokenizer, tmp_path):
    """A finished file (no candidates) and new chunks' parts (with them): the new prompts' attention from their
    candidates, the old ones' kept (or computed again, in their own chunks, if the top heads change); the same
    bits as one run."""
    from nnethics.cli import cli
    from nnethics.store import load

    folder = save_tiny(make_tiny("llama", tokenizer, init_std=STRONG_STD), tokenizer, tmp_path / "tiny-llama")
    common = ["heads", "--model", str(folder), "--no-progress", "--batch-size", "2", "--top-heads", "3"]
    for limit in ("2", "6"):
        res = CliRunner().invoke(cli, [*common, "--limit", limit, "--store", str(tmp_path / "grown")])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*common, "--limit", "6", "--store", str(tmp_path / "once")])
    assert res.exit_code == 0, res.output
    grown, once = load(tmp_path / "grown" / "tiny-llama" / "heads.nc"), load(tmp_path / "once" / "tiny-llama" /
                                                                               "heads.nc")
    np.testing.assert_array_equal(grown["top_head"], once["top_head"])
    np.testing.assert_array_equal(grown["attention"], once["attention"])
    assert not [v for v in grown.variables if "candidate" in v]


def test_a_resumed_run_ranks_the_candidates_with_the_chunks_it_skips(tokenizer, tmp_path, monkeypatch):
    """A crash in the third chunk keeps the first two's parts; the rerun's chunk ranks its candidates with their
    sums (run_one gives heads' RunningRank what is done), as the uninterrupted run's third chunk does."""
    from nnethics.analyses.heads import candidates as heads_candidates
    from nnethics.analyses.heads import engine as heads_engine
    from nnethics.cli import cli

    folder = save_tiny(make_tiny("llama", tokenizer, init_std=STRONG_STD), tokenizer, tmp_path / "tiny-llama")
    args = ["heads", "--model", str(folder), "--limit", "6", "--no-progress", "--batch-size", "2", "--top-heads", "2"]
    real_heads, real_job, jobs = heads_engine.execute, heads_candidates.ranking_job, []
    monkeypatch.setattr(heads_candidates, "ranking_job", lambda *a: jobs.append(real_job(*a)) or jobs[-1])
    res = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "whole")])
    assert res.exit_code == 0, res.output
    assert len(jobs) == 3 and jobs[2]["dla_sum"].any()
    whole, jobs[:] = jobs[2], []
    calls = []

    def crash(*a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_heads(*a, **k)

    monkeypatch.setattr(heads_engine, "execute", crash)
    assert CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "store")]).exit_code != 0
    assert len(jobs) == 3 and len(calls) == 3  # the third chunk was planned, then its forwards died
    jobs[:] = []
    monkeypatch.setattr(heads_engine, "execute", real_heads)
    res = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    assert len(jobs) == 1  # the third chunk only, with the sums of the two it skipped
    for key in ("effect_sum", "effect_count", "dla_sum"):
        np.testing.assert_array_equal(jobs[0][key], whole[key])


def test_readme_schema_and_export_tables(tiny_model_dir, tmp_path):
    """README's heads.nc section names only variables the file has and mentions every one of them; ``export``
    writes the heads tables."""
    from test_api import _mentioned, _sections, _table_names

    from nnethics.cli import cli
    from nnethics.export import export_store

    model = ne.load_model(str(tiny_model_dir))
    ds = ne.analyze(model, ne.load_prompts(PROMPTS).subset(limit=2), ["heads"])["heads"]
    section = _sections()["heads"]
    names = set(ds.variables)
    assert not [n for n in _table_names(section) if n not in names]
    assert not [v for v in ds.data_vars if v not in _mentioned(section)]
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["heads", "--model", str(tiny_model_dir), "--limit", "2", "--store", str(store),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    paths = export_store(next(store.iterdir()), "csv", tmp_path / "csv")
    assert {"heads.csv", "heads_attention.csv"} <= {p.name for p in paths}
    import pandas as pd

    table = pd.read_csv(tmp_path / "csv" / "heads.csv")
    assert len(table) == 2 * ds.sizes["layer"] * ds.sizes["head"] and "effect" in table


def test_build_dataset_on_hand_made_numbers():
    """effect, flipped and atp_effect of one pair whose base and counterfactual choose different labels."""
    from nnethics.analyses.heads import build_dataset

    pair = PromptPair("p", "b", "c", "1", "2")
    patched = np.array([[[0.5, -0.5], [1.0, -1.0]]])                 # [prompt, layer, head]
    ds = build_dataset(pairs=[pair], labels=["1", "2"], base_ld=np.array([1.0]), cf_ld=np.array([-1.0]),
                       patched_ld=patched, atp_delta=np.array([[[-0.4, -1.6], [0.0, -2.0]]]),
                       dla=np.zeros((1, 2, 2, 2)), input_ids=np.zeros((1, 2, 3), np.int32),
                       token_text=np.full((1, 2, 3), "a"), min_gap=0.1, forward_path="kv_cache", why="")
    np.testing.assert_allclose(ds["effect"].values, [[[0.25, 0.75], [0.0, 1.0]]])
    np.testing.assert_array_equal(ds["flipped"].values, [[[False, True], [False, True]]])
    np.testing.assert_allclose(ds["atp_effect"].values, [[[0.2, 0.8], [0.0, 1.0]]], atol=1e-7)
    assert bool(ds["effect_defined"][0]) and ds.attrs["top_heads"] == 8
