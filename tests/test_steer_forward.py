"""The steered forward (work in progress, issue 27) against a plain transformers forward with a hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from reference.steer import steered_logit_diff

from nnethics.analyses.common import encode_pairs
from nnethics.analyses.steer.forward import steered


@pytest.mark.parametrize("family", FAMILIES)
def test_the_steered_logit_difference_equals_a_hooked_plain_forward(tiny_models, prompt_set, family):
    model = tiny_models(family)
    pairs = list(prompt_set.pairs[:2])
    batch = encode_pairs(model, pairs, ["1", "2"], False)
    ids = (batch.label_ids[0], batch.label_ids[1])
    rng = np.random.default_rng(0)
    seqs = [0, 1, 2, 3, 0, 3]
    layers = [0, 1, model.n_layers - 1, 1, 1, 0]
    vectors = rng.normal(scale=2.0, size=(len(seqs), model.d_model)).astype(np.float32)
    vectors[4] = 0.0  # an unsteered row
    ld, logp = steered(model, batch.encoded, seqs, layers, vectors, ids)
    hf = model.lm._module
    for r, (s, layer) in enumerate(zip(seqs, layers)):
        toks = torch.tensor([batch.encoded.tokens(s)])
        want = steered_logit_diff(hf, toks, layer, torch.from_numpy(vectors[r]), ids)
        assert ld[r] == pytest.approx(want, abs=1e-4), (family, r)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-4)


def test_a_zero_vector_is_the_unsteered_row_bit_for_bit(tiny_models, prompt_set):
    model = tiny_models("llama")
    batch = encode_pairs(model, list(prompt_set.pairs[:2]), ["1", "2"], False)
    ids = (batch.label_ids[0], batch.label_ids[1])
    zero = np.zeros((4, model.d_model), dtype=np.float32)
    steered_ld, _ = steered(model, batch.encoded, [0, 1, 2, 3], [1, 1, 1, 1], zero, ids)
    with torch.no_grad(), model.trace(batch.encoded.inputs(), logits_to_keep=1):
        logits = model.lm.output.logits[:, -1].float()
        plain = (logits[:, ids[0]] - logits[:, ids[1]]).save()
    np.testing.assert_array_equal(steered_ld, plain.cpu().numpy())
