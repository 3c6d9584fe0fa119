"""Content versus binding (nnethics.binding): crossing layers and their CI ranges on hand-written patching Datasets,
the rule at each of its boundaries, the sentence; and the label-swap counterfactual's patching against the plain-hook
reference (tests/reference/patching.py), as tests/test_patching.py checks the content swap's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import FAMILIES, sweep_matches_reference
from reference import patching as ref

from nnethics import binding as B
from nnethics import framings as F
from nnethics.analyses.common import encode_pairs
from nnethics.analyses.patching import PatchingOptions
from nnethics.engine import activation_patching
from nnethics.store import write_atomic
from nnethics.store.variables import describe, undocumented

LAYERS = np.arange(7)  # 7 layers x 3 components x 5 pairs: no two sizes equal
COMPS = ("resid", "attn", "mlp")
N = 5

# Hand-written curves per component: (mean, CI low, CI high) over the 7 layers.
CONTENT = {
    # mean first reaches 0.5 at layer 3 (exactly 0.5: "reaches" is >=); band upper >= 0.5 from 2, lower from 4
    "resid": ([0.00, 0.10, 0.30, 0.50, 0.80, 0.90, 1.00],
              [-0.10, 0.00, 0.10, 0.30, 0.65, 0.80, 1.00],
              [0.10, 0.30, 0.55, 0.70, 0.95, 1.00, 1.00]),
    # mean never reaches 0.5, the upper bound does at 3, the lower bound never
    "attn": ([0.00, 0.10, 0.20, 0.40, 0.30, 0.20, 0.10],
             [-0.10, 0.00, 0.00, 0.20, 0.10, 0.00, -0.10],
             [0.10, 0.20, 0.40, 0.50, 0.45, 0.30, 0.20]),
    # mean reaches 0.5 at 5; lower bound 0.4999 there: just short, never
    "mlp": ([0.00, 0.00, 0.00, 0.00, 0.00, 0.60, 0.20],
            [-0.10, -0.10, -0.10, -0.10, -0.10, 0.4999, 0.00],
            [0.10, 0.10, 0.10, 0.20, 0.30, 0.80, 0.40]),
}
LABEL = {
    # mean reaches 0.5 at 5; upper bound 0.49 at 4 (short), 0.9 at 5; lower bound 0.55 at 5
    "resid": ([0.00, 0.00, 0.10, 0.20, 0.40, 0.70, 1.00],
              [-0.10, -0.10, 0.00, 0.00, 0.20, 0.55, 1.00],
              [0.10, 0.10, 0.20, 0.40, 0.49, 0.90, 1.00]),
    "attn": ([0.00, 0.00, 0.00, 0.10, 0.60, 0.70, 0.20],
             [-0.10, -0.10, -0.10, 0.00, 0.40, 0.50, 0.00],
             [0.10, 0.10, 0.10, 0.20, 0.80, 0.90, 0.40]),
    "mlp": ([0.00, 0.00, 0.00, 0.00, 0.00, 0.10, 0.20],
            [-0.10, -0.10, -0.10, -0.10, -0.10, 0.00, 0.00],
            [0.10, 0.10, 0.10, 0.20, 0.30, 0.30, 0.40]),
}
# (crossing, CI first, CI last) per component, by hand from the curves above
CONTENT_EXPECTED = {"resid": (3, 2, 4), "attn": (-1, 3, -1), "mlp": (5, 5, -1)}
LABEL_EXPECTED = {"resid": (5, 5, 5), "attn": (4, 4, 5), "mlp": (-1, -1, -1)}


def patching(curves, defined=(True, True, True, False, True), kind=None, same=None, **attrs) -> xr.Dataset:
    """A finalised last-position patching Dataset with the given stored means and CI bands; ``same``: per pair,
    whether base and counterfactual choose the same option (default: all do)."""
    mean = np.array([curves[c][0] for c in COMPS]).T  # [layer, component]
    low = np.array([curves[c][1] for c in COMPS]).T
    high = np.array([curves[c][2] for c in COMPS]).T
    rng = np.random.default_rng(0)
    effect = mean[None] + rng.normal(0, 0.05, (N, *mean.shape))
    defined = np.asarray(defined, dtype=bool)
    effect[~defined] = np.nan
    ds = xr.Dataset({"mean_effect": (("layer", "component"), mean.astype(np.float32)),
                     "effect_ci_low": (("layer", "component"), low.astype(np.float32)),
                     "effect_ci_high": (("layer", "component"), high.astype(np.float32)),
                     "effect": (("prompt", "layer", "component"), effect.astype(np.float32)),
                     "effect_defined": (("prompt",), defined),
                     "chose_ethical_base": (("prompt",), np.array([True, False, True, False, True])),
                     "chose_ethical_cf": (("prompt",), np.array([True, False, True, False, True]) ==
                                          np.asarray(same if same is not None else [True] * N, dtype=bool))},
                    coords={"prompt": [f"p{i}" for i in range(N)], "layer": LAYERS, "component": list(COMPS)})
    ds["effect"].attrs["effect_kind"] = "normalized"
    ds["effect_defined"].attrs["min_gap"] = 0.1
    if kind:
        ds.attrs.update(counterfactual_kind=kind, framing=f"ethical.12.{'swap' if kind == 'label' else 'fwd'}")
    ds.attrs.update(attrs)
    return ds


def _cells(ds, kind, comp, position=None):
    sel = dict(kind=kind, component=comp, **({} if position is None else {"position": position}))
    return tuple(int(ds[v].sel(**sel)) for v in ("patch_crossing_layer", "patch_crossing_ci_first",
                                                 "patch_crossing_ci_last"))


# ----------------------------------------------------------------------------------------- crossing layers


def test_crossing_layers_and_ranges_equal_the_hand_values():
    ds = B.binding_dataset(patching(CONTENT, kind="content"), patching(LABEL, kind="label", defined=[True] * N))
    assert ds["patch_crossing_layer"].dims == ("kind", "component")
    assert list(ds["kind"].values) == ["content", "label"] and list(ds["component"].values) == list(COMPS)
    for comp in COMPS:
        assert _cells(ds, "content", comp) == CONTENT_EXPECTED[comp], comp
        assert _cells(ds, "label", comp) == LABEL_EXPECTED[comp], comp
    assert ds["n_defined"].values.tolist() == [4, 5] and ds["n_pairs"].values.tolist() == [N, N]
    assert ds["n_skipped"].values.tolist() == [0, 0]
    assert ds["patch_crossing_layer"].dtype == np.int32
    assert ds.attrs["binding_order"] == B.DECIDES_FIRST  # content [2, 4] ends before label [5, 5] begins


def test_first_layer_reaches_at_the_threshold_and_reads_layer_values():
    v = np.array([[0.2, 0.4999, 0.5, 0.9], [np.nan, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    assert B.first_layer(v, [0, 2, 5, 9]).tolist() == [5, 2, -1]  # layer values, not indices; NaN never reaches
    assert B.first_layer(v.T, [0, 2, 5, 9], axis=0).tolist() == [5, 2, -1]
    assert B.first_layer(v, [0, 2, 5, 9], threshold=0.1).tolist() == [0, 2, 0]
    with pytest.raises(ValueError, match="ascending"):
        B.first_layer(v, [0, 5, 2, 9])


def _curve(first: int, cross: int, last: int) -> tuple[list, list, list]:
    """Stored curves with the given CI-first, crossing and CI-last layers (−1: never)."""
    high = [0.6 if first >= 0 and layer >= first else 0.4 for layer in LAYERS]
    mean = [0.55 if cross >= 0 and layer >= cross else 0.3 for layer in LAYERS]
    low = [0.52 if last >= 0 and layer >= last else 0.2 for layer in LAYERS]
    return mean, low, high


def _pair(content_range, label_range, content_defined=N, label_defined=N):
    def ds(rng, kind, k):
        first, last = rng
        cross = first if last < 0 else last
        curves = {c: _curve(first, cross, last) for c in COMPS}
        return patching(curves, defined=[i < k for i in range(N)], kind=kind)

    return ds(content_range, "content", content_defined), ds(label_range, "label", label_defined)


@pytest.mark.parametrize(("content", "label", "order"), [
    ((2, 4), (5, 6), B.DECIDES_FIRST),   # separated: content ends at 4, label begins at 5
    ((2, 4), (4, 6), B.UNRESOLVED),      # touching: both hold layer 4
    ((2, 5), (4, 6), B.UNRESOLVED),      # overlapping by two layers
    ((5, 6), (2, 4), B.BINDS_FIRST),     # the reverse, separated
    ((4, 6), (2, 4), B.UNRESOLVED),      # the reverse, touching
    ((0, 0), (1, 1), B.DECIDES_FIRST),   # one-layer ranges, adjacent
    ((1, 1), (1, 1), B.UNRESOLVED),      # the same single layer
    ((2, -1), (5, 6), B.UNRESOLVED),     # content's lower bound never reaches: its range never ends
    ((2, 4), (-1, -1), B.DECIDES_FIRST), # label's band never reaches 0.5 in the stored layers
    ((-1, -1), (2, 4), B.BINDS_FIRST),
    ((-1, -1), (-1, -1), B.UNRESOLVED),  # neither ever reaches
])
def test_rule_inside_and_outside_each_boundary(content, label, order):
    c, lab = _pair(content, label)
    ds = B.binding_dataset(c, lab)
    assert _cells(ds, "content", "resid")[1:] == content and _cells(ds, "label", "resid")[1:] == label
    assert ds.attrs["binding_order"] == order
    assert B.binding_order(c, lab) == order
    assert order in ds.attrs["binding"]


@pytest.mark.parametrize(("kc", "kl"), [(1, N), (N, 1), (0, N)])
def test_rule_needs_two_pairs_per_kind(kc, kl):
    c, lab = _pair((2, 3), (5, 6), content_defined=kc, label_defined=kl)
    assert B.binding_order(c, lab) == B.UNRESOLVED
    assert B.binding_order(c, lab, B.BindingRules(min_pairs=1)) == (B.DECIDES_FIRST if min(kc, kl) else B.UNRESOLVED)
    assert "fewer than 2 pairs" in B.binding_text(c, lab)


def test_rule_threshold_and_component_come_from_the_rules():
    c, lab = patching(CONTENT, kind="content"), patching(LABEL, kind="label")
    # attention: content never crosses, its upper bound reaches 0.5 at 3 and the lower never: open, unresolved
    assert B.binding_order(c, lab, B.BindingRules(component="attn")) == B.UNRESOLVED
    # at 0.05: content resid crosses at 1, range [0, 2]; label's range [0, 4]: overlap
    low = B.binding_dataset(c, lab, B.BindingRules(threshold=0.05))
    assert _cells(low, "content", "resid") == (1, 0, 2) and low.attrs["binding_order"] == B.UNRESOLVED
    assert low.attrs["threshold"] == 0.05
    with pytest.raises(ValueError, match="'heads'"):
        B.binding_dataset(c, lab, B.BindingRules(component="heads"))


def test_never_reached():
    flat = {c: ([0.1] * 7, [0.0] * 7, [0.2] * 7) for c in COMPS}
    ds = B.binding_dataset(patching(flat, kind="content"), patching(flat, kind="label"))
    assert (ds["patch_crossing_layer"].values == B.NEVER).all()
    assert (ds["patch_crossing_ci_first"].values == -1).all() and (ds["patch_crossing_ci_last"].values == -1).all()
    text = ds.attrs["binding"]
    assert text.count("never reaches 0.5 in the stored layers") >= 2 and B.UNRESOLVED in text
    # NaN means (no defined pair) never reach either
    nan = {c: ([np.nan] * 7,) * 3 for c in COMPS}
    ds = B.binding_dataset(patching(nan, defined=[False] * N), patching(LABEL))
    assert _cells(ds, "content", "resid") == (-1, -1, -1) and int(ds["n_defined"].sel(kind="content")) == 0


def test_sentence_names_n_the_ci_method_and_no_model():
    c = patching(CONTENT, kind="content", model_id="some/model")
    lab = patching(LABEL, kind="label", model_id="some/model", defined=[True] * N)
    text = B.binding_text(c, lab)
    assert "n = 4 of 5 pairs" in text and "n = 5 of 5 pairs" in text
    assert "BCa bootstrap" in text and "95% CI" in text
    assert "at layer 3 (its CI band allows layers 2 to 4)" in text
    assert "at layer 5 (its CI band allows layer 5 only)" in text
    assert "decides before it binds" in text and "at least 0.1 logits" in text
    assert "attention: never (content) vs layer 4 (label); MLP: layer 5 (content) vs never (label)" in text
    assert "some/model" not in text  # the same words for every model
    other = B.binding_text(patching(CONTENT, kind="content", model_id="x"), patching(LABEL, kind="label", defined=[True] * N))
    assert other == text


def test_caution_where_the_choice_does_not_follow_the_content():
    c = patching(CONTENT, kind="content")  # pairs 0, 1, 2, 4 behind the means; all choose the same option
    both = B.binding_dataset(c, patching(LABEL, kind="label"))
    assert both["n_consistent"].values.tolist() == [4, 4] and "Caution" not in both.attrs["binding"]
    # label swap: pairs 0 and 3 choose the same option; pair 3 is not behind the means, so 1 of 4 (under half)
    lab = patching(LABEL, kind="label", same=[True, False, False, True, False])
    ds = B.binding_dataset(c, lab)
    assert ds["n_consistent"].values.tolist() == [4, 1]
    assert "in 4 of 4 content-swap and 1 of 4 label-swap pairs" in ds.attrs["binding"]
    # exactly half is not under half
    half = patching(LABEL, kind="label", same=[True, True, False, True, False])
    assert "Caution" not in B.binding_text(c, half)
    assert "Caution" in B.binding_text(c, half, B.BindingRules(min_consistent=0.51))
    # a file that does not say what was chosen: no count, no caution
    quiet = B.binding_dataset(c, lab.drop_vars(["chose_ethical_cf"]))
    assert "n_consistent" not in quiet and "Caution" not in quiet.attrs["binding"]


def test_inputs_are_checked():
    c, lab = patching(CONTENT, kind="content"), patching(LABEL, kind="label")
    with pytest.raises(ValueError, match="content swap first"):
        B.binding_dataset(lab, c)
    with pytest.raises(ValueError, match="lacks mean_effect"):
        B.binding_dataset(c.drop_vars("mean_effect"), lab)
    raw = c.copy()
    raw["effect"].attrs["effect_kind"] = "raw"
    with pytest.raises(ValueError, match="normalised"):
        B.binding_dataset(raw, lab)
    with pytest.raises(ValueError, match="different layers"):
        B.binding_dataset(c, lab.isel(layer=slice(0, 6)))


def test_every_variable_is_declared_and_the_file_round_trips(tmp_path):
    ds = B.binding_dataset(patching(CONTENT), patching(LABEL))
    assert undocumented(describe(ds)) == []
    write_atomic(ds, tmp_path / "binding.nc")
    with xr.open_dataset(tmp_path / "binding.nc") as raw:
        assert all(v.attrs.get("long_name") and "units" in v.attrs for v in raw.variables.values())
        assert raw["kind"].values.tolist() == ["content", "label"]
        assert raw["patch_crossing_layer"].dtype == np.int32
        xr.testing.assert_equal(raw[list(ds.data_vars)].load(), ds)
        assert raw.attrs["binding"] == ds.attrs["binding"]


# ----------------------------------------------------------------------------------------------- grid files

C_POS = np.array([-5, -4, -3, -2, -1])
L_POS = np.array([-4, -3, -2, -1])


def grid(curves, positions, early: dict[int, float], skipped=(False,) * N, kind=None) -> xr.Dataset:
    """A grid Dataset: position −1 holds ``curves``; position p holds a curve at ``early[p]`` from layer 0 falling
    to 0 at the last layer (0 where not named); CI ±0.1."""
    P = len(positions)
    mean = np.zeros((P, len(LAYERS), len(COMPS)))
    low, high = mean.copy(), mean.copy()
    for j, p in enumerate(positions):
        if p == -1:
            for k, c in enumerate(COMPS):
                mean[j, :, k], low[j, :, k], high[j, :, k] = curves[c]
        else:
            m = np.linspace(early.get(int(p), 0.0), 0.0, len(LAYERS))
            mean[j] = m[:, None]
            low[j], high[j] = m[:, None] - 0.1, m[:, None] + 0.1
    skipped = np.asarray(skipped, dtype=bool)
    effect = np.broadcast_to(mean, (N, *mean.shape)).copy()
    effect[skipped] = np.nan
    ds = xr.Dataset({"mean_effect": (("position", "layer", "component"), mean),
                     "effect_ci_low": (("position", "layer", "component"), low),
                     "effect_ci_high": (("position", "layer", "component"), high),
                     "effect": (("prompt", "position", "layer", "component"), effect),
                     "effect_defined": (("prompt",), np.ones(N, dtype=bool)),
                     "skipped": (("prompt",), skipped)},
                    coords={"prompt": [f"p{i}" for i in range(N)], "position": positions, "layer": LAYERS,
                            "component": list(COMPS)})
    if kind:
        ds.attrs["counterfactual_kind"] = kind
    return ds


def test_grid_crossings_per_position_and_where_the_effect_starts():
    c = grid(CONTENT, C_POS, {-4: 0.3, -3: 0.7}, skipped=(False, True, False, True, False), kind="content")
    lab = grid(LABEL, L_POS, {-3: 0.2, -2: 0.6}, kind="label")
    ds = B.binding_dataset(c, lab)
    assert ds["patch_crossing_layer"].dims == ("kind", "position", "component")
    assert ds["position"].values.tolist() == [-5, -4, -3, -2, -1]  # the union; label lacks -5
    # position -1 is the last-position file's curve
    for comp in COMPS:
        assert _cells(ds, "content", comp, -1) == CONTENT_EXPECTED[comp]
        assert _cells(ds, "label", comp, -1) == LABEL_EXPECTED[comp]
    # content at -3: 0.7 falling linearly over 7 layers (0.7, 0.583, 0.467, ...): crosses at 0; band 0.8, 0.683,
    # 0.567, 0.45 -> upper reaches at 0; lower 0.6, 0.483 -> at 0
    assert _cells(ds, "content", "resid", -3) == (0, 0, 0)
    assert _cells(ds, "content", "resid", -4) == (-1, -1, -1)  # 0.3, its upper bound 0.4: never
    assert _cells(ds, "label", "resid", -2) == (0, 0, 0)
    assert _cells(ds, "label", "resid", -5) == (-1, -1, -1)  # not in the label file
    assert np.isnan(float(ds["early_effect"].sel(kind="label", position=-5, component="resid")))
    np.testing.assert_allclose(ds["early_effect"].sel(kind="content", component="mlp").values,
                               [0.0, 0.3, 0.7, 0.0, 0.0], atol=1e-6)
    assert ds["top_position"].sel(kind="content").values.tolist() == [-3, -3, -3]
    assert ds["top_position"].sel(kind="label").values.tolist() == [-2, -2, -2]
    assert ds["n_skipped"].values.tolist() == [2, 0] and ds["n_defined"].values.tolist() == [3, 5]
    assert ds.attrs["early_layer"] == 0 and ds.attrs["positions"] == "grid"
    assert ds.attrs["binding_order"] == B.DECIDES_FIRST
    text = ds.attrs["binding"]
    assert "2 of 5 content-swap pairs, 0 of 5 label-swap pairs" in text
    assert "is largest at position -3 for the content swap (mean effect +0.70)" in text
    assert "at position -2 for the label swap (mean effect +0.60)" in text
    assert undocumented(describe(ds)) == []


def test_grid_and_last_position_files_are_not_mixed():
    with pytest.raises(ValueError, match="grid file"):
        B.binding_dataset(grid(CONTENT, C_POS, {}), patching(LABEL))


def test_grid_without_the_decision_position_cannot_tell():
    c = grid(CONTENT, C_POS, {-3: 0.7}).sel(position=[-5, -4, -3])
    lab = grid(LABEL, L_POS, {-2: 0.6}).sel(position=[-4, -3, -2])
    ds = B.binding_dataset(c, lab)
    assert ds.attrs["binding_order"] == B.UNRESOLVED and "decision position" in ds.attrs["binding"]


# ------------------------------------------------- the label swap's patching against the plain-hook reference
# The same check tests/test_patching.py makes on content swaps, on label-swap pairs rendered from the shipped prompts.

TOL = dict(rtol=0, atol=1e-4)
PICK = (0, 3, 5)  # shipped pairs of different lengths


@pytest.fixture(scope="module")
def swapped(prompt_set):
    swap = F.select("ethical.12.swap")[0]
    return [swap.render(prompt_set.pairs[i]) for i in PICK]


def _tokens(model, pairs, chat):
    batch = encode_pairs(model, pairs, ["1", "2"], chat=chat)
    toks = [(torch.tensor([batch.encoded.tokens(batch.row(i, "base"))]),
             torch.tensor([batch.encoded.tokens(batch.row(i, "cf"))])) for i in range(batch.n)]
    return tuple(batch.label_ids), toks


def _differing(b, c) -> list[int]:
    """Positions (from the end) where base and counterfactual tokens differ."""
    assert b.shape == c.shape, "a label swap keeps the token lengths"
    T = b.shape[1]
    return [int(k) - T for k in torch.nonzero(b[0] != c[0]).flatten()]


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), **TOL)


def test_label_swap_pairs_differ_only_at_the_two_labels(swapped):
    for p in swapped:
        assert p.base.replace("Option 1:", "#").replace("Option 2:", "@") == \
            p.cf.replace("Option 2:", "#").replace("Option 1:", "@")
        assert p.base_ethical != p.cf_ethical


@pytest.mark.parametrize("family", FAMILIES)
def test_label_swap_last_position_matches_reference(family, strong_models, swapped):
    """Every layer x component at the decision position, KV-cache and full-forward paths, and AtP."""
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _tokens(model, swapped, chat=False)
    assert len({b.shape[1] for b, _ in toks}) > 1  # padded batch
    kv = activation_patching(model, swapped, PatchingOptions(chat=False, atp=True, kv_cache="on"))
    full = activation_patching(model, swapped, PatchingOptions(chat=False, atp=True, kv_cache="off"))
    assert all(len(_differing(b, c)) == 2 for b, c in toks)  # the two label tokens
    sweep_matches_reference((kv, full), hf, toks, ids, COMPS)


def test_label_swap_chat_formatted_matches_reference(strong_models, swapped):
    model = strong_models("llama")
    hf = model.lm._module
    ids, toks = _tokens(model, swapped[:2], chat=None)
    ds = activation_patching(model, swapped[:2], PatchingOptions(chat=None, components=("resid", "attn")))
    for i, (b, c) in enumerate(toks):
        sweep = ref.patch_sweep(hf, b, c, ids, ("resid", "attn"))
        for j, comp in enumerate(("resid", "attn")):
            _close(ds["patched_logit_diff"].values[i, :, j], sweep[comp])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_label_swap_grid_matches_reference(family, strong_models, swapped):
    """Grid mode runs on every label-swap pair (equal lengths); at the label tokens, between them, at the decision
    position and at the first token it gives the reference; before the first label the states are the base's."""
    model = strong_models(family)
    hf = model.lm._module
    ids, toks = _tokens(model, swapped[:2], chat=False)
    ds = activation_patching(model, swapped[:2], PatchingOptions(chat=False, atp=True, positions="grid",
                                                                 layers=(0, 2)))
    assert not ds["skipped"].values.any()
    for i, (b, c) in enumerate(toks):
        first, second = _differing(b, c)
        T = b.shape[1]
        for p in (first, second, (first + second) // 2, first - 1, -1, -T):
            sweep = ref.patch_sweep(hf, b, c, ids, COMPS, position=p)
            atp = ref.attribution_patching(hf, b, c, ids, position=p, components=COMPS)
            for j, comp in enumerate(COMPS):
                _close(ds["patched_logit_diff"].sel(position=p).values[i, :, j], sweep[comp][[0, 2]])
                _close(ds["atp_delta"].sel(position=p).values[i, :, j], atp[comp][[0, 2]])
        # the label tokens carry something (the check is not vacuous) ...
        moved = ds["patched_logit_diff"].sel(position=[first, second]).values[i] - float(ds["base_logit_diff"][i])
        assert np.abs(moved).max() > 1e-2
        # ... and before the first label, base and counterfactual states are the same: patching there changes nothing
        _close(ds["patched_logit_diff"].sel(position=first - 1).values[i], np.full((2, 3), ds["base_logit_diff"][i]))
