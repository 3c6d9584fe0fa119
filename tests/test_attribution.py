"""Direct logit attribution: exact sum identities, the independent hook reference, remote dry run, CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import FAMILIES, PROMPTS, make_tiny
from reference.attribution import dla

from nnethics.analyses.attribution import (
    HEAD_BYTES_PER_ROW,
    AttributionOptions,
    per_option_heads,
    summarize,
)
from nnethics.analyses.attribution.trace import collect, readout, wire_bytes
from nnethics.analyses.common import encode_pairs
from nnethics.engine import baseline_decisions, direct_logit_attribution
from nnethics.prompts import PromptPair

TOL = dict(rtol=1e-4, atol=1e-5)

# Two pairs whose four prompts all tokenize to different lengths, so the batch is really left-padded.
PAIRS = [
    PromptPair("short", "Save the child?\nOption 1: yes.\nOption 2: no.\nAnswer:",
               "Save the small child now?\nOption 1: no.\nOption 2: yes.\nAnswer:", "1", "2"),
    PromptPair("long", "A friend asks you directly whether you broke the vase that their late grandmother left them.\n"
               "Option 1: lie.\nOption 2: tell the truth.\nAnswer:",
               "A friend asks you.\nOption 1: tell the truth.\nOption 2: lie.\nAnswer:", "2", "1"),
]


@pytest.fixture(scope="module")
def attributed(tiny_models):
    cache: dict[str, xr.Dataset] = {}

    def get(family: str) -> xr.Dataset:
        if family not in cache:
            cache[family] = direct_logit_attribution(tiny_models(family), PAIRS)
        return cache[family]

    return get


def _total(ds: xr.Dataset) -> xr.DataArray:
    return (ds["embed_contribution"] + ds["bias_contribution"] + ds["softcap_contribution"]
            + ds["other_layers_contribution"] + ds["diff_contribution"].sum(("layer", "component")))


def _close(a, b, **tol) -> None:
    torch.testing.assert_close(torch.as_tensor(np.asarray(a), dtype=torch.float64),
                               torch.as_tensor(np.asarray(b), dtype=torch.float64), **(tol or TOL))


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_sum_to_the_logit_difference(family, attributed):
    ds = attributed(family)
    assert ds.attrs["complete_layers"] == "true"
    assert ds.sizes == {"prompt": 2, "side": 2, "layer": 3, "component": 2, "option": 2, "head": 4,
                        **({"expert": 4} if family == "mixtral" else {})}
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    per_option = (ds["embed_logit_contribution"] + ds["bias_logit_contribution"] + ds["softcap_logit_contribution"]
                  + ds["logit_contribution"].sum(("layer", "component")))
    _close(per_option, ds["label_logit"], atol=1e-4, rtol=0)
    _close(ds["diff_contribution"], ds["logit_contribution"].sel(option="1") - ds["logit_contribution"].sel(option="2"))
    ratio = abs(ds["diff_contribution"].sel(component="attn")) / abs(ds["diff_contribution"]).sum("component")
    _close(ds["attn_mlp_ratio"], ratio)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_o_proj_bias_sum_to_the_attention_part(family, attributed):
    ds = attributed(family)
    _close(ds["head_contribution"].sum("head") + ds["attn_bias_contribution"],
           ds["diff_contribution"].sel(component="attn"), atol=1e-5, rtol=0)
    _close(ds["head_logit_contribution"].sum("head") + ds["attn_bias_logit_contribution"],
           ds["logit_contribution"].sel(component="attn"), atol=1e-5, rtol=0)
    # only GPT-2's c_proj and GPT-NeoX's dense have a bias among the tiny families
    assert bool((ds["attn_bias_contribution"] != 0).any()) == (family in ("gpt2", "gpt_neox"))


def test_experts_sum_to_the_moe_part(attributed):
    ds = attributed("mixtral")
    _close(ds["expert_contribution"].sum("expert"), ds["diff_contribution"].sel(component="mlp"), atol=1e-5, rtol=0)
    # top-2 routing: exactly two experts contribute per row and layer
    assert ((ds["expert_logit_contribution"].isel(option=0) != 0).sum("expert") == 2).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_hook_reference_on_a_padded_batch(family, tiny_models, attributed):
    model = tiny_models(family)
    ds = attributed(family)
    batch = encode_pairs(model, PAIRS, ["1", "2"])
    assert len(set(batch.encoded.lengths)) == 4, "every row should have its own length (left padding)"
    for i, pair in enumerate(PAIRS):
        for side in ("base", "cf"):
            ids = torch.tensor([batch.encoded.tokens(batch.row(i, side))])
            ref = dla(model.lm._module, ids, tuple(batch.label_ids))
            got = ds.sel(prompt=pair.prompt_id, side=side)
            _close(got["embed_contribution"], ref["embed"])
            _close(got["diff_contribution"].sel(component="attn"), ref["attn"])
            _close(got["diff_contribution"].sel(component="mlp"), ref["mlp"])
            _close(got["head_contribution"], ref["heads"])
            _close(got["attn_bias_contribution"], ref["attn_bias"])
            _close(got["bias_contribution"], ref["norm_bias"])
            _close(got["softcap_contribution"], ref["softcap"])
            _close(got["logit_diff"], ref["logit_diff"])
            if family == "mixtral":
                _close(got["expert_contribution"], ref["experts"])


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_diff_matches_the_decisions_analysis(family, tiny_models, attributed):
    ds = attributed(family)
    dec = baseline_decisions(tiny_models(family), PAIRS)
    _close(dec["logit_diff"], ds["logit_diff"], atol=1e-5, rtol=0)


def test_softcap_term_makes_the_sum_exact(tokenizer):
    """A Gemma-2 whose logits are large enough for the soft-cap to matter."""
    model = make_tiny("gemma2", tokenizer, seed=1)
    with torch.no_grad():
        model.lm._module.model.norm.weight.mul_(40.0)
    ds = direct_logit_attribution(model, PAIRS)
    assert float(abs(ds["softcap_contribution"]).min()) > 1e-2
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    batch = encode_pairs(model, PAIRS, ["1", "2"])
    ref = dla(model.lm._module, torch.tensor([batch.encoded.tokens(batch.row(1, "cf"))]), tuple(batch.label_ids))
    _close(ds["softcap_contribution"].sel(prompt="long", side="cf"), ref["softcap"])
    _close(ds["logit_diff"].sel(prompt="long", side="cf"), ref["logit_diff"])


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_pass_nnsights_remote_dry_run(family, tiny_models, attributed):
    model = tiny_models(family)
    ids = encode_pairs(model, PAIRS, ["1", "2"]).label_ids
    local, dry = readout(model, ids), readout(model.using(remote="local"), ids)
    for name in ("direction", "const", "head_dir", "attn_bias"):
        torch.testing.assert_close(getattr(dry, name), getattr(local, name))
    xr.testing.assert_allclose(direct_logit_attribution(model.using(remote="local"), PAIRS), attributed(family))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_layer_subset_keeps_the_sum_exact(family, tiny_models, attributed):
    full = attributed(family)
    ds = direct_logit_attribution(tiny_models(family), PAIRS, AttributionOptions(layers=(2, 0), heads=False))
    assert ds["layer"].values.tolist() == [0, 2]
    assert ds.attrs["complete_layers"] == "false"
    assert "head_contribution" not in ds and "head" not in ds.dims
    xr.testing.assert_allclose(ds["diff_contribution"], full["diff_contribution"].sel(layer=[0, 2]))
    _close(ds["other_layers_contribution"], full["diff_contribution"].sel(layer=1).sum("component"))
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        direct_logit_attribution(tiny_models(family), PAIRS, AttributionOptions(layers=(3,)))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_difference_only_heads_match_the_per_option_split(family, tiny_models, attributed):
    full = attributed(family)
    ds = direct_logit_attribution(tiny_models(family), PAIRS, AttributionOptions(head_options=False))
    assert "head_logit_contribution" not in ds and "head_contribution" in ds
    _close(ds["head_contribution"], full["head_contribution"])
    _close(ds["head_contribution"].sum("head") + ds["attn_bias_contribution"],
           ds["diff_contribution"].sel(component="attn"), atol=1e-5, rtol=0)
    xr.testing.assert_allclose(ds.drop_vars("head_contribution"),
                               full.drop_vars(["head_contribution", "head_logit_contribution"]))


@pytest.mark.parametrize("family, kept, heads, per_option", [
    ("llama", [0, 1, 2], True, True), ("gemma2", [1, 2], True, False), ("mixtral", [0, 2], True, True),
    ("gpt2", [1], False, True)])
def test_the_trace_brings_back_only_what_wire_bytes_counts(family, kept, heads, per_option, tiny_models):
    """The per-row results are exactly the numbers :func:`wire_bytes` counts, in fresh (unshared) storage."""
    model = tiny_models(family)
    batch = encode_pairs(model, PAIRS, ["1", "2"])
    proj = collect(model, batch.encoded.inputs(), batch.label_ids, heads=heads, kept=kept, per_option=per_option)
    cfg = model.config
    want = wire_bytes(model.n_layers, model.n_heads, 2, kept=len(kept), heads=heads, head_options=per_option,
                      top_k=getattr(cfg, "num_experts_per_tok", 0) if model.adapter.moe else 0,
                      post=model.adapter.attn_post_norm is not None)
    assert proj.per_row_bytes() == sum(want.values())
    for name in ("scale", "embed", "layers", "const", "attn_bias", "heads", "post", "experts", "expert_idx",
                 "pre_logits", "logits"):
        t = getattr(proj, name)
        if t is not None:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    assert proj.layers.shape == (4, model.n_layers, 2, 2) and proj.attn_bias.shape == (len(kept), 2)
    assert (proj.heads is not None) == heads and (proj.heads is None or proj.heads.shape[-1] == (2 if per_option else 1))
    ro = readout(model, batch.label_ids)  # the weights-only trace agrees with the in-trace directions
    torch.testing.assert_close(proj.const, ro.const)
    torch.testing.assert_close(proj.attn_bias, ro.attn_bias[kept])


def test_a_70b_shaped_model_fits_the_remote_budget():
    big = SimpleNamespace(n_layers=80, n_heads=64, dtype="bfloat16", serialized=True)  # through NDIF
    big_here = SimpleNamespace(n_layers=80, n_heads=64, dtype="bfloat16", serialized=False)  # local weights
    per_prompt = sum(wire_bytes(80, 64, 2, half=True, head_options=False).values())
    assert per_prompt == 12856 and per_prompt <= 16 * 1024
    assert sum(wire_bytes(80, 64, 2, heads=False).values()) == 2616
    assert not per_option_heads(big, AttributionOptions(), 80)  # 20 KB of per-option heads
    assert per_option_heads(big_here, AttributionOptions(), 80)  # nothing travels locally
    assert per_option_heads(big, AttributionOptions(head_options=True), 80)
    assert per_option_heads(big, AttributionOptions(), 40)  # --layers with half the layers fits
    smol = SimpleNamespace(n_layers=30, n_heads=9, dtype="float32", serialized=True)
    assert wire_bytes(30, 9, 2)["heads"] <= HEAD_BYTES_PER_ROW and per_option_heads(smol, AttributionOptions(), 30)


def test_a_16_bit_model_sends_float16_heads(tokenizer):
    from nnethics.models import wrap_model

    hf = make_tiny("llama", tokenizer, seed=3).lm._module.to(torch.bfloat16)
    model = wrap_model(hf, tokenizer, name="tiny-llama-bf16")
    assert model.dtype == "bfloat16"
    batch = encode_pairs(model, PAIRS, ["1", "2"])
    proj = collect(model, batch.encoded.inputs(), batch.label_ids)
    assert proj.heads.dtype == torch.float16 and proj.layers.dtype == torch.float64
    ds = direct_logit_attribution(model, PAIRS)
    # the model rounds its attention output and logits to bfloat16 (2^-8): the identities hold to that precision
    attn = ds["diff_contribution"].sel(component="attn")
    _close(ds["head_contribution"].sum("head") + ds["attn_bias_contribution"], attn, atol=2e-2 * float(abs(attn).max()),
           rtol=0)
    _close(_total(ds), ds["logit_diff"], atol=2**-6 * float(abs(ds["label_logit"]).max()), rtol=0)


def test_pipeline_run_writes_a_consolidated_file(tiny_models, prompt_set, tmp_path):
    from nnethics.engine import Run, make_context
    from nnethics.store import load

    model = tiny_models("llama")
    prompts = prompt_set.subset(limit=3)
    ctx = make_context(model, prompts)
    with Run(model, tmp_path, batch_size=2, progress=False) as run:
        path, summary = run.one("attribution", prompts, ctx)
    ds = load(path)
    assert ds.attrs["complete_layers"] == "true" and ds.attrs["analysis"] == "attribution"
    assert ds["prompt"].values.tolist() == prompts.ids()
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    direct = direct_logit_attribution(model, prompts.pairs, label_ids=ctx.label_ids)
    _close(ds["head_contribution"], direct["head_contribution"])
    assert summary.startswith("3 pairs; largest mean |diff|: L") and "heads: L" in summary


def test_summary_names_the_largest_parts(attributed):
    ds = attributed("gpt2").copy(deep=True)
    ds["diff_contribution"][:] = 0.0
    ds["diff_contribution"].loc[{"layer": 1, "component": "mlp"}] = 5.0
    ds["diff_contribution"].loc[{"layer": 2, "component": "attn"}] = -3.0
    text = summarize(ds)
    assert "largest mean |diff|: L1 mlp 5.00 (mean +5.00), L2 attn 3.00 (mean -3.00)" in text


@pytest.mark.parametrize("value, fragment", [("3-1", "is an empty range"), ("x", "not a layer number"),
                                             ("1,,2", "not a layer number")])
def test_cli_rejects_a_bad_layers_value(value, fragment):
    from nnethics.cli import cli

    result = CliRunner().invoke(cli, ["attribute", "--layers", value])
    assert result.exit_code == 2
    assert "--layers" in result.output and fragment in result.output


def test_parse_layers():
    from nnethics.analyses.base import parse_layers

    assert parse_layers("0-2, 5,1") == (0, 1, 2, 5)
    assert parse_layers(None) is None and parse_layers(" ") is None and parse_layers("all") is None
    for bad in ("3-1", "x", "1,,2", "-1"):
        with pytest.raises(ValueError):
            parse_layers(bad)


@pytest.mark.slow
def test_cli_attribute_on_the_builtin_model(tmp_path, builtin_dir):
    from nnethics.cli import cli
    from nnethics.store import load

    result = CliRunner().invoke(cli, ["attribute", "--prompts", str(PROMPTS), "--limit", "2", "--store",
                                      str(tmp_path), "--layers", "0-3,29", "--no-progress"])
    assert result.exit_code == 0, result.output
    files = list(tmp_path.glob("*/attribution.nc"))
    assert len(files) == 1 and str(files[0]) in result.output
    ds = load(files[0])
    assert ds["layer"].values.tolist() == [0, 1, 2, 3, 29] and ds.attrs["complete_layers"] == "false"
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    # other layers over the stored file: the conflict is found from the spec, before the model loads
    bad = CliRunner().invoke(cli, ["attribute", "--prompts", str(PROMPTS), "--limit", "1", "--store",
                                   str(tmp_path), "--layers", "30"])
    assert bad.exit_code == 2 and "holds results computed with other options" in bad.output
    assert "loading model" not in bad.output
    # on an empty store a layer the model lacks is refused once it has loaded
    bad = CliRunner().invoke(cli, ["attribute", "--prompts", str(PROMPTS), "--limit", "1", "--store",
                                   str(tmp_path / "other"), "--layers", "30"])
    assert bad.exit_code == 2 and "--layers: layer 30 does not exist: the model has layers 0-29" in bad.output


@pytest.mark.slow
def test_builtin_model_parts_sum_to_the_logit_difference(builtin_model, prompt_set):
    pairs = prompt_set.pairs[:3]
    ds = direct_logit_attribution(builtin_model, pairs)
    _close(_total(ds), ds["logit_diff"], atol=1e-4, rtol=0)
    _close(ds["head_contribution"].sum("head") + ds["attn_bias_contribution"],
           ds["diff_contribution"].sel(component="attn"), atol=1e-4, rtol=0)
    dec = baseline_decisions(builtin_model, pairs)
    _close(dec["logit_diff"], ds["logit_diff"], atol=1e-4, rtol=0)
    batch = encode_pairs(builtin_model, pairs, ["1", "2"])
    ref = dla(builtin_model.lm._module, torch.tensor([batch.encoded.tokens(batch.row(2, "cf"))]),
              tuple(batch.label_ids))
    got = ds.isel(prompt=2).sel(side="cf")
    _close(got["diff_contribution"].sel(component="mlp"), ref["mlp"], atol=1e-4, rtol=1e-4)
    _close(got["head_contribution"], ref["heads"], atol=1e-4, rtol=1e-4)
