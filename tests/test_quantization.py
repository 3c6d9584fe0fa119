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

from nnethics.cli import cli
from nnethics.engine import baseline_decisions
from nnethics.models import load_model
from nnethics.prompts import load_prompts

pytest.importorskip("bitsandbytes")

# Bounds relative to the largest |value| compared (LDs here are 0.1-0.2, head contributions up to 0.1):
# against a float32 model that carries the weights the quantized layers multiply by (measured: 1% for
# 4-bit, 0.8% for 8-bit, from bfloat16 products / int8 inputs). nf4 on these random 64-wide weights moves
# LDs by ~30% of their size, so the float32 model with the original weights is only a pattern check.
REL = 0.02
LAYER_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def _close_rel(got, want, rel=REL):
    got, want = np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel()
    bound = rel * np.abs(want).max()
    assert np.abs(want).max() > 0.05, "the values compared are too small to mean anything"
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


def _effective_float_model(quantized, model_dir, tokenizer):
    """A float32 copy of the model whose every quantized linear layer holds the weights that layer really
    multiplies by: the layer run on the identity matrix (minus its bias), read off with plain torch."""
    import torch
    from transformers import AutoModelForCausalLM

    from nnethics.models import wrap_model

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = 0
    with torch.no_grad():
        for name, mod in quantized.lm._module.named_modules():
            if type(mod).__name__ in LAYER_CLASS.values():
                wt = mod(torch.eye(mod.in_features)).float()
                if mod.bias is not None:
                    wt = wt - mod.bias.float()
                hf.get_submodule(name).weight.copy_(wt.T)
                n += 1
    assert n > 0
    return wrap_model(hf.eval(), tokenizer, name="tiny-llama-effective")


@pytest.fixture(scope="module")
def pairs():
    return load_prompts(PROMPTS).pairs[:4]


@pytest.fixture(scope="module")
def float_decisions(tiny_model_dir, pairs):
    return baseline_decisions(load_model(str(tiny_model_dir), device="cpu"), pairs)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_decisions_match_the_weights_they_use(tiny_model_dir, tokenizer, pairs, float_decisions, quant):
    model = load_model(str(tiny_model_dir), quantize=quant, device="cpu")
    assert model.quantization == quant and model.slug.endswith(f"-{quant}")
    assert model.dtype == f"{quant}/float32" and model.provenance()["quantization"] == quant
    assert type(model.layer(0).mlp.down_proj._module).__name__ == LAYER_CLASS[quant]
    ds = baseline_decisions(model, pairs)
    got, orig = ds["logit_diff"].values.ravel(), float_decisions["logit_diff"].values.ravel()
    assert np.isfinite(got).all() and ds["logit_diff"].dtype == np.float32
    effective = baseline_decisions(_effective_float_model(model, tiny_model_dir, tokenizer), pairs)
    _close_rel(got, effective["logit_diff"].values)
    if quant == "8bit":  # int8 keeps the weights within 1% of float32's
        _close_rel(got, orig)
    assert np.corrcoef(got, orig)[0, 1] > 0.9
    assert not np.array_equal(got, orig)  # the quantized weights really were used


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
def test_quantized_attribution_splits_heads_through_the_dequantized_o_proj(tiny_model_dir, tokenizer, pairs, quant):
    """bitsandbytes stores o_proj packed (4-bit, repacked for the CPU kernel after a first forward) or as
    int8 with row scales; the heads go through the dequantized weight, so heads + o_proj bias add up to
    the attention contribution and stay close to the float32 model's heads."""
    from nnethics.engine import direct_logit_attribution

    model = load_model(str(tiny_model_dir), quantize=quant, device="cpu")
    ds = direct_logit_attribution(model, pairs)
    ref = direct_logit_attribution(load_model(str(tiny_model_dir), device="cpu"), pairs)
    attn = ds["diff_contribution"].sel(component="attn")
    summed = ds["head_contribution"].sum("head") + ds["attn_bias_contribution"]
    # the layer multiplies in bfloat16 (4-bit) or quantizes its input to int8: about 1% of slack
    _close_rel(summed.values, attn.values)
    heads, orig = ds["head_contribution"].values.ravel(), ref["head_contribution"].values.ravel()
    effective = direct_logit_attribution(_effective_float_model(model, tiny_model_dir, tokenizer), pairs)
    _close_rel(heads, effective["head_contribution"].values)
    if quant == "8bit":
        _close_rel(heads, orig)
    assert np.corrcoef(heads, orig)[0, 1] > 0.95


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_dense_weight_is_what_the_quantized_layer_multiplies_by(builtin_dir, quant):
    """On the built-in model (576-wide rows: several quantization blocks per row, unlike the tiny model),
    after a first forward has repacked the 4-bit weights for the CPU kernel, ``dense_weight`` reproduces
    the layer's own output, and the attribution heads still add up to the attention part."""
    import torch

    from nnethics.analyses.attribution.trace import dense_weight
    from nnethics.engine import direct_logit_attribution

    model = load_model(str(builtin_dir), quantize=quant, device="cpu")
    pairs = load_prompts(PROMPTS).pairs[:2]
    ds = direct_logit_attribution(model, pairs)  # forwards first: the CPU 4-bit kernel repacks here
    torch.manual_seed(0)
    for layer in (0, model.n_layers - 1):
        proj = model.o_proj(layer)._module
        z = torch.randn(3, proj.in_features)
        out = proj(z).float()
        rel = float((out - z @ dense_weight(proj).float().T).norm() / out.norm())
        assert rel < 1e-2, (layer, rel)  # bfloat16 / int8-input rounding, not a wrong dequantization (~0.4)
    summed = ds["head_contribution"].sum("head") + ds["attn_bias_contribution"]
    # 8-bit also rounds each row of the layer's actual input to int8 (LLM.int8), which heads cannot see
    np.testing.assert_allclose(summed.values, ds["diff_contribution"].sel(component="attn").values,
                               atol={"4bit": 5e-3, "8bit": 1.5e-2}[quant])


@pytest.mark.slow
def test_gpu_check_script_dry_runs_on_cpu(builtin_dir):
    """scripts/bench_gpu.py is what a lent GPU runs; its tiny CPU mode exercises every step of it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    res = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                          "--pairs", "2", "--batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| patching | 2 | 2 |" in res.stdout and "4-bit check: OK" in res.stdout
