"""Label logits from a few lm_head columns (:mod:`nnethics.analyses.unembed`) keep every bit.

The claim the KV path's patched rows and attribution's shared-trace logits rest on: the logits of the label
columns computed alone (with fillers up to 16 columns) equal, bit for bit, the same logits of the whole vocabulary;
and with fewer columns they would not (so the 16 is needed, not decoration). Then the patched LDs of the KV path
with the label columns equal those with the whole lm_head, on tiny models and the built-in model.
"""

from __future__ import annotations

import pytest
import torch

from nnethics.analyses.common import encode_pairs
from nnethics.analyses.patching.engine import Patch, Row, run_groups, run_prefix
from nnethics.analyses.unembed import MIN_COLUMNS, label_columns, logits_of


def test_label_columns_put_the_labels_first_and_fill_to_the_minimum():
    head = torch.nn.Linear(8, 100, bias=False)
    cols = label_columns(head, [40, 3])
    assert cols[:2] == [40, 3] and len(cols) == MIN_COLUMNS and len(set(cols)) == MIN_COLUMNS
    assert label_columns(head, list(range(20, 40)))[:20] == list(range(20, 40))  # more labels than the minimum
    assert label_columns(torch.nn.Linear(8, 10), [1, 2]) is None               # vocabulary under the minimum

    class Quantized(torch.nn.Linear):  # e.g. bitsandbytes' Linear8bitLt: its weight is not the matrix
        pass

    assert label_columns(Quantized(8, 100), [1, 2]) is None


@pytest.mark.parametrize("shape", [(6, 99), (276, 1), (3, 1), (1, 1)])
def test_label_columns_are_bit_equal_to_the_whole_vocabulary(shape):
    torch.manual_seed(0)
    head = torch.nn.Linear(576, 49152, bias=True)
    x = torch.randn(*shape, 576)
    cols = label_columns(head, [30, 17])
    with torch.no_grad():
        whole, part = head(x), logits_of(head, x, cols)
        two = logits_of(head, x, cols[:2])
    assert torch.equal(part[..., :2], whole[..., [30, 17]])
    # the reason for the fillers: two columns alone take another kernel and other last bits
    assert not torch.equal(two, whole[..., [30, 17]]) or shape[0] * shape[1] == 1


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_kv_rows_with_label_columns_equal_the_whole_lm_head(family, tiny_models, prompt_set):
    model = tiny_models(family)
    batch = encode_pairs(model, list(prompt_set.pairs[:2]), ["1", "2"], chat=False)
    n, L = batch.n, model.n_layers
    groups = [[Row(batch.row(i, "cf")), Row(batch.row(i, "base"))]
              + [Row(batch.row(i, "base"), None, Patch((la,), comp)) for la in range(L) for comp in ("resid", "attn")]
              for i in range(n)]
    ids = (batch.label_ids[0], batch.label_ids[1])
    cols = label_columns(model.lm.lm_head._module, ids)
    assert cols is not None
    with torch.no_grad():
        prefix = run_prefix(model, batch.encoded, groups)
        whole, _ = run_groups(model, batch.encoded, groups, ids, prefix=prefix, columns=None)
        part, _ = run_groups(model, batch.encoded, groups, ids, prefix=prefix, columns=cols)
    assert part == whole


@pytest.mark.slow
def test_builtin_kv_rows_with_label_columns_equal_the_whole_lm_head(builtin_model, prompt_set):
    model = builtin_model
    batch = encode_pairs(model, list(prompt_set.pairs[:2]), ["1", "2"])
    groups = [[Row(batch.row(i, "cf")), Row(batch.row(i, "base"))]
              + [Row(batch.row(i, "base"), None, Patch((la,), comp)) for la in range(0, model.n_layers, 3)
                 for comp in ("resid", "attn", "mlp")] for i in range(batch.n)]
    ids = (batch.label_ids[0], batch.label_ids[1])
    with torch.no_grad():
        prefix = run_prefix(model, batch.encoded, groups)
        whole, _ = run_groups(model, batch.encoded, groups, ids, prefix=prefix, columns=None)
        part, _ = run_groups(model, batch.encoded, groups, ids, prefix=prefix,
                             columns=label_columns(model.lm.lm_head._module, ids))
    assert part == whole
