"""Self-describing files (CF conventions): every variable and coordinate of every file has ``long_name`` and
``units``, every file says ``Conventions``; a variable missing from the declared table fails here. The files are
every name the registry holds (each analysis and each variant, heads and cloze included), read from the registry,
so an analysis added to it is checked without a line here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import save_tiny

from nnethics.analyses import ANALYSES
from nnethics.cli import cli
from nnethics.store import load, write_atomic
from nnethics.store.variables import CONVENTIONS, VARIABLES, describe, undocumented

NAMES = tuple(ANALYSES)  # every analysis and variant registered (at import: no test's plug-in among them)
DEFAULT = ("decisions", "patching", "attribution", "lens")
COMMANDS = [
    ["run", "--limit", "2", "--analyses", ",".join(DEFAULT)],  # 2 pairs: the cross-pair statistics defined
    ["run", "--limit", "1", "--analyses", ",".join(n for n in NAMES if n not in (*DEFAULT, "steer"))],
    ["steer", "--limit", "4", "--folds", "2", "--null-seeds", "2", "--alphas", "-1,1"],  # folds need 2+ pairs each
]


def _offenders(ds: xr.Dataset) -> list[str]:
    return [f"{n}: {dict(v.attrs)}" for n, v in ds.variables.items()
            if not str(v.attrs.get("long_name", "")).strip() or "units" not in v.attrs]


def _check_files(store: Path) -> list[Path]:
    files = sorted(store.glob("*/*.nc"))
    for path in files:
        with xr.open_dataset(path) as raw:  # what a notebook sees, not what store.load adds
            assert undocumented(raw) == [], f"{path.name}: add these to nnethics/store/variables.py VARIABLES"
            assert _offenders(raw) == [], f"{path.name} has variables without long_name/units"
            assert raw.attrs["Conventions"] == CONVENTIONS
    return files


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> Path:
    store = tmp_path_factory.mktemp("cf")
    runner = CliRunner()
    for args in COMMANDS:
        res = runner.invoke(cli, [*args, "--model", str(tiny_model_dir), "--store", str(store), "--no-progress"],
                            catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return store


def test_every_variable_of_every_file_has_long_name_and_units(store):
    names = {p.stem for p in _check_files(store)}
    assert names == set(NAMES), names  # every registered analysis and variant wrote its file
    assert {"heads", "cloze", "patching_grid", "patching_noise_all"} <= names  # (the registry is not empty)


def test_moe_experts_and_heads_are_described(tmp_path, tiny_models, tokenizer):
    folder = save_tiny(tiny_models("mixtral"), tokenizer, tmp_path / "mixtral")
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--analyses", "attribution", "--limit", "1",
                                   "--store", str(tmp_path / "store"), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [path] = _check_files(tmp_path / "store")
    with xr.open_dataset(path) as ds:
        assert "expert_contribution" in ds and "head_contribution" in ds


def test_decoded_token_text_beside_ids(store):
    ds = load(next(store.glob("*/decisions.nc")))
    ids, text = ds["input_ids"].values, ds["token_text"].values
    assert ids.shape == text.shape
    assert ((ids < 0) == (text == "")).all()
    assert "".join(text[0, 0]) != ""


def test_units_follow_the_rule(store):
    ds = load(next(store.glob("*/decisions.nc")))
    assert ds["logit_diff"].attrs["units"] == "logit"
    assert ds["label_prob"].attrs["units"] == "1"
    assert ds["prompt"].attrs["units"] == "1"
    assert ds["logit_diff"].attrs["description"]  # kept beside long_name
    lens = load(next(store.glob("*/lens.nc")))
    assert lens["kl_to_final"].attrs["units"] == "nats"
    assert {u for _, u in VARIABLES.values()} == {"logit", "nats", "1"}


def test_lens_eval_variables_and_raw_effects_are_declared():
    ds = xr.Dataset({"kl": (("lens", "layer"), np.zeros((2, 3))), "top1_agreement": (("lens", "layer"), np.zeros((2, 3))),
                     "effect": (("prompt",), np.zeros(1), {"effect_kind": "raw"}), "mean_effect": (("x",), np.zeros(1))},
                    coords={"lens": ["logit", "tuned"], "layer": [0, 1, 2], "prompt": ["p"]})
    assert undocumented(ds) == []  # dims without a coordinate (x, token) are no variables
    out = describe(ds)
    assert out["kl"].attrs["units"] == "nats" and out["effect"].attrs["units"] == "logit"
    assert out["mean_effect"].attrs["units"] == "logit"
    assert ds["kl"].attrs == {}  # a copy: the input is not changed


def test_an_undeclared_variable_is_reported(tmp_path):
    path = write_atomic(xr.Dataset({"mystery": (("prompt",), np.zeros(1))}, coords={"prompt": ["p"]}), tmp_path / "x.nc")
    with xr.open_dataset(path) as ds:
        assert undocumented(ds) == ["mystery"]
        assert _offenders(ds) == ["mystery: {}"]


def test_builtin_weights_record_their_gguf_quantization_without_changing_slug_or_fingerprint():
    from nnethics.models.handle import ModelHandle
    from nnethics.store import fingerprint

    h = ModelHandle(lm=None, tokenizer=None, adapter=None, name="HuggingFaceTB/SmolLM2-135M-Instruct",
                    source="builtin:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert h.weights_quantization == "gguf-q4_1 (dequantized to float32)"
    assert h.slug == "smollm2-135m-instruct"
    attrs = {"model_id": h.name, "quantization": h.weights_quantization}
    assert fingerprint(attrs) == fingerprint({**attrs, "quantization": ""})  # stores written before stay reusable
    assert fingerprint({**attrs, "quantization": "4bit"}) != fingerprint(attrs)
