"""ONE shared trace per chunk (nnethics.engine.trace): the fused run gives every analysis the bits of its own run,
one chunk is one session (one request remotely), a plug-in that declares nothing still runs, and a resumed run
computes only what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import nnethics as ne
from nnethics.analyses import prefix_cache, unregister
from nnethics.analyses.patching import PatchingOptions
from nnethics.engine import Run, make_context, pairs_as_set, run_all
from nnethics.engine import trace as fused
from nnethics.models.handle import ModelHandle
from nnethics.store import result_path

BUILTIN = ("decisions", "patching", "attribution", "lens")


def _bits_equal(a: xr.Dataset, b: xr.Dataset) -> list[str]:
    """The variables and coordinates that differ (NaN equal to NaN, floats to the last bit)."""
    bad = []
    for name in sorted(set(a.variables) | set(b.variables)):
        if name not in a.variables or name not in b.variables:
            bad.append(name)
            continue
        x, y = a[name].values, b[name].values
        if x.dtype.kind in "fc":
            same = x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
        else:
            same = np.array_equal(x.astype(str), y.astype(str))
        if not same or a[name].dims != b[name].dims:
            bad.append(name)
    return bad


def _pairs(prompt_set, n=2):
    return list(prompt_set.pairs[:n])


def _check_fused_equals_separate(model, pairs, **options):
    together = ne.analyze(model, pairs, BUILTIN, **options)
    for name in BUILTIN:
        alone = ne.analyze(model, pairs, [name], **{k: v for k, v in options.items() if k == name})[name]
        assert _bits_equal(together[name], alone) == [], name


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral", "gpt2", "gpt_neox", "phi3"])
def test_fused_equals_separate_runs_to_the_last_bit_tiny(tiny_models, prompt_set, family):
    _check_fused_equals_separate(tiny_models(family), _pairs(prompt_set), patching=PatchingOptions(atp=True))


def test_fused_equals_separate_runs_to_the_last_bit_builtin(builtin_model, prompt_set):
    _check_fused_equals_separate(builtin_model, _pairs(prompt_set))


def test_the_shared_prefix_cache_gives_the_bits_of_a_prefix_forward(tiny_models, prompt_set, monkeypatch):
    """Patching's one-token rows over the shared trace's cache cut to the prefix == over a prefix-only forward."""
    model, pairs = tiny_models("llama"), _pairs(prompt_set)
    opts = PatchingOptions(atp=True, layers=(0, 2))
    shared = ne.analyze(model, pairs, ["patching"], patching=opts)["patching"]
    monkeypatch.setattr(prefix_cache, "cut_prefix", lambda cache: False)  # its own prefix forward, as before fusion
    own = ne.analyze(model, pairs, ["patching"], patching=opts)["patching"]
    assert (own["forward_path"] == "kv_cache").all()
    assert _bits_equal(shared, own) == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_heads_beside_patching_reads_the_one_prefix_and_keeps_its_bits(tiny_models, prompt_set, monkeypatch, family):
    """Heads' KV path reads the shared trace's prefix cache: beside patching the prefix runs once (no prefix forward
    of heads' own), one session per chunk, and every file has the bits of its analysis alone, whose prefix came
    from a prefix forward of its own before (cut_prefix refused: the same bits). A model whose cache has
    sliding-window layers (Mistral) cannot cut it: heads runs its own prefix there, as before."""
    from nnethics.analyses.heads import HeadsOptions
    from nnethics.analyses.heads import engine as heads_engine

    model, pairs = tiny_models(family), _pairs(prompt_set, 3)
    opts = {"patching": PatchingOptions(layers=(0, 2)), "heads": HeadsOptions(top_heads=2)}
    prefixes, sessions = [], []
    real_prefix, real_session = heads_engine.run_prefix, ModelHandle.session
    monkeypatch.setattr(heads_engine, "run_prefix", lambda *a: prefixes.append(1) or real_prefix(*a))
    monkeypatch.setattr(ModelHandle, "session", lambda self, fn, *a: sessions.append(fn.__name__) or
                        real_session(self, fn, *a))
    together = ne.analyze(model, pairs, ["patching", "heads"], batch_size=2, **opts)
    own_prefix = family == "mistral"
    assert len(prefixes) == (2 if own_prefix else 0)  # 2 chunks
    chunk_sessions = [f for f in sessions if f in ("_session", "execute")]  # the complete pass' are others
    assert sorted(chunk_sessions) == ["_session"] * 2 + (["execute"] * 2 if own_prefix else [])
    assert (together["heads"]["forward_path"] == "kv_cache").all() or own_prefix
    prefixes.clear()
    monkeypatch.setattr(prefix_cache, "cut_prefix", lambda cache: False)  # a prefix forward of heads' own
    for name in opts:
        alone = ne.analyze(model, pairs, [name], batch_size=2, **{name: opts[name]})[name]
        assert _bits_equal(together[name], alone) == [], name
    assert len(prefixes) == 2


def test_one_chunk_is_one_session_with_one_shared_trace(tiny_models, prompt_set, monkeypatch):
    model, pairs = tiny_models("llama"), _pairs(prompt_set, 3)
    sessions, invokes = [], []
    real_session, real_run = ModelHandle.session, fused._session

    def spy_session(self, fn, *args):
        sessions.append(fn.__name__)
        return real_session(self, fn, *args)

    def spy_run(m, rows, reads, jobs):
        invokes.append(len(reads))
        return real_run(m, rows, reads, jobs)

    monkeypatch.setattr(ModelHandle, "session", spy_session)
    monkeypatch.setattr(fused, "_session", spy_run)
    ne.analyze(model, pairs, BUILTIN, batch_size=2)
    assert sessions == ["spy_run", "spy_run"]  # 2 chunks, one session each, nothing else
    assert invokes == [4, 4]


def test_a_plugin_without_declarations_runs_in_a_fused_run(tiny_models, prompt_set):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from plugins import entropy

    analysis = entropy.install()
    try:
        assert analysis.shares is None
        model, pairs = tiny_models("llama"), _pairs(prompt_set)
        out = ne.analyze(model, pairs, ["decisions", "entropy", "lens"])
        alone = ne.analyze(model, pairs, ["entropy"])["entropy"]
        assert _bits_equal(out["entropy"], alone) == []
        assert (out["entropy"]["entropy"] > 0).all()
    finally:
        unregister(analysis)


def test_a_resumed_run_computes_only_what_is_missing(tiny_models, prompt_set, tmp_path, monkeypatch):
    model = tiny_models("llama")
    prompts = pairs_as_set(list(prompt_set.pairs[:4]), prompt_set.labels)
    fresh = run_all(model, prompts, str(tmp_path / "fresh"), BUILTIN, batch_size=2, progress=False)
    store = str(tmp_path / "resumed")
    ctx = make_context(model, prompts)
    with Run(model, store, batch_size=2, progress=False) as run:
        run.one("decisions", prompts, ctx)  # one analysis complete
    calls: list[tuple[tuple[str, ...], int]] = []
    real = fused.run_chunks  # what the stored run calls: the chunks of one request (one at a time here)

    def spy(m, chunks, members, label_ids=None):
        calls.append((tuple(x.name for x in members), sum(len(c) for c in chunks)))
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash after the first chunk's parts are written
        return real(m, chunks, members, label_ids)

    monkeypatch.setattr(fused, "run_chunks", spy)
    with pytest.raises(KeyboardInterrupt):
        run_all(model, prompts, store, BUILTIN, batch_size=2, progress=False)
    assert calls == [(("patching", "attribution", "lens"), 2)] * 2
    calls.clear()
    monkeypatch.setattr(fused, "run_chunks", lambda *a: (calls.append((tuple(x.name for x in a[2]),
                                                                       sum(len(c) for c in a[1]))), real(*a))[1])
    run_all(model, prompts, store, BUILTIN, batch_size=2, progress=False)
    assert calls == [(("patching", "attribution", "lens"), 2)]  # only the second chunk, decisions not at all
    for name in BUILTIN:
        a, b = xr.load_dataset(fresh[name][0]), xr.load_dataset(result_path(store, model.slug, name))
        assert _bits_equal(a, b) == [], name


def test_atp_runs_on_the_last_position_only_when_asked(tiny_models, prompt_set):
    model, pairs = tiny_models("llama"), _pairs(prompt_set)
    default = ne.analyze(model, pairs, ["patching"])["patching"]
    asked = ne.analyze(model, pairs, ["patching"], patching=PatchingOptions(atp=True))["patching"]
    grid = ne.analyze(model, pairs, ["patching_grid"], patching_grid=PatchingOptions(layers=(0,)))["patching_grid"]
    assert "atp_delta" not in default and "atp_delta" in asked and "atp_delta" in grid
    assert _bits_equal(default, asked.drop_vars([v for v in asked.variables if v not in default.variables])) == []


def test_the_benchmark_builds_its_random_model_and_long_pairs(prompt_set):
    """scripts/bench_run.py's CUDA path, on a tiny shape on the CPU; its 8B shape has about 8e9 parameters."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_run

    s = bench_run.SHAPE_8B
    d, f, L, kv = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * (d // s["num_attention_heads"] * kv) + 3 * d * f
    assert 7.9e9 < L * per_layer + 2 * s["vocab_size"] * d < 8.1e9
    model = bench_run.random_model(bench_run.SHAPE_TINY, torch.float32, "cpu")
    assert (model.n_layers, model.d_model) == (3, 64)
    pairs = bench_run.long_pairs(str(Path(__file__).resolve().parents[1] / "prompts"), 5, "Some context.")
    assert len({p.prompt_id for p in pairs}) == 5 and pairs[0].base.startswith("Some context. ")
    out = ne.analyze(model, pairs[:2], ["decisions", "lens"])
    assert out["decisions"].sizes["prompt"] == 2
