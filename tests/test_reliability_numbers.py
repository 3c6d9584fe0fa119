"""Reliability: numbers that are not numbers. Every numeric option and environment variable refuses NaN, ±inf and
out-of-range values by one rule (:mod:`nnethics.numbers`, the click type ``FiniteFloat``, ``check_values``), with
exit code 2 and one line naming the option or variable and the allowed range, before the model loads; options that
only the model bounds (a top-k over the vocabulary, a layer it lacks) right after it loads.
"""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner
from conftest import error_line as _error_line

from nnethics.analyses import analyses
from nnethics.analyses.base import OptionError, option_fields
from nnethics.cli import cli
from nnethics.commands.common import FiniteFloat
from nnethics.models.remote.settings import RetryPolicy
from nnethics.numbers import NumberError, bounded


def _invalid(flag: str, text: str) -> str:
    return f"Error: Invalid value for '{flag}': {text}"


# --- options: (arguments, the line it prints) -------------------------------------------------------

OPTION_CASES = [
    (["decisions", "--min-gap", "nan"], _invalid("--min-gap", "'nan' is not a finite number; give a number x>=0")),
    (["decisions", "--min-gap", "-0.5"], _invalid("--min-gap", "-0.5 is not in the range x>=0.")),
    (["patch", "--noise-scale", "nan"], _invalid("--noise-scale", "'nan' is not a finite number; give a number x>=0")),
    (["patch", "--noise-std", "inf"], _invalid("--noise-std", "'inf' is not a finite number; give a number x>=0")),
    (["patch", "--noise-std", "-inf"], _invalid("--noise-std", "'-inf' is not a finite number; give a number x>=0")),
    (["heads", "--min-gap", "NaN"], _invalid("--min-gap", "'NaN' is not a finite number; give a number x>=0")),
    (["patch", "--window", "0"], _invalid("--window", "0 is not in the range x>=1.")),
    (["run", "--batch-size", "0"], _invalid("--batch-size", "0 is not in the range x>=1.")),
    (["lens", "run", "--k", "0"], _invalid("--k", "0 is not in the range x>=1.")),
    (["lens", "train", "--lr", "nan"], _invalid("--lr", "'nan' is not a finite number; give a number x>0")),
    (["lens", "train", "--heldout", "inf"], _invalid("--heldout", "'inf' is not a finite number; give a number 0<x<1")),
    (["lens", "train", "--seed", "-1"], _invalid("--seed", "-1 is not in the range 0<=x<=4294967295.")),
]


@pytest.mark.parametrize("args, line", OPTION_CASES, ids=[" ".join(a) for a, _ in OPTION_CASES])
def test_a_numeric_option_that_is_not_a_finite_number_in_range_exits_2(tmp_path, no_model_load, args, line):
    res = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "store")] if args[:2] != ["lens", "train"] else args)
    assert _error_line(res) == line
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("value, text", [("nan", "'nan' is not a finite number; give a number x>=0"),
                                         ("inf", "'inf' is not a finite number; give a number x>=0"),
                                         ("-1", "-1.0 is not in the range x>=0.")])
def test_lock_timeout_refuses_nan_inf_and_negatives_as_flag_and_variable(tmp_path, no_model_load, monkeypatch, value,
                                                                          text):
    args = ["decisions", "--store", str(tmp_path / "store"), "--limit", "1"]
    res = CliRunner().invoke(cli, [*args, "--lock-timeout", value])
    assert _error_line(res).startswith("Error: Invalid value for '--lock-timeout'")
    assert _error_line(res).endswith(text)
    monkeypatch.setenv("NNETHICS_LOCK_TIMEOUT", value)
    res = CliRunner().invoke(cli, args)
    assert _error_line(res) == f"Error: Invalid value for '--lock-timeout' (env var: 'NNETHICS_LOCK_TIMEOUT'): {text}"


# --- environment variables ------------------------------------------------------------------------

ENV_CASES = [
    ("NNETHICS_NDIF_RETRIES", "-1", "is out of range; it must be a whole number from 0 to 100", "3"),
    ("NNETHICS_NDIF_RETRIES", str(10**6), "is out of range; it must be a whole number from 0 to 100", "3"),
    ("NNETHICS_NDIF_RETRIES", "2.5", "is not a whole number from 0 to 100", "3"),
    ("NNETHICS_NDIF_BACKOFF", "nan", "is not finite; it must be a number of seconds from 0 to 3600", "2"),
    ("NNETHICS_NDIF_BACKOFF", "-5", "is out of range; it must be a number of seconds from 0 to 3600", "2"),
    ("NNETHICS_NDIF_TIMEOUT", "nan", "is not finite; it must be a number of seconds above 0 and at most 86400", "900"),
    ("NNETHICS_NDIF_TIMEOUT", "-inf", "is not finite; it must be a number of seconds above 0 and at most 86400",
     "900"),
    ("NNETHICS_NDIF_TIMEOUT", "0", "is out of range; it must be a number of seconds above 0 and at most 86400", "900"),
    ("NNETHICS_NDIF_TIMEOUT", "soon", "is not a number of seconds above 0 and at most 86400", "900"),
]


@pytest.mark.parametrize("name, value, text, default", ENV_CASES, ids=[f"{n}={v}" for n, v, _, _ in ENV_CASES])
def test_an_ndif_variable_out_of_range_exits_2_before_the_model_loads(tmp_path, no_model_load, monkeypatch, name,
                                                                       value, text, default):
    monkeypatch.setenv(name, value)
    res = CliRunner().invoke(cli, ["run", "--remote", "--limit", "1", "--store", str(tmp_path / "store")])
    assert _error_line(res) == (f"Error: {name}={value!r} {text}; set it in that range or unset it "
                                f"(default {default})")
    assert not (tmp_path / "store").exists()


def test_ndif_variables_in_range_make_the_policy_and_code_gets_the_same_ranges(monkeypatch):
    monkeypatch.setenv("NNETHICS_NDIF_RETRIES", "100")
    monkeypatch.setenv("NNETHICS_NDIF_BACKOFF", "0")
    monkeypatch.setenv("NNETHICS_NDIF_TIMEOUT", "0.5")
    policy = RetryPolicy.from_env()
    assert (policy.retries, policy.backoff, policy.timeout) == (100, 0.0, 0.5)
    assert policy.delay(99) <= policy.backoff_max * 1.1  # no OverflowError at the last attempt
    for bad in ({"retries": -1}, {"retries": 10**6}, {"timeout": math.nan}, {"backoff": -5.0}, {"backoff": math.inf}):
        with pytest.raises(NumberError, match=f"^{next(iter(bad))}="):
            RetryPolicy(**bad)


def test_lock_timeout_variable_is_checked_for_the_api_too(monkeypatch):
    from nnethics.store.lock import default_timeout

    for value in ("nan", "-1", "inf"):
        monkeypatch.setenv("NNETHICS_LOCK_TIMEOUT", value)
        with pytest.raises(NumberError, match=r"^NNETHICS_LOCK_TIMEOUT=.* a number of seconds of at least 0; set it "):
            default_timeout()
    monkeypatch.setenv("NNETHICS_LOCK_TIMEOUT", "2.5")
    assert default_timeout() == 2.5


# --- one rule for every option ----------------------------------------------------------------------

def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_float_option_of_every_command_refuses_nan_and_inf():
    floats = [(path, p.name) for path, cmd in _commands(cli) for p in cmd.params
              if isinstance(p.type, (click.types.FloatParamType, click.FloatRange))]
    assert len(floats) >= 8  # min_gap x3, noise_scale, noise_std, lock_timeout per command, lens train's floats
    wrong = [(path, name) for path, name in floats
             if not isinstance(cli_param_type(path, name), FiniteFloat)]
    assert wrong == [], "use nnethics.commands.common.FiniteFloat: click's FloatRange lets nan through"


def cli_param_type(path, name):
    cmd = cli
    for part in path:
        cmd = cmd.commands[part]
    return next(p.type for p in cmd.params if p.name == name)


def _float_fields():
    for a in analyses():
        for f, spec, tp in option_fields(a.options):
            if "float" in str(tp) and spec.finite:
                yield a, f.name


@pytest.mark.parametrize("analysis, field", list(_float_fields()), ids=lambda x: getattr(x, "name", x))
def test_every_float_field_of_every_options_class_refuses_nan_and_inf(analysis, field):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(OptionError, match=f"^{field}: must be a finite number, got {bad}$"):
            analysis.make_options(**{field: bad})


def test_bounded_words_the_range():
    assert bounded("x", "3", int, 0, 100) == 3
    with pytest.raises(NumberError, match=r"^x='nan' is not finite; it must be a number from 0 to 1$"):
        bounded("x", "nan", float, 0, 1)
    with pytest.raises(NumberError, match=r"^x=True is not a whole number of at least 0$"):
        bounded("x", True, int, 0)


# --- bounded by the model: checked right after it loads ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["lens", "run", "--k", "{over}"], "Error: --k: the model's vocabulary has {vocab} tokens (vocab_size in its "
                                       "config), got {over}; pass --k {vocab} or less"),
    (["patch", "--layers", "0,7"], "Error: --layers: layer 7 does not exist: the model has layers 0-{last}"),
    (["heads", "--top-heads", "100000"], "Error: --top-heads: the model has {heads} heads, got 100000"),
])
def test_an_option_the_model_rules_out_exits_2_after_it_loads_naming_the_limit(tiny_model_dir, tmp_path, args,
                                                                                message):
    import json

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    facts = {"vocab": cfg["vocab_size"], "over": cfg["vocab_size"] + 1, "last": cfg["num_hidden_layers"] - 1,
             "heads": cfg["num_hidden_layers"] * cfg["num_attention_heads"]}
    res = CliRunner().invoke(cli, [*(a.format(**facts) for a in args), "--model", str(tiny_model_dir), "--limit", "1",
                                   "--store", str(tmp_path / "store"), "--no-progress"])
    assert _error_line(res) == message.format(**facts)
    assert not list((tmp_path / "store").rglob("*.nc"))
