"""Activation patching, causal tracing and attribution patching against the independent hook
references in tests/reference/patching.py, plus exact identities, the remote dry run and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import FAMILIES, PROMPTS, SHORT_PAIRS, STRONG_STD, make_tiny, save_tiny, sweep_matches_reference
from reference import patching as ref
from reference.hooks import add_at, edit, record, set_positions

from nnethics.analyses.common import encode_pairs
from nnethics.analyses.patching import ANALYSIS, PatchingOptions
from nnethics.analyses.patching.engine import noise_sample
from nnethics.analyses.patching.noise import pair_seed, restore_layers
from nnethics.analyses.patching.results import finalize
from nnethics.engine import activation_patching, causal_tracing
from nnethics.prompts import PromptPair, load_prompts

TOL = dict(rtol=0, atol=1e-4)
COMPS = ("resid", "attn", "mlp")


SHORT = SHORT_PAIRS  # plain text, different lengths (conftest)
PLAIN = dict(chat=False, atp=True)  # AtP asked for (off by default at the last position): the checks cover it


@pytest.fixture(scope="module")
def pairs():
    return SHORT


@pytest.fixture(scope="module")
def chat_pairs(prompt_set):
    # shipped pairs of different lengths with the chat template (99, 92 tokens)
    return [prompt_set.pairs[i] for i in (0, 3)]


def _ids(model, pairs, chat=False):
    batch = encode_pairs(model, pairs, ["1", "2"], chat=chat)
    toks = [(torch.tensor([batch.encoded.tokens(batch.row(i, "base"))]),
             torch.tensor([batch.encoded.tokens(batch.row(i, "cf"))])) for i in range(batch.n)]
    assert len({b.shape[1] for b, _ in toks}) > 1, "the test wants pairs of different lengths"
    return tuple(batch.label_ids), toks


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_sweep_matches_reference(family, strong_models, pairs):
    """Every layer x component at the decision position, KV-cache and full-forward paths, and AtP."""
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _ids(model, pairs)
    kv = activation_patching(model, pairs, PatchingOptions(**PLAIN, kv_cache="on"))
    full = activation_patching(model, pairs, PatchingOptions(**PLAIN, kv_cache="off"))
    assert set(kv["forward_path"].values) == {"kv_cache"} and set(full["forward_path"].values) == {"full"}
    sweep_matches_reference((kv, full), hf, toks, ids, COMPS)
    # the two paths agree with each other far below the tolerance
    np.testing.assert_allclose(kv["patched_logit_diff"], full["patched_logit_diff"], rtol=0, atol=1e-5)


def test_chat_formatted_prompts_match_reference(strong_models, chat_pairs):
    """The shipped prompts with the chat template (90-105 tokens, different lengths): sweep, AtP, noise."""
    model = strong_models("llama")
    hf = model.lm._module
    ids, toks = _ids(model, chat_pairs, chat=None)
    ds = activation_patching(model, chat_pairs, PatchingOptions(components=("resid", "mlp"), atp=True))
    noised = causal_tracing(model, chat_pairs, PatchingOptions(positions="all", layers=(1,)))
    for i, (b, c) in enumerate(toks):
        sweep = ref.patch_sweep(hf, b, c, ids, ("resid", "mlp"))
        atp = ref.attribution_patching(hf, b, c, ids, components=("resid", "mlp"))
        for j, comp in enumerate(("resid", "mlp")):
            _close(ds["patched_logit_diff"].values[i, :, j], sweep[comp])
            _close(ds["atp_delta"].values[i, :, j], atp[comp])
        span, noise = _noise(model, chat_pairs[i], noised, i)
        assert str(noised["noise_span_text"].values[i]).startswith("Option 1: ")
        _close(noised["corrupted_logit_diff"][i], ref.noise_corrupted_ld(hf, b, ids, span, noise))
        _close(noised["patched_logit_diff"].values[i, 0, 1], ref.noise_restore(hf, b, ids, span, noise, 1, 1, "attn"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_grid_matches_reference(family, strong_models, pairs):
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _ids(model, pairs[:2])
    ds = activation_patching(model, pairs[:2], PatchingOptions(**PLAIN, positions="grid", layers=(0, 2)))
    assert ds["patched_logit_diff"].dims == ("prompt", "position", "layer", "component")
    assert list(ds["layer"].values) == [0, 2]
    for i, (b, c) in enumerate(toks):
        T_i = b.shape[1]
        for p in (-1, -2, -9, -T_i):
            sweep = ref.patch_sweep(hf, b, c, ids, COMPS, position=p)
            atp = ref.attribution_patching(hf, b, c, ids, position=p, components=COMPS)
            for j, comp in enumerate(COMPS):
                _close(ds["patched_logit_diff"].sel(position=p).values[i, :, j], sweep[comp][[0, 2]])
                _close(ds["atp_delta"].sel(position=p).values[i, :, j], atp[comp][[0, 2]])
        # positions before a shorter prompt's first token are padding: NaN
        width = ds.sizes["position"]
        if T_i < width:
            assert np.isnan(ds["patched_logit_diff"].values[i, : width - T_i]).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_all_positions(family, strong_models, pairs):
    """Patching resid at every position of a layer gives the reference; at layer 0 the cf's own LD."""
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _ids(model, pairs)
    ds = activation_patching(model, pairs, PatchingOptions(**PLAIN, positions="all", components=("resid",)))
    for i, (b, c) in enumerate(toks):
        for layer in range(model.n_layers):
            _close(ds["patched_logit_diff"].values[i, layer, 0], ref.patch_all_positions_resid(hf, b, c, ids, layer))
    _close(ds["patched_logit_diff"].values[:, 0, 0], ds["cf_logit_diff"].values)
    # AtP over all positions is the sum of the per-position estimates
    grid = activation_patching(model, pairs[:1], PatchingOptions(**PLAIN, positions="grid", components=("resid",), layers=(1,)))
    _close(ds["atp_delta"].values[0, 1, 0], np.nansum(grid["atp_delta"].values[0, :, 0, 0]))


def test_unequal_lengths_are_skipped_with_a_reason(strong_models, pairs):
    model = strong_models("llama")
    odd = PromptPair("odd", pairs[0].base, pairs[0].cf + " Think about it carefully.", "2", "1")
    ds = activation_patching(model, [pairs[1], odd], PatchingOptions(**PLAIN, positions="grid", components=("resid",)))
    assert list(ds["skipped"].values) == [False, True]
    assert "different lengths" in str(ds["skip_reason"].values[1])
    assert np.isnan(ds["patched_logit_diff"].values[1]).all() and np.isnan(ds["atp_delta"].values[1]).all()
    assert np.isfinite(ds["base_logit_diff"].values).all()


def _noise(model, pair, ds, i):
    s, e = int(ds["noise_start"][i]), int(ds["noise_end"][i])
    return (s, e), noise_sample(pair_seed(0, pair.prompt_id), e - s, model.d_model) * float(ds["noise_std"][i])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_noise_restoration_matches_reference(family, strong_models, pairs):
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _ids(model, pairs[:2])
    everywhere = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, positions="all", window=3))
    last_kv = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, positions="last", window=3, kv_cache="on"))
    last_full = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, positions="last", window=3, kv_cache="off"))
    for i, (b, _) in enumerate(toks):
        span, noise = _noise(model, pairs[i], everywhere, i)
        assert "Option 1" in str(everywhere["noise_span_text"].values[i])
        clean = ref.logit_diff(hf, b, ids)
        corrupted = ref.noise_corrupted_ld(hf, b, ids, span, noise)
        for ds in (everywhere, last_kv, last_full):
            _close(ds["base_logit_diff"][i], clean)
            _close(ds["corrupted_logit_diff"][i], corrupted)
        for j, comp in enumerate(COMPS):
            for layer in range(model.n_layers):
                _close(everywhere["patched_logit_diff"].values[i, layer, j],
                       ref.noise_restore(hf, b, ids, span, noise, layer, 3, comp))
                # restore the decision position only, over the reference's own window (not nnethics' restore_layers)
                want = _restore_last_layers(hf, b, ids, span, noise, ref.restore_layers(model.n_layers, layer, 3), comp)
                for ds in (last_kv, last_full):
                    _close(ds["patched_logit_diff"].values[i, layer, j], want)


def _restore_last_layers(hf, b, ids, span, noise, layers, comp):
    """The hook reference for restoring the clean ``comp`` states of ``layers`` at the last position of a
    noised base ``b``; returns the LD."""
    p = ref.parts(hf)
    mods = {k: ref._module(p, k, comp) for k in layers}
    T = b.shape[1]
    with torch.no_grad(), record({str(k): m for k, m in mods.items()}) as cl:
        hf(b)
    edits = [(p.resid0, add_at(noise, *span))]
    edits += [(m, set_positions(cl[str(k)][0, T - 1], T - 1)) for k, m in mods.items()]
    with torch.no_grad(), edit(edits):
        return float(ref._ld(hf(b).logits, ids))


# ROME's window (Meng et al. 2022, causal_trace.py): `window` consecutive layers starting `window // 2` below the
# layer, clipped to the model. Written out by hand for a 28-layer model: a middle layer, both ends, one in.
WINDOWS_BY_HAND = {
    # (layer, window): the layers restored
    (14, 1): (14,), (0, 1): (0,), (27, 1): (27,),
    (14, 2): (13, 14), (0, 2): (0,), (1, 2): (0, 1), (27, 2): (26, 27),
    (14, 3): (13, 14, 15), (0, 3): (0, 1), (27, 3): (26, 27),
    (14, 10): (9, 10, 11, 12, 13, 14, 15, 16, 17, 18), (0, 10): (0, 1, 2, 3, 4), (2, 10): (0, 1, 2, 3, 4, 5, 6),
    (27, 10): (22, 23, 24, 25, 26, 27), (24, 10): (19, 20, 21, 22, 23, 24, 25, 26, 27),
    (25, 10): (20, 21, 22, 23, 24, 25, 26, 27),
}


@pytest.mark.parametrize("layer, window", list(WINDOWS_BY_HAND))
def test_restore_window_is_romes_written_out_by_hand(layer, window):
    """nnethics' window and the test reference's, against the layer sets written out above (28 layers)."""
    want = WINDOWS_BY_HAND[layer, window]
    assert restore_layers(28, layer, window) == want
    assert tuple(ref.restore_layers(28, layer, window)) == want


@pytest.mark.parametrize("window", [2, 4])
def test_even_noise_windows_match_the_reference(strong_models, pairs, window):
    """Even windows (one layer more below than above) restore exactly the reference's layers: every position
    (reference ``noise_restore``) and the decision position only (KV-cache path), at every layer of 3."""
    model = strong_models("llama")
    hf = model.lm._module
    ids, toks = _ids(model, pairs[:2])
    everywhere = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, positions="all", window=window))
    last = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, positions="last", window=window, kv_cache="on"))
    for i, (b, _) in enumerate(toks):
        span, noise = _noise(model, pairs[i], everywhere, i)
        restored = []
        for j, comp in enumerate(COMPS):
            for layer in range(model.n_layers):
                want = ref.noise_restore(hf, b, ids, span, noise, layer, window, comp)
                _close(everywhere["patched_logit_diff"].values[i, layer, j], want)
                restored.append(want)
                _close(last["patched_logit_diff"].values[i, layer, j],
                       _restore_last_layers(hf, b, ids, span, noise, ref.restore_layers(model.n_layers, layer, window),
                                            comp))
        assert np.ptp(restored) > 0.1  # the layers restored change the LD: a shifted window would show


@pytest.mark.parametrize("kv", ["on", "off"])
def test_noise_samples_average_the_reference_over_draws(strong_models, pairs, kv):
    """``noise_samples=3``: corrupted and restored LDs are the means over three draws, each the reference
    run with that draw's noise (draw 0 is the single-sample run's noise)."""
    model = strong_models("llama")
    hf = model.lm._module
    ids, toks = _ids(model, pairs[:2])
    opts = PatchingOptions(**PLAIN, noise_samples=3, layers=(0, 2), components=("resid", "mlp"), kv_cache=kv)
    ds = causal_tracing(model, pairs[:2], opts)
    single = causal_tracing(model, pairs[:2], PatchingOptions(**{**opts.__dict__, "noise_samples": 1}))
    xr.testing.assert_allclose(ds["noise_std"], single["noise_std"])
    assert not np.allclose(ds["corrupted_logit_diff"], single["corrupted_logit_diff"], atol=1e-3)
    for i, (b, _) in enumerate(toks):
        s, e = int(ds["noise_start"][i]), int(ds["noise_end"][i])
        noises = [noise_sample(pair_seed(0, pairs[i].prompt_id, k), e - s, model.d_model) * float(ds["noise_std"][i])
                  for k in range(3)]
        _close(single["corrupted_logit_diff"][i], ref.noise_corrupted_ld(hf, b, ids, (s, e), noises[0]))
        _close(ds["corrupted_logit_diff"][i], np.mean([ref.noise_corrupted_ld(hf, b, ids, (s, e), z) for z in noises]))
        for li, layer in enumerate((0, 2)):
            for ci, comp in enumerate(("resid", "mlp")):
                want = np.mean([_restore_last(model, hf, b, ids, (s, e), z, layer, comp) for z in noises])
                _close(ds["patched_logit_diff"].values[i, li, ci], want)


def _restore_last(model, hf, b, ids, span, noise, layer, comp):
    """The hook reference for restoring the clean ``comp`` state of ``layer`` at the last position."""
    p = ref.parts(hf)
    mod = ref._module(p, layer, comp)
    T = b.shape[1]
    with record({"m": mod}) as cl:
        hf(b)
    with torch.no_grad(), edit([(p.resid0, add_at(noise, *span)), (mod, set_positions(cl["m"][0, T - 1], T - 1))]):
        return float(ref._ld(hf(b).logits, ids))


def test_noise_span_not_found_is_skipped(strong_models, pairs):
    model = strong_models("llama")
    ds = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, noise_span="regex:no such text"))
    assert ds["skipped"].values.all() and "not found" in str(ds["skip_reason"].values[0])
    assert np.isnan(ds["patched_logit_diff"].values).all()


def test_identities(strong_models, pairs):
    model = strong_models("llama")
    same = PromptPair("same", pairs[0].base, pairs[0].base, "2", "2")
    for kv in ("on", "off"):
        ds = activation_patching(model, [same, pairs[1]], PatchingOptions(**PLAIN, kv_cache=kv))
        # base patched with itself: nothing changes; the gap is 0 so the normalised effect is flagged
        _close(ds["patched_logit_diff"].values[0], np.full((model.n_layers, 3), float(ds["base_logit_diff"][0])))
        assert not bool(ds["effect_defined"][0]) and np.isnan(ds["effect"].values[0]).all()
        assert not ds["flipped"].values[0].any()
    # noise of scale 0: corrupted == clean, and restoring changes nothing
    ds = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, noise_scale=0.0, positions="all", window=2))
    _close(ds["corrupted_logit_diff"], ds["base_logit_diff"])
    _close(ds["patched_logit_diff"], np.broadcast_to(ds["base_logit_diff"].values[:, None, None], ds["patched_logit_diff"].shape))
    assert (ds["noise_std"].values == 0).all()


def test_effect_is_normalised_by_the_gap(strong_models, pairs):
    model = strong_models("llama")
    ds = activation_patching(model, pairs, PatchingOptions(**PLAIN, min_gap=0.0))
    b, c, p = (ds[v].values.astype(np.float64) for v in ("base_logit_diff", "cf_logit_diff", "patched_logit_diff"))
    np.testing.assert_allclose(ds["effect"].values, (p - b[:, None, None]) / (c - b)[:, None, None], rtol=1e-3, atol=1e-4)
    # resid at the last layer carries everything at the decision position: effect 1
    np.testing.assert_allclose(ds["effect"].values[:, -1, 0], 1.0, atol=1e-3)


def _pearson(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    return np.corrcoef(a[ok], b[ok])[0, 1]


def _check_derived(ds, receiver: str, source: str, min_gap: float):
    """Every derived variable of a patching Dataset against a NumPy formula on its stored logit differences."""
    recv = ds[receiver].values.astype(np.float64)
    src = ds[source].values.astype(np.float64)
    patched = ds["patched_logit_diff"].values.astype(np.float64)
    extra = (1,) * (patched.ndim - 1)
    r, gap = recv.reshape(recv.shape + extra), (src - recv).reshape(recv.shape + extra)
    defined = np.abs(src - recv) >= min_gap
    np.testing.assert_array_equal(ds["effect_defined"].values, defined)
    want = np.where(defined.reshape(gap.shape), (patched - r) / gap, np.nan)
    np.testing.assert_allclose(ds["effect"].values, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    # the receiver run chooses label 1 when its LD > 0; a flip is a patched LD on the other side of 0
    np.testing.assert_array_equal(ds["flipped"].values, np.isfinite(patched) & ((patched > 0) != (r > 0)))
    if "atp_delta" in ds:
        atp = ds["atp_delta"].values.astype(np.float64)
        np.testing.assert_allclose(ds["atp_effect"].values, np.where(defined.reshape(gap.shape), atp / gap, np.nan),
                                   rtol=1e-4, atol=1e-5, equal_nan=True)
        for i in range(len(recv)):
            np.testing.assert_allclose(float(ds["atp_correlation"][i]), _pearson(atp[i], patched[i] - r[i]), atol=1e-5)
    out = finalize(ds, n_resamples=50)
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(out["mean_effect"].values, np.nanmean(want, axis=0), rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
        np.testing.assert_allclose(out["flip_rate"].values, ds["flipped"].values.mean(axis=0), rtol=1e-6, atol=0)
        if "atp_delta" in ds:
            np.testing.assert_allclose(out["mean_atp_effect"].values,
                                       np.nanmean(np.where(defined.reshape(gap.shape), atp / gap, np.nan), axis=0),
                                       rtol=1e-4, atol=1e-5, equal_nan=True)
            comp = ds["patched_logit_diff"].dims.index("component")
            for j in range(ds.sizes["component"]):
                np.testing.assert_allclose(float(out["atp_exact_correlation"][j]),
                                           _pearson(np.take(atp, j, comp), np.take(patched - r, j, comp)), atol=1e-5)
            np.testing.assert_allclose(float(out["atp_exact_correlation_pooled"]), _pearson(atp, patched - r), atol=1e-5)
    return out


def test_derived_values_match_numpy_formulas(strong_models, pairs):
    """effect, effect_defined, flipped, atp_effect, atp_correlation and finalize's mean_effect, flip_rate,
    mean_atp_effect and AtP correlations, recomputed from the stored base / cf / patched logit differences."""
    model = strong_models("qwen2")  # its third pair's base and counterfactual choose differently (LD 1.0 / -0.2)
    ds = activation_patching(model, pairs, PatchingOptions(**PLAIN, min_gap=1.5))
    b, c = ds["base_logit_diff"].values, ds["cf_logit_diff"].values
    # the checks only bite if the data tell base from counterfactual: a pair whose two runs choose differently,
    # one whose gap is too small to normalise by, and flips that differ between "against base" and "against cf"
    assert ((b > 0) != (c > 0)).any() and ds["effect_defined"].any() and not ds["effect_defined"].all(), (b, c)
    p = ds["patched_logit_diff"].values
    assert ((p > 0) != (b[:, None, None] > 0)).sum() != ((p > 0) != (c[:, None, None] > 0)).sum()
    out = _check_derived(ds, "base_logit_diff", "cf_logit_diff", 1.5)
    assert np.abs(out["atp_exact_correlation_pooled"]) > 0.1  # a real correlation, not 0 from constant inputs
    grid = activation_patching(model, pairs[:2], PatchingOptions(**PLAIN, positions="grid", layers=(1, 2), min_gap=1.5))
    _check_derived(grid, "base_logit_diff", "cf_logit_diff", 1.5)
    noised = causal_tracing(model, pairs, PatchingOptions(**PLAIN, layers=(0, 2), noise_scale=6.0))
    _check_derived(noised, "corrupted_logit_diff", "base_logit_diff", 0.1)


def _span_by_offsets(tokenizer, text: str, tokens: list[int], prefix: str) -> tuple[int, int]:
    """Token range of the line of ``text`` that starts with ``prefix``, from the tokenizer's character offsets."""
    lo = text.index(prefix)
    hi = text.find("\n", lo)
    hi = len(text) if hi < 0 else hi
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(tokens) - len(enc["input_ids"])
    hit = [t for t, (a, z) in enumerate(enc["offset_mapping"]) if a < hi and z > lo]
    return shift + hit[0], shift + hit[-1] + 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_noise_size_and_span_are_derived_independently(family, strong_models, pairs, tokenizer):
    """noise_start/end from the tokenizer's character offsets of the 'Option 1' line; noise_std = noise_scale
    times the std of the clean layer-0 input over that span (hooks); the corrupted LD from that noise."""
    model = strong_models(family)
    hf = model.lm._module
    p = ref.parts(hf)
    ids, toks = _ids(model, pairs[:2])
    for kv, scale in (("off", 3.0), ("on", 1.5)):
        ds = causal_tracing(model, pairs[:2], PatchingOptions(**PLAIN, noise_scale=scale, layers=(1,), kv_cache=kv))
        for i, (b, _) in enumerate(toks):
            s, e = _span_by_offsets(tokenizer, pairs[i].base, b[0].tolist(), "Option 1:")
            assert (int(ds["noise_start"][i]), int(ds["noise_end"][i])) == (s, e)
            with torch.no_grad(), record({"x": p.layers[0]}, inputs=True) as got:
                hf(b)
            want = scale * float(got["x"][0, s:e].double().std())
            np.testing.assert_allclose(float(ds["noise_std"][i]), want, rtol=1e-5)
            noise = noise_sample(pair_seed(0, pairs[i].prompt_id), e - s, model.d_model) * want
            _close(ds["corrupted_logit_diff"][i], ref.noise_corrupted_ld(hf, b, ids, (s, e), noise))


def test_attribution_is_exact_where_the_decision_is_linear(tokenizer, pairs):
    """Without the final norm, LD is linear in the last layer's residual output (and its MLP output)."""
    from nnethics.models import wrap_model

    model = make_tiny("llama", tokenizer, 3, init_std=STRONG_STD)
    hf = model.lm._module
    hf.model.norm = torch.nn.Identity()
    model = wrap_model(hf, tokenizer, name="tiny-llama-nonorm", check=False)
    for kv in ("on", "off"):
        ds = activation_patching(model, pairs[:2], PatchingOptions(**PLAIN, kv_cache=kv, components=("resid", "mlp")))
        exact = ds["patched_logit_diff"].values - ds["base_logit_diff"].values[:, None, None]
        np.testing.assert_allclose(ds["atp_delta"].values[:, -1], exact[:, -1], rtol=1e-4, atol=1e-4)
        assert np.abs(exact[:, -1]).max() > 0.1  # a real change, not 0 == 0
        # earlier layers go through nonlinearities: the estimate is no longer exact
        assert np.abs(ds["atp_delta"].values[:, 0] - exact[:, 0]).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_traces_pass_the_remote_dry_run(family, strong_models, pairs):
    """Every trace serialises and runs under nnsight's remote="local" and gives the local numbers."""
    model = strong_models(family)
    for opts in (PatchingOptions(**PLAIN, kv_cache="off"), PatchingOptions(**PLAIN, kv_cache="on"),
                 PatchingOptions(**PLAIN, positions="grid", layers=(1,), components=("attn",)),
                 PatchingOptions(**PLAIN, corruption="noise", window=2, kv_cache="off"),
                 PatchingOptions(**PLAIN, corruption="noise", kv_cache="on")):
        local = activation_patching(model, pairs[:2], opts)
        dry = activation_patching(model.using(remote="local"), pairs[:2], opts)
        for v in ("patched_logit_diff", "base_logit_diff", "atp_delta", "corrupted_logit_diff"):
            if v in local:
                np.testing.assert_allclose(dry[v], local[v], rtol=0, atol=1e-6)
        if opts.positions == "last" and opts.kv_cache == "off":
            _dry_run_matches_hooks(model, pairs[:2], opts, dry)


def _dry_run_matches_hooks(model, pairs, opts, dry):
    """The dry run's numbers against the plain-hook reference on the local transformers model (local and dry
    runs share nnethics' code path, so agreeing with each other alone would not catch a bug in it)."""
    hf = model.lm._module
    ids, toks = _ids(model, pairs)
    L = model.n_layers
    for i, (b, c) in enumerate(toks):
        _close(dry["base_logit_diff"][i], ref.logit_diff(hf, b, ids))
        if opts.corruption == "noise":
            span, noise = _noise(model, pairs[i], dry, i)
            _close(dry["corrupted_logit_diff"][i], ref.noise_corrupted_ld(hf, b, ids, span, noise))
            for j, comp in enumerate(COMPS):
                for layer in range(L):
                    want = _restore_last_layers(hf, b, ids, span, noise, ref.restore_layers(L, layer, opts.window), comp)
                    _close(dry["patched_logit_diff"].values[i, layer, j], want)
        else:
            sweep = ref.patch_sweep(hf, b, c, ids, COMPS)
            for j, comp in enumerate(COMPS):
                _close(dry["patched_logit_diff"].values[i, :, j], sweep[comp])


def test_store_contract_summary_and_finalize(strong_models, pairs, tmp_path):
    from nnethics.store import load, write_atomic

    model = strong_models("gpt_neox")
    ds = activation_patching(model, pairs, PatchingOptions(**PLAIN, min_gap=0.0))
    assert ds["patched_logit_diff"].dims == ("prompt", "layer", "component")
    assert list(ds["component"].values) == list(COMPS) and list(ds["layer"].values) == [0, 1, 2]
    for v in ("base_logit_diff", "cf_logit_diff", "effect", "flipped", "atp_effect", "peak_layer", "num_choice_flips",
              "gini_coefficient", "top5_concentration", "chose_ethical_base"):
        assert v in ds, v
    # summary columns agree with their definitions on |patched - base|
    delta = np.abs(ds["patched_logit_diff"].values - ds["base_logit_diff"].values[:, None, None])
    np.testing.assert_array_equal(ds["peak_layer"].values, delta.argmax(axis=1))
    np.testing.assert_array_equal(ds["num_choice_flips"].values, ds["flipped"].values.sum(axis=1))
    out = finalize(ds, n_resamples=200)
    assert out["mean_effect"].dims == ("layer", "component")
    assert (out["effect_ci_low"] <= out["mean_effect"] + 1e-6).all() and (out["mean_effect"] <= out["effect_ci_high"] + 1e-6).all()
    assert -1 <= float(out["atp_exact_correlation_pooled"]) <= 1
    path = write_atomic(out, tmp_path / "patching.nc")
    import xarray as xr

    from nnethics.store.variables import describe

    xr.testing.assert_identical(describe(out), load(path))  # as written, plus the CF attrs write_atomic adds
    assert set(ANALYSIS.names) >= {"patching", "patching_grid", "patching_noise"}
    assert ANALYSIS.default and ANALYSIS.name == "patching"
    assert ANALYSIS.name_for(PatchingOptions(positions="grid")) == "patching_grid"
    assert ANALYSIS.make_options("patching_noise").corruption == "noise"


def test_options_are_validated():
    with pytest.raises(ValueError, match="components"):
        PatchingOptions(components=("heads",))
    with pytest.raises(ValueError, match="positions"):
        PatchingOptions(positions="middle")
    with pytest.raises(ValueError, match="window"):
        PatchingOptions(window=0)


def test_cli_bad_options_exit_2():
    from nnethics.cli import cli

    runner = CliRunner()
    for args in (["patch", "--components", "resid,heads"], ["patch", "--positions", "diagonal"],
                 ["patch", "--layers", "3-1"], ["patch", "--noise-span", "regex:("], ["patch", "--window", "0"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
    out = runner.invoke(cli, ["patch", "--components", "resid,heads"]).output
    assert "--components: 'heads' is not one of resid, attn, mlp" in out


def test_cli_patch_end_to_end(tokenizer, tmp_path):
    """``nnethics patch`` on a saved tiny model: the file holds the contract's dims and variables."""
    from nnethics.cli import cli
    from nnethics.store import load

    model = make_tiny("llama", tokenizer)
    folder = save_tiny(model, tokenizer, tmp_path / "tiny-llama")
    res = CliRunner().invoke(cli, ["patch", "--model", str(folder), "--limit", "3", "--store", str(tmp_path / "store"),
                                   "--layers", "0-1", "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    ds = load(tmp_path / "store" / "tiny-llama" / "patching.nc")
    assert dict(ds.sizes) == {"prompt": 3, "layer": 2, "component": 3}
    assert "mean_effect" in ds and "effect_ci_low" in ds and ds.attrs["analysis"] == "patching"
    # other layers over the stored file: the conflict is found from the spec, before the model loads
    res = CliRunner().invoke(cli, ["patch", "--model", str(folder), "--limit", "1", "--store", str(tmp_path / "store"),
                                   "--layers", "0-9", "--no-progress"])
    assert res.exit_code == 2 and "holds results computed with other options" in res.output
    assert "loading model" not in res.output
    # on an empty store the layers the model lacks are refused once it has loaded
    res = CliRunner().invoke(cli, ["patch", "--model", str(folder), "--limit", "1", "--store", str(tmp_path / "store2"),
                                   "--layers", "0-9", "--no-progress"])
    assert res.exit_code == 2 and "--layers: layers 3-9 do not exist: the model has layers 0-2" in res.output
    res = CliRunner().invoke(cli, ["patch", "--model", str(folder), "--limit", "2", "--store", str(tmp_path / "store"),
                                   "--corruption", "noise", "--noise-samples", "2", "--layers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    noised = load(tmp_path / "store" / "tiny-llama" / "patching_noise.nc")
    assert json.loads(noised.attrs["options"])["noise_samples"] == 2 and noised.sizes["layer"] == 1
    want = causal_tracing(model, load_prompts(PROMPTS).pairs[:2], PatchingOptions(noise_samples=2, layers=(1,)))
    np.testing.assert_allclose(noised["patched_logit_diff"].values, want["patched_logit_diff"].values, atol=1e-5)


@pytest.mark.slow
def test_builtin_model_reference_and_atp_correlation(builtin_model, prompt_set):
    """The built-in model: one pair against the reference; AtP vs exact correlation (printed)."""
    model = builtin_model
    pairs = list(prompt_set.pairs[:6])
    ds = activation_patching(model, pairs, PatchingOptions(atp=True))
    ids, toks = _ids(model, pairs[:1] + pairs[3:4], chat=None)
    b, c = toks[0]
    sweep = ref.patch_sweep(model.lm._module, b, c, ids, ("resid",))
    _close(ds["patched_logit_diff"].values[0, :, 0], sweep["resid"])
    out = finalize(ds, n_resamples=200)
    r = float(out["atp_exact_correlation_pooled"])
    per = {str(k): round(float(v), 3) for k, v in zip(out["component"].values, out["atp_exact_correlation"].values)}
    print(f"\nAtP vs exact on the built-in model ({len(pairs)} pairs): pooled r = {r:.3f}; per component {per}")
    assert r > 0.5
