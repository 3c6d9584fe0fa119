"""The steer engine's rows against plain transformers forwards with hooks (tests/reference/steer.py), per family:
steered rows on the KV path (one token over the prefix cache, layers before the steered one skipped) and on full
forwards, the KL against the unsteered row, and the answer-token states of the caa direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_tiny
from reference.steer import last_states, steered_next_token

from nnethics.analyses.common import encode_pairs
from nnethics.analyses.steer.engine import add_row, answer_states, empty_rows, own_prefix, run_rows


def _setup(model, prompt_set):
    batch = encode_pairs(model, list(prompt_set.pairs[:2]), ["1", "2"], False)
    ids = (batch.label_ids[0], batch.label_ids[1])
    hf = model.lm._module
    toks = [torch.tensor([batch.encoded.tokens(s)]) for s in range(4)]
    states = torch.stack([last_states(hf, t) for t in toks]).float()  # [4, L, d], from the reference
    return batch, ids, hf, toks, states


@pytest.mark.parametrize("size", [3, 16])  # 3: one reference and its row per forward; 16: several share one
@pytest.mark.parametrize("path", ["kv", "kv-every-layer", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_steered_rows_equal_a_hooked_plain_forward(tiny_models, prompt_set, family, path, size):
    model = tiny_models(family)
    batch, ids, hf, toks, states = _setup(model, prompt_set)
    L, d = model.n_layers, model.d_model
    rng = np.random.default_rng(0)
    units = torch.tensor(rng.normal(size=(3, d)), dtype=torch.float32)
    units = units / units.norm(dim=1, keepdim=True)
    # (seq, layer, direction, coefficient): every layer, both sides, negative and zero coefficients, no direction
    spec = [(0, 0, 0, 2.0), (1, 1, 1, -3.0), (2, L - 1, 2, 1.5), (3, 1, 0, 0.0), (0, 1, -1, 0.0), (3, 0, 2, 4.0),
            (1, L - 1, 1, -2.5)]
    rows, pairs = empty_rows(), []
    for seq, layer, u, coef in spec:
        ref = add_row(rows, seq, seq, layer, layer)
        pairs.append((ref, add_row(rows, seq, seq, layer, layer, u, coef, ref)))
    prefix = own_prefix(model, batch.encoded, 4) if path.startswith("kv") else None
    out = run_rows(model, batch.encoded, prefix, ids, states, units, rows, size, torch.float32,
                   skip=path != "kv-every-layer")
    r0 = {key: out[key][[a for a, _ in pairs]] for key in out}
    got = {key: out[key][[b for _, b in pairs]] for key in out}
    for r, (seq, layer, u, coef) in enumerate(spec):
        vec = torch.zeros(d) if u < 0 else coef * units[u]
        want_ld, want_logp = steered_next_token(hf, toks[seq], layer, vec, ids)
        plain_ld, plain_logp = steered_next_token(hf, toks[seq], layer, torch.zeros(d), ids)
        assert float(got["ld"][r]) == pytest.approx(want_ld, abs=1e-4), (family, path, r)
        assert float(r0["ld"][r]) == pytest.approx(plain_ld, abs=1e-4), (family, path, r)
        kl = float((plain_logp.exp() * (plain_logp - want_logp)).sum())
        assert float(got["kl"][r]) == pytest.approx(kl, abs=1e-4), (family, path, r)
        assert bool(got["top"][r]) == (int(want_logp.argmax()) in ids)
    assert torch.isnan(r0["kl"]).all()  # no reference: no KL


def test_a_zero_coefficient_is_the_unsteered_row_bit_for_bit(tiny_models, prompt_set):
    model = tiny_models("llama")
    batch, ids, _, _, states = _setup(model, prompt_set)
    units = torch.randn(2, model.d_model, generator=torch.Generator().manual_seed(0))
    rows = empty_rows()
    for seq in range(4):
        add_row(rows, seq, seq, 1, 1)  # no direction
        add_row(rows, seq, seq, 1, 1, 0, 0.0)  # a direction times zero
        add_row(rows, seq, seq, 1, 1, 1, 0.0)
    for prefix in (own_prefix(model, batch.encoded, 4), None):
        got = run_rows(model, batch.encoded, prefix, ids, states, units, rows, 16, torch.float32)["ld"].numpy()
        np.testing.assert_array_equal(got[0::3], got[1::3])
        np.testing.assert_array_equal(got[0::3], got[2::3])


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_states_equal_a_plain_forward_of_the_prompt_and_the_answer(tiny_models, prompt_set, family):
    model = tiny_models(family)
    batch, ids, hf, toks, _ = _setup(model, prompt_set)
    for prefix in (own_prefix(model, batch.encoded, 4), None):
        got = answer_states(model, batch.encoded, prefix, list(ids), 3)  # [4, 2, L, d]
        for s in range(4):
            for a in range(2):
                want = last_states(hf, torch.cat([toks[s], torch.tensor([[ids[a]]])], 1))
                np.testing.assert_allclose(got[s, a].double().numpy(), want.numpy(), atol=2e-5,
                                           err_msg=f"{family} {s} {a}")


def test_the_kl_is_unsteered_against_steered_on_a_peaked_distribution(tokenizer, prompt_set):
    """A tiny model whose unembedding is scaled up has peaked distributions; a push along one token's unembedding
    after the last layer moves the mass, and the two directions of KL differ by far more than rounding: the row's
    KL is KL(unsteered || steered)."""
    model = make_tiny("llama", tokenizer, seed=7)
    with torch.no_grad():
        model.lm._module.lm_head.weight.mul_(300.0)
    batch, ids, hf, toks, states = _setup(model, prompt_set)
    L = model.n_layers
    w = hf.lm_head.weight[ids[0]].detach().float()
    units = (w / w.norm())[None]
    coef = 3.0 * float(states[0, L - 1].norm())
    rows = empty_rows()
    ref = add_row(rows, 0, 0, L - 1, L - 1)
    add_row(rows, 0, 0, L - 1, L - 1, 0, coef, ref)
    prefix = own_prefix(model, batch.encoded, 4)
    got = float(run_rows(model, batch.encoded, prefix, ids, states, units, rows, 4, torch.float32)["kl"][1])
    _, p = steered_next_token(hf, toks[0], L - 1, torch.zeros(model.d_model), ids)
    _, q = steered_next_token(hf, toks[0], L - 1, coef * units[0], ids)
    forward, reverse = float((p.exp() * (p - q)).sum()), float((q.exp() * (q - p)).sum())
    assert abs(forward - reverse) > 0.1 * forward  # the case separates the two
    assert got == pytest.approx(forward, rel=1e-3)
