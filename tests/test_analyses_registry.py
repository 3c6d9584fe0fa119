"""The Analysis object is the single source of truth: options, commands, the registry and the README's example."""

from __future__ import annotations

import dataclasses
import shutil

import click
import pytest
import xarray as xr
from click.testing import CliRunner

from nnethics.analyses import ANALYSES, BUILTIN, analyses, default_names, file_names
from nnethics.analyses.base import SHARED, OptionError, format_layers, option_fields, parse_layers
from nnethics.cli import cli

# What every analysis command takes besides its own options (model, prompts, store, chunking).
COMMON = {"model_spec", "revision", "device", "device_map", "dtype", "quantize", "remote", "token", "prompts_path",
          "labels", "chat", "limit", "store", "overwrite", "lock_timeout", "batch_size", "progress", "help"}


def _command(analysis) -> click.Command:
    words = (analysis.command or analysis.name).split()
    cmd: click.Command = cli
    for word in words:
        cmd = cmd.commands[word]  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("name", BUILTIN)
def test_each_command_option_is_exactly_one_options_field(name):
    analysis = ANALYSES[name]
    params = {p.name: p for p in _command(analysis).params}
    fields = {f.name: (f, spec) for f, spec, _ in option_fields(analysis.options)}
    assert set(params) - COMMON == {n for n, (_, spec) in fields.items() if spec.cli}
    api_only = [f.name for f in dataclasses.fields(analysis.options) if f.name not in params or f.name in SHARED]
    assert set(api_only) <= set(SHARED) | {n for n, (_, spec) in fields.items() if not spec.cli}
    for field_name, (f, spec) in fields.items():  # the CLI default is the field's, in the option's text form
        if spec.cli:
            default = params[field_name].default
            want = f.default if spec.parse is None or f.default is None else (
                ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default))
            assert default == want, (name, field_name, default, want)
    assert sorted(analysis.record(analysis.options())) == sorted(fields)  # every option lands in provenance


def test_the_registry_is_what_run_offers():
    assert default_names() == ("decisions", "patching", "attribution", "lens")
    assert file_names()[:2] == ("decisions", "patching") and "patching_noise_grid" in file_names()
    assert [a.name for a in analyses()] == list(BUILTIN)
    res = CliRunner().invoke(cli, ["run", "--analyses", "nosuch"])
    assert res.exit_code == 2 and "Usage: " in res.output
    assert "choose from " + ", ".join(ANALYSES) in " ".join(res.output.split())


def test_option_errors_name_the_flag_before_the_model_loads(monkeypatch):
    import nnethics.commands.common as common

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_model_from_options", no_load)
    res = CliRunner().invoke(cli, ["patch", "--positions", "grid", "--kv-cache", "on", "--limit", "1"])
    assert res.exit_code == 2 and "--kv-cache: 'on' needs positions 'last'" in res.output
    res = CliRunner().invoke(cli, ["attribute", "--layers", "2-1"])
    assert res.exit_code == 2 and "'2-1' is an empty range" in res.output
    with pytest.raises(OptionError, match="^components: 'x' is not one of resid, attn, mlp$"):
        ANALYSES["patching"].options(components=("x",))


def test_one_layer_syntax_round_trips():
    for layers in [(0,), (0, 1, 2, 5, 7, 8), (3, 9, 10, 11)]:
        assert parse_layers(format_layers(layers)) == layers
    assert format_layers([5, 0, 1, 2]) == "0-2,5"


def test_variants_are_options_not_names():
    patching = ANALYSES["patching"]
    assert ANALYSES["patching_noise_grid"] is patching
    opts = patching.make_options("patching_noise_grid", layers=(1,))
    assert (opts.corruption, opts.positions, opts.layers) == ("noise", "grid", (1,))
    assert patching.name_for(opts) == "patching_noise_grid"
    assert patching.name_for(patching.options()) == "patching"


@pytest.fixture
def entropy_analysis():
    """The README's "Add an analysis" example, registered for one test."""
    from plugins import entropy

    from nnethics.analyses import unregister

    analysis = entropy.install()
    try:
        yield analysis
    finally:
        unregister(analysis)
    assert "entropy" not in ANALYSES


def test_a_declaration_that_cannot_run_fails_when_it_is_built():
    from dataclasses import replace

    decisions = ANALYSES["decisions"]
    with pytest.raises(TypeError, match="neither compute nor shares"):
        replace(decisions, name="nothing", shares=None, compute=None)
    with pytest.raises(TypeError, match="resume without prepare"):
        replace(decisions, name="half", resume=lambda prepared, done: None, prepare=None)


def test_a_name_another_analysis_holds_is_refused_and_a_rebuilt_declaration_is_not():
    from dataclasses import dataclass, replace

    from nnethics.analyses import register
    from nnethics.analyses.base import chat_field, labels_field

    @dataclass(frozen=True)
    class OtherOptions:
        labels: tuple[str, ...] = labels_field()
        chat: bool | None = chat_field()

    decisions = ANALYSES["decisions"]
    with pytest.raises(ValueError, match="'decisions' is taken by decisions"):
        register(replace(decisions, options=OtherOptions))
    assert ANALYSES["decisions"] is decisions
    rebuilt = replace(decisions)  # the same declaration built again (its module reloaded)
    try:
        assert register(rebuilt) is rebuilt and ANALYSES["decisions"] is rebuilt
    finally:
        register(decisions)
    assert ANALYSES["decisions"] is decisions


def test_an_added_analysis_package_reaches_every_surface_from_its_declaration(entropy_analysis, tiny_model_dir,
                                                                               tmp_path):
    """The README's walk-through: a package of two files (declaration + figures), registered, is run with its run
    flag, described (CF), reported, compared, exported, given a command and a function of the Python API."""
    import numpy as np

    import nnethics as ne
    from nnethics.commands.analysis import analysis_command
    from nnethics.engine import function

    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--analyses", "decisions,entropy", "--limit",
                                   "3", "--store", str(store), "--no-progress", "--temperature", "2"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    folder = next(store.iterdir())
    ds = xr.load_dataset(folder / "entropy.nc")
    assert ds["entropy"].dims == ("prompt", "side") and ds.sizes["prompt"] == 3
    assert (ds["entropy"] > 0).all() and ds.attrs["analysis"] == "entropy"
    assert '"temperature": 2.0' in ds.attrs["options"]  # the run flag reached the analysis' options
    assert (ds["entropy"].attrs["long_name"], ds["entropy"].attrs["units"]) == (
        "next-token entropy at the decision position", "nats")  # declared by the analysis, written by the store
    assert "entropy:" in res.output and "mean entropy" in res.output  # the summary line
    html = (folder / "report.html").read_text()
    assert "Next-token entropy" in html and "Entropy at the decision position (n=6 prompts)" in html
    res = CliRunner().invoke(cli, ["export", str(folder)])
    assert res.exit_code == 0, res.output
    assert (folder / "export" / "entropy.csv").read_text().startswith("prompt,side,entropy")
    other = tmp_path / "other"
    shutil.copytree(folder, other / folder.name)
    out = tmp_path / "compare.html"
    res = CliRunner().invoke(cli, ["compare", str(folder), str(other / folder.name), "--out", str(out),
                                   "--name", "a", "--name", "b"])
    assert res.exit_code == 0, res.output
    assert "Mean next-token entropy by model" in out.read_text()
    assert "temperature" in {p.name for p in analysis_command(entropy_analysis).params}

    # the declared API function: the same numbers as the stored chunk (the same 3 pairs in one batch), and the
    # temperature matters: softmax(logits / T) has a higher entropy at T = 2 than at T = 1
    model = ne.load_model(str(tiny_model_dir))
    pairs = list(ne.load_prompts("prompts").pairs[:3])
    api = function("next_token_entropy")
    hot = api(model, pairs, entropy_analysis.make_options(temperature=2.0))
    np.testing.assert_array_equal(hot["entropy"].values, ds["entropy"].values)
    cold = api(model, pairs)
    assert (hot["entropy"] > cold["entropy"]).all()


def test_a_run_flag_is_offered_once_and_only_for_a_field(entropy_analysis):
    from nnethics.commands.analysis import flag_overrides, run_flags

    assert flag_overrides({"temperature": None, "atp": None}) is None
    assert flag_overrides({"temperature": 2.0, "atp": True}) == {"entropy": {"temperature": 2.0},
                                                                 "patching": {"atp": True}}
    twice = dataclasses.replace(entropy_analysis, name="entropy2", run_flags=("temperature",))
    ANALYSES["entropy2"] = twice
    try:
        with pytest.raises(TypeError, match="offered by 'entropy' already"):
            run_flags(lambda: None)
    finally:
        del ANALYSES["entropy2"]
    ANALYSES["entropy2"] = dataclasses.replace(entropy_analysis, name="entropy2", run_flags=("nothing",))
    try:
        with pytest.raises(TypeError, match="not one of its Options fields"):
            run_flags(lambda: None)
    finally:
        del ANALYSES["entropy2"]


def test_a_hook_that_cannot_take_the_engines_arguments_fails_when_declared():
    decisions = ANALYSES["decisions"]
    with pytest.raises(TypeError, match="summarize cannot be called with the 1 positional"):
        dataclasses.replace(decisions, summarize=lambda: "")
    with pytest.raises(TypeError, match="tables cannot be called with the 3 positional"):
        dataclasses.replace(decisions, tables=lambda ds, data: {})
    with pytest.raises(TypeError, match="check is not callable"):
        dataclasses.replace(decisions, check="no")
    # the engine's own calls fit: keywords beyond the positional ones, and *args, are fine
    dataclasses.replace(decisions, summarize=lambda ds, extra=None: "", tables=lambda *a: {})


def test_a_variable_declared_twice_must_mean_the_same():
    from nnethics.store.variables import VARIABLES, declare

    declare({"logit_diff": VARIABLES["logit_diff"]}, "same")  # the same meaning again: fine
    with pytest.raises(ValueError, match="'logit_diff' is declared already"):
        declare({"logit_diff": ("something else", "logit")}, "other")
    with pytest.raises(ValueError, match="units 'bits'"):
        declare({"fresh_variable": ("a new one", "bits")}, "other")
    assert "fresh_variable" not in VARIABLES


def test_an_unknown_api_function_is_an_attribute_error():
    import nnethics.engine as engine

    assert engine.activation_patching is engine.activation_patching  # one object per declaration
    assert engine.causal_tracing.__name__ == "causal_tracing"
    with pytest.raises(AttributeError, match="no attribute 'not_a_function'"):
        engine.not_a_function  # noqa: B018


def test_the_render_package_gives_each_analysis_figures_module_by_its_name():
    """``from nnethics.render import lens`` (what notebooks written before the packages import) is the lens
    analysis' own figures module, found through the registry; a name no analysis has is an AttributeError."""
    import nnethics.render as render
    from nnethics.analyses.decisions import figures as decisions_figures
    from nnethics.render import lens

    assert lens.__name__ == "nnethics.analyses.lens.figures" and render.decisions is decisions_figures
    with pytest.raises(AttributeError, match="no attribute 'patching_grid'"):
        render.patching_grid  # noqa: B018  (a variant's file, not an analysis)
