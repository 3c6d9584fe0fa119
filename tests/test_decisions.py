"""Baseline decisions: one batched trace; values equal an unpadded plain forward per prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference.patching import logit_diff

from nnethics.analyses.decisions import DecisionOptions
from nnethics.engine import baseline_decisions


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mixtral"])
def test_decisions_match_unpadded_reference(family, tiny_models, prompt_set):
    model = tiny_models(family)
    pairs = list(prompt_set.pairs[:3])
    ds = baseline_decisions(model, pairs, DecisionOptions())
    hf = model.lm._module
    ids = [int(x) for x in ds["label_token_id"].values]
    for i in range(len(pairs)):
        for j in range(2):
            toks = ds["input_ids"].values[i, j]
            toks = torch.from_numpy(toks[toks >= 0][None].astype("int64"))
            ref = logit_diff(hf, toks, ids)
            assert abs(float(ds["logit_diff"].values[i, j]) - ref) < 1e-4
            assert ds["prompt_text"].values[i, j].startswith("<|im_start|>system")
            # the values against a plain forward: softmax over the whole vocabulary, argmaxes
            with torch.no_grad():
                full = hf(toks).logits[0, -1].double()
            probs = full.softmax(-1)
            np.testing.assert_allclose(ds["label_prob"].values[i, j], probs[ids].numpy(), rtol=1e-4, atol=0)
            np.testing.assert_allclose(ds["label_logit"].values[i, j], full[ids].numpy(), rtol=1e-5, atol=1e-5)
            assert ds["chosen"].values[i, j] == ["1", "2"][int(full[ids].argmax())]
            assert int(ds["top_token_id"].values[i, j]) == int(full.argmax())
            assert bool(ds["label_is_top"].values[i, j]) == (int(full.argmax()) in ids)
    probs = ds["label_prob"].values
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_array_equal(ds["chosen"].values == ds["ethical_option"].values, ds["chose_ethical"].values)
    assert list(ds["consistent"].values) == list(ds["chose_ethical"].values.all(-1) | ~ds["chose_ethical"].values.any(-1))


def test_label_is_top_and_chosen_follow_the_full_logits(tiny_models, prompt_set):
    """With the base prompt's top-1 token as one of the two labels, that label is chosen and is the top
    token, whichever position it takes; the other prompts' rows agree with a plain forward."""
    model = tiny_models("llama")
    pairs = list(prompt_set.pairs[:2])
    first = baseline_decisions(model, pairs, DecisionOptions())
    top = int(first["top_token_id"].values[0, 0])
    other = int(first["label_token_id"].values[0])
    assert top != other
    for label_ids, want in (([other, top], "2"), ([top, other], "1")):
        ds = baseline_decisions(model, pairs, DecisionOptions(), label_ids=label_ids)
        assert ds["chosen"].values[0, 0] == want and bool(ds["label_is_top"].values[0, 0])
        hf = model.lm._module
        for i in range(len(pairs)):
            for j in range(2):
                toks = ds["input_ids"].values[i, j]
                with torch.no_grad():
                    full = hf(torch.from_numpy(toks[toks >= 0][None].astype("int64"))).logits[0, -1]
                assert ds["chosen"].values[i, j] == ["1", "2"][int(full[label_ids].argmax())]
                assert bool(ds["label_is_top"].values[i, j]) == (int(full.argmax()) in label_ids)


def test_decisions_trace_is_remote_safe(tiny_models, prompt_set):
    """The decision trace survives nnsight's serialize/deserialize dry run."""
    model = tiny_models("llama")
    from nnethics.analyses.common import encode_pairs
    from nnethics.analyses.decisions import decision_logits

    batch = encode_pairs(model, prompt_set.pairs[:2], ("1", "2"))
    local = decision_logits(model, batch)
    model.remote = "local"
    try:
        dry = decision_logits(model, batch)
    finally:
        model.remote = False
    for a, b in zip(local, dry):
        torch.testing.assert_close(a, b)



@pytest.mark.slow
def test_builtin_model_decisions(builtin_model, prompt_set):
    ds = baseline_decisions(builtin_model, list(prompt_set.pairs[:4]), DecisionOptions())
    assert ds["label_is_top"].any()
    assert list(ds["label_token"].values) == ["1", "2"]
