"""The Analysis object is the single source of truth: options, commands, the registry and the README's example."""

from __future__ import annotations

import dataclasses

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


def test_an_added_analysis_is_run_reported_and_exported(entropy_analysis, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--analyses", "decisions,entropy", "--limit",
                                   "3", "--store", str(store), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    folder = next(store.iterdir())
    ds = xr.load_dataset(folder / "entropy.nc")
    assert ds["entropy"].dims == ("prompt", "side") and ds.sizes["prompt"] == 3
    assert (ds["entropy"] > 0).all() and ds.attrs["analysis"] == "entropy" and '"base": 2.0' in ds.attrs["options"]
    assert "entropy:" in res.output and "mean entropy" in res.output  # the summary line
    html = (folder / "report.html").read_text()
    assert "Next-token entropy" in html and "Entropy at the decision position (n=6 prompts)" in html
    res = CliRunner().invoke(cli, ["export", str(folder)])
    assert res.exit_code == 0, res.output
    assert (folder / "export" / "entropy.csv").read_text().startswith("prompt,side,entropy")


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
