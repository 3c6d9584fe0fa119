"""Every family's adapter: the uniform paths read the same states as HF's output_hidden_states."""

from __future__ import annotations

import nnsight
import pytest
import torch
from conftest import FAMILIES

from nnethics.analyses.common import encode
from nnethics.models.adapters import UnsupportedArchitectureError, adapter_for


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_outputs_match_hidden_states(family, tiny_models):
    model = tiny_models(family)
    hf = model.lm._module
    enc = encode(model.tokenizer, ["Option 1: help. Option 2: leave.\nAnswer:", "Be kind."])
    L = model.n_layers
    with torch.no_grad(), model.trace(enc.inputs()):
        outs = nnsight.save([model.lm.model.layers[i].output.clone() for i in range(L)])
        logits = model.lm.output.logits.clone().save()
    with torch.no_grad():
        ref = hf(**enc.inputs(), output_hidden_states=True)
    # HF's last hidden state is after the final norm, so compare all but the last layer.
    for i in range(L - 1):
        torch.testing.assert_close(outs[i], ref.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_and_mlp_contributions_rebuild_the_residual(family, tiny_models):
    """resid_out = resid_in + attn_contribution + mlp_contribution for every layer."""
    model = tiny_models(family)
    enc = encode(model.tokenizer, ["Which option is more ethical? Answer with 1 or 2."])
    L = model.n_layers
    with torch.no_grad(), model.trace(enc.inputs()):
        rows = nnsight.save([])
        for i in range(L):
            layer = model.lm.model.layers[i]
            x_in = layer.inputs[0][0].clone()
            a = model.attn_out(i).output
            a = (a[0] if model.adapter.attn_out_is_tuple else a).clone()
            m = model.mlp_out(i).output
            m = (m[0] if isinstance(m, tuple) else m).clone()
            rows.append((x_in, a, m, layer.output.clone()))
    for x_in, a, m, out in rows:
        torch.testing.assert_close(x_in + a + m, out, rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_lists_families():
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for("bert")
    msg = str(err.value)
    assert "'bert'" in msg and "GPT-2" in msg and "Mixtral" in msg and "Gemma" in msg
