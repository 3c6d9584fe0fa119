"""Shared fixtures: tiny random models of every supported family, and the built-in model.

Tiny models use the built-in model's real tokenizer (SmolLM2, with its chat template) so prompt
formatting and label resolution are exercised as in real runs; their weights are random and seeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Keep test runs off the user's real config and cache locations unless CI already set them.
os.environ.setdefault("NNETHICS_CONFIG", str(ROOT / "tests" / "data" / "no-models.json"))
# The tests never use the hub; offline mode makes hub look-ups fail at once instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

from nnethics.prompts import PromptPair  # noqa: E402

PROMPTS = ROOT / "prompts"
# CI (.ci/run) sets this: a test skipped for a missing browser, driver, package or model fails instead,
# so a green run means every test ran.
REQUIRE_ALL = os.environ.get("NNETHICS_REQUIRE_ALL", "") == "1"


def _skip_fails(rep) -> None:
    if REQUIRE_ALL and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, and NNETHICS_REQUIRE_ALL=1 makes skips failures: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (``pytest.importorskip``)."""
    outcome = yield
    _skip_fails(outcome.get_result())



def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(family: str, vocab: int):
    """A small random config per family (3 layers, d=64, 4 heads)."""
    c = _common(vocab)
    if family == "llama":
        return T.LlamaConfig(**c)
    if family == "mistral":
        return T.MistralConfig(**c)
    if family == "qwen2":
        return T.Qwen2Config(**c)
    if family == "gemma2":
        return T.Gemma2Config(**c, head_dim=16, final_logit_softcapping=5.0)
    if family == "gemma3":
        return T.Gemma3TextConfig(**c, head_dim=16)
    if family == "phi3":
        return T.Phi3Config(**c, pad_token_id=0)
    if family == "mixtral":
        return T.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=0)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "mixtral", "gpt2", "gpt_neox")


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    """Folder of the de-quantized built-in model (created once per machine)."""
    from nnethics.models.builtin import ensure_cached

    return ensure_cached()


@pytest.fixture(scope="session")
def tokenizer(builtin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


def make_tiny(family: str, tokenizer, seed: int = 0, init_std: float | None = None):
    """A tiny random nnsight-wrapped model of ``family`` (float32, eval mode); ``init_std`` overrides
    the config's weight init std."""
    from nnethics.models import wrap_model

    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer))
    if init_std is not None:
        cfg.initializer_range = init_std
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves norm gains at 1 and biases at 0; perturb them so norm handling is really tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return wrap_model(hf, tokenizer, name=f"tiny-{family}")


# Short plain-text pairs (no chat template) of different token lengths, so batches are left-padded and tests
# stay fast; tests use the shipped chat-formatted prompts (90-105 tokens) where they say so.
SHORT_PAIRS = [
    PromptPair("s1", "A friend asks for help moving.\nOption 1: Help.\nOption 2: Refuse.\nAnswer:",
               "A friend asks for help moving.\nOption 1: Refuse.\nOption 2: Help.\nAnswer:", "1", "2"),
    PromptPair("s2", "You find a wallet full of cash on the street.\nOption 1: Keep the money.\n"
               "Option 2: Return it to its owner.\nWhich is more ethical?\nAnswer:",
               "You find a wallet full of cash on the street.\nOption 1: Return it to its owner.\n"
               "Option 2: Keep the money.\nWhich is more ethical?\nAnswer:", "2", "1"),
    PromptPair("s3", "Lie?\nOption 1: Yes.\nOption 2: No.\nAnswer:", "Lie?\nOption 1: No.\nOption 2: Yes.\nAnswer:",
               "2", "1"),
]

STRONG_STD = 0.2  # weight init std of the "strong" tiny models


@pytest.fixture(scope="module")
def strong_models(tokenizer):
    """Tiny models with weights drawn at std 0.2 instead of conftest's 0.02: at 0.02 a patch or a head moves the
    LD by 1e-4 to 1e-3 and every layer's distribution is nearly uniform (KLs of 1e-2), too little for a 1e-4
    comparison (or a reversed KL, a wrong normaliser) to show; at 0.2 a patch moves the LD by 0.1-3 and the
    layers disagree by nats."""
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny(family, tokenizer, init_std=STRONG_STD)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny(family, tokenizer)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def builtin_model(builtin_dir):
    from nnethics.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def prompt_set():
    from nnethics.prompts import load_prompts

    return load_prompts(PROMPTS)


def save_tiny(model, tokenizer, folder: Path) -> Path:
    """Save a tiny model (a handle from :func:`make_tiny`) and its tokenizer as a model folder the CLI loads by path."""
    model.lm._module.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a local model folder, so the CLI can load it by path."""
    return save_tiny(make_tiny("llama", tokenizer, seed=1), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tokenizer, tmp_path_factory):
    """A tiny random GPT-2 saved as a local model folder (the remote tests serve it as ``org/tiny-gpt2``)."""
    return save_tiny(make_tiny("gpt2", tokenizer, seed=2), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def real_ndif(tmp_path_factory, builtin_dir):
    """The real NDIF server (``make test-ndif``), started once per test run with the built-in model deployed; the
    tests deploy their tiny models on it as they need them (:meth:`ndif_real.RealNdif.serve`)."""
    import ndif_real

    from nnethics.models.builtin import BUILTIN_HUB_ID

    if not ndif_real.wanted():
        pytest.skip(f"the real NDIF server runs under make test-ndif ({ndif_real.ENV}=real)")
    server = ndif_real.RealNdif(tmp_path_factory.mktemp("ndif-real"))
    try:
        server.start({BUILTIN_HUB_ID: builtin_dir})
        print(f"\nNDIF stack: started in {server.stack.startup_s:.0f} s, built-in deployed in "
              f"{sum(server.deploy_s.values()):.0f} s")
        yield server
    finally:
        started = time.monotonic()
        left = server.stop()
        print(f"\nNDIF stack: stopped in {time.monotonic() - started:.0f} s")
        assert not left, f"the NDIF stack left behind: {left}"


def bytecode_fallbacks(monkeypatch) -> list[str]:
    """Record every function pickled as bytecode (cloudpickle's reducer, which nnsight's pickler falls back to when a
    function has no source): ``module.qualname`` in order. Bytecode belongs to one Python (see
    :mod:`nnethics.models.remote.portable`)."""
    import cloudpickle

    seen: list[str] = []
    original = cloudpickle.CloudPickler._dynamic_function_reduce

    def record(self, func):
        seen.append(f"{func.__module__}.{func.__qualname__}")
        return original(self, func)

    monkeypatch.setattr(cloudpickle.CloudPickler, "_dynamic_function_reduce", record)
    return seen


@pytest.fixture()
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model (bad input must stop before it)."""
    import nnethics.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(nnethics.models, "load_model", refuse)


def error_line(res) -> str:
    """The one line a command printed for a bad input (click prints 'Error: ...' last), after exit code 2 and no
    traceback."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.output.strip().splitlines()[-1]


def sweep_matches_reference(datasets, hf, toks, ids, components, atol: float = 1e-4) -> None:
    """Each patching Dataset (last position, with AtP) equals the plain-hook reference (``tests/reference``) pair by
    pair: the base and counterfactual LDs, every patched cell and every AtP estimate, within ``atol``."""
    import numpy as np
    from reference import patching as ref

    def close(actual, expected):
        np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                   rtol=0, atol=atol)

    for i, (b, c) in enumerate(toks):
        sweep = ref.patch_sweep(hf, b, c, ids, components)
        atp = ref.attribution_patching(hf, b, c, ids, components=components)
        for ds in datasets:
            close(ds["base_logit_diff"][i], ref.logit_diff(hf, b, ids))
            close(ds["cf_logit_diff"][i], ref.logit_diff(hf, c, ids))
            for j, comp in enumerate(components):
                close(ds["patched_logit_diff"].values[i, :, j], sweep[comp])
                close(ds["atp_delta"].values[i, :, j], atp[comp])
