"""Large local models: bitsandbytes 4-bit / 8-bit quantization and ``--device-map auto``, on CPU.

A tiny random Llama saved to a folder is loaded quantized; decisions run through the same nnsight
trace and land close to the float32 model's (nf4 on random 64-wide weights moves the logit difference
by a few hundredths, int8 by a few thousandths).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS

from nnethics.analyses.decisions import baseline_decisions
from nnethics.cli import cli
from nnethics.models import load_model
from nnethics.prompts import load_prompts

pytest.importorskip("bitsandbytes")

# Loose bounds on |LD(quantized) − LD(float32)|; 4-bit is also checked to keep the pattern across prompts.
ATOL = {"4bit": 0.1, "8bit": 0.01}
LAYER_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


@pytest.fixture(scope="module")
def pairs():
    return load_prompts(PROMPTS).pairs[:4]


@pytest.fixture(scope="module")
def float_decisions(tiny_model_dir, pairs):
    return baseline_decisions(load_model(str(tiny_model_dir), device="cpu"), pairs)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_decisions_stay_close_to_float32(tiny_model_dir, pairs, float_decisions, quant):
    model = load_model(str(tiny_model_dir), quantize=quant, device="cpu")
    assert model.quantization == quant and model.slug.endswith(f"-{quant}")
    assert model.dtype == f"{quant}/float32" and model.provenance()["quantization"] == quant
    assert type(model.layer(0).mlp.down_proj._module).__name__ == LAYER_CLASS[quant]
    ds = baseline_decisions(model, pairs)
    want, got = float_decisions["logit_diff"].values.ravel(), ds["logit_diff"].values.ravel()
    assert np.isfinite(got).all() and ds["logit_diff"].dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL[quant])
    assert np.corrcoef(got, want)[0, 1] > 0.9
    assert not np.array_equal(got, want)  # the quantized weights really were used


def test_device_map_auto_on_cpu(tiny_model_dir, pairs, float_decisions):
    model = load_model(str(tiny_model_dir), device_map="auto")
    assert {p.device.type for p in model.lm._module.parameters()} == {"cpu"}
    assert model.device == "auto"
    xr.testing.assert_allclose(baseline_decisions(model, pairs), float_decisions)


@pytest.mark.slow
@pytest.mark.parametrize("option", [("--quantize", "4bit"), ("--device-map", "auto")])
def test_cli_runs_large_model_options(tiny_model_dir, tmp_path, option):
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), *option, "--analyses", "decisions",
                                   "--limit", "2", "--prompts", str(PROMPTS), "--store", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    (path,) = tmp_path.glob("*/decisions.nc")
    with xr.open_dataset(path) as ds:
        assert ds.sizes["prompt"] == 2
        assert ds.attrs["quantization"] == ("4bit" if option[1] == "4bit" else "")
        assert path.parent.name.endswith("-4bit") == (option[1] == "4bit")


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_attribution_splits_heads_through_the_dequantized_o_proj(tiny_model_dir, pairs, quant):
    """bitsandbytes stores o_proj packed (4-bit, repacked for the CPU kernel after a first forward) or as
    int8 with row scales; the heads go through the dequantized weight, so heads + o_proj bias add up to
    the attention contribution and stay close to the float32 model's heads."""
    from nnethics.analyses.attribution import direct_logit_attribution

    model = load_model(str(tiny_model_dir), quantize=quant, device="cpu")
    ds = direct_logit_attribution(model, pairs)
    ref = direct_logit_attribution(load_model(str(tiny_model_dir), device="cpu"), pairs)
    attn = ds["diff_contribution"].sel(component="attn")
    summed = ds["head_contribution"].sum("head") + ds["attn_bias_contribution"]
    # the layer multiplies in bfloat16 (4-bit) or quantizes its input to int8: a few 1e-3 of slack
    np.testing.assert_allclose(summed.values, attn.values, atol=ATOL[quant] / 10)
    heads, want = ds["head_contribution"].values.ravel(), ref["head_contribution"].values.ravel()
    np.testing.assert_allclose(heads, want, atol=ATOL[quant])
    assert np.corrcoef(heads, want)[0, 1] > 0.95
