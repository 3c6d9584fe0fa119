"""CSV/JSON export of a model folder (the original scripts' file layout), on synthetic stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synthetic
import xarray as xr
from click.testing import CliRunner

from nnethics.analyses.attribution.tables import attribution_table
from nnethics.analyses.decisions.tables import decisions_table
from nnethics.analyses.lens.tables import lens_topk_records, trajectory_table
from nnethics.analyses.patching.tables import detailed_layer_data, summary_results
from nnethics.export import ExportError, export_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic.write_store(tmp_path_factory.mktemp("store"), n_prompts=5, n_layers=6)


MEANS: list[str] = []  # filled by the fixture below from the synthetic store's files


@pytest.fixture(scope="module", autouse=True)
def _means(store):
    MEANS[:] = [p.stem for p in sorted(store.glob("*.nc"))
                if p.stem.startswith("patching") and any("prompt" not in v.dims and "layer" in v.dims
                                                         for v in xr.load_dataset(p).data_vars.values())]


def test_detailed_layer_data_is_one_row_per_prompt_layer_component():
    ds = synthetic.patching(n_prompts=4, n_layers=6)
    df = detailed_layer_data(ds)
    assert len(df) == 4 * 6 * 3
    assert list(df.columns[:4]) == ["prompt_id", "layer", "component", "effect"]  # the NetCDF's name
    row = df[(df.prompt_id == "case_002") & (df.layer == 4) & (df.component == "mlp")].iloc[0]
    assert row.effect == pytest.approx(float(ds["effect"].sel(prompt="case_002", layer=4, component="mlp")))
    assert row.atp_effect == pytest.approx(float(ds["atp_effect"].sel(prompt="case_002", layer=4, component="mlp")))
    assert row.base_logit_diff == pytest.approx(float(ds["base_logit_diff"].sel(prompt="case_002")))
    assert df["flipped"].dtype == bool


def test_summary_results_has_the_seed_columns_and_thirds():
    ds = synthetic.patching(n_prompts=4, n_layers=6)
    dec = synthetic.decisions(n_prompts=4)
    df = summary_results(ds, dec)
    assert list(df.columns[:6]) == ["prompt_id", "peak_layer", "num_choice_flips", "gini_coefficient",
                                    "top5_concentration", "chose_ethical_base"]
    resid = ds["effect"].sel(component="resid")
    assert df.early_mean.tolist() == pytest.approx(resid.isel(layer=[0, 1]).mean("layer").values.tolist(), nan_ok=True)
    assert df.late_mean.tolist() == pytest.approx(resid.isel(layer=[4, 5]).mean("layer").values.tolist(), nan_ok=True)
    assert np.isnan(df.late_mean.iloc[-1])  # the effect is undefined for the last synthetic prompt
    assert df.category.tolist() == dec["category"].values.tolist()
    # per-component summaries get one column per component, and the plain name holds resid
    assert df.peak_layer.tolist() == ds["peak_layer"].sel(component="resid").values.tolist()
    assert df.peak_layer_mlp.tolist() == ds["peak_layer"].sel(component="mlp").values.tolist()
    legacy = summary_results(synthetic.patching(n_prompts=4, n_layers=6, legacy=True))
    assert "peak_layer_mlp" not in legacy and legacy.gini_coefficient.notna().all()


def test_attribution_table_names_columns_after_the_labels():
    ds = synthetic.attribution(n_prompts=3, n_layers=4)
    df = attribution_table(ds)
    assert len(df) == 3 * 2 * 4
    for col in ("attn_to_1", "mlp_to_1", "total_to_1", "attn_to_2", "attn_mlp_ratio", "total_diff"):
        assert col in df
    np.testing.assert_allclose(df.total_to_1, df.attn_to_1 + df.mlp_to_1, rtol=1e-5)
    np.testing.assert_allclose(df.total_diff, df.total_to_1 - df.total_to_2, rtol=1e-4, atol=1e-5)
    relabeled = synthetic.attribution(n_prompts=2, n_layers=3, labels=("A", "B"))
    assert "attn_to_B" in attribution_table(relabeled)


def test_lens_records_and_trajectories():
    ds = synthetic.lens(n_prompts=2, n_layers=4, k=3)
    recs = lens_topk_records(ds)
    assert len(recs) == 2 * 2 * 2 * 4
    r = next(x for x in recs if x["prompt_id"] == "case_001" and x["side"] == "cf" and x["lens"] == "tuned"
             and x["layer"] == 2)
    sel = ds.sel(prompt="case_001", side="cf", lens="tuned", layer=2)
    assert r["top_tokens"] == sel["top_token"].values.tolist()
    assert r["top_probs"] == pytest.approx(sel["top_prob"].values.tolist())
    df = trajectory_table(ds)
    assert len(df) == 2 * 2 * 2 * 4
    np.testing.assert_allclose(df.logit_diff, df.logit_1 - df.logit_2, rtol=1e-5, atol=1e-6)
    row = df[(df.prompt_id == "case_000") & (df.side == "base") & (df.lens == "logit")]
    assert set(row.crossing_layer) == {int(ds["crossing_layer"].sel(prompt="case_000", side="base", lens="logit"))}


def test_trajectories_of_a_version_1_lens_file_with_option_logit_are_the_same():
    ds = synthetic.lens(n_prompts=2, n_layers=4, k=3)
    v1 = ds.rename(label_logit="option_logit", label_prob="option_prob")
    del v1.attrs["schema_version"]
    pd.testing.assert_frame_equal(trajectory_table(v1), trajectory_table(ds))


def test_export_store_csv_and_json(store, tmp_path):
    paths = export_store(store, "csv", tmp_path / "csv")
    names = sorted(p.name for p in paths)
    assert names == sorted(["decisions.csv", "verdict_pairs.csv", "verdict_groups.csv", "detailed_layer_data.csv",
                            "summary_results.csv", "patching_grid.csv", "patching_noise.csv", "patching_noise_grid.csv",
                            "attribution.csv", "attribution_heads.csv", "token_trajectories.csv",
                            "logit_lens_topk.json", "tuned_lens_topk.json", "metadata.json"]
                           + [f"{n}_means.csv" for n in MEANS])
    pairs = pd.read_csv(tmp_path / "csv" / "verdict_pairs.csv")
    dec = xr.load_dataset(store / "decisions.nc")
    assert pairs.prompt_id.tolist() == [str(p) for p in dec["prompt"].values]
    np.testing.assert_allclose(pairs.ethical_preference, dec["ethical_preference"].values, rtol=1e-6)
    np.testing.assert_allclose(pairs.logit_diff_cf - pairs.logit_diff_base, pairs.content_gap, rtol=1e-5, atol=1e-6)
    groups = pd.read_csv(tmp_path / "csv" / "verdict_groups.csv")
    assert groups.group.tolist() == [str(g) for g in dec["group"].values]
    for col in ("n_pairs", "mean_ethical_preference", "ethical_preference_ci_low", "share_content_sensitive",
                "content_sensitive_ci_high", "sign_test_p"):
        np.testing.assert_allclose(groups[col], dec[col].values.astype(float), rtol=1e-9)
    noise = pd.read_csv(tmp_path / "csv" / "patching_noise.csv")
    assert "corrupted_logit_diff" in noise and "position" not in noise
    assert "position" in pd.read_csv(tmp_path / "csv" / "patching_noise_grid.csv")
    summary = pd.read_csv(tmp_path / "csv" / "summary_results.csv")
    assert len(summary) == 5 and summary.prompt_id.tolist()[0] == "case_000"
    tokens = json.loads((tmp_path / "csv" / "tuned_lens_topk.json").read_text(encoding="utf-8"))
    assert any("🙂" in r["top_tokens"] or "line\nbreak" in r["top_tokens"] for r in tokens)
    paths = export_store(store, "json", tmp_path / "json")
    assert all(p.suffix == ".json" for p in paths)
    records = json.loads((tmp_path / "json" / "detailed_layer_data.json").read_text())
    assert len(records) == 5 * 6 * 3 and isinstance(records[0]["flipped"], bool)
    with pytest.raises(ExportError):
        export_store(store, "xlsx")
    with pytest.raises(ExportError):
        export_store(tmp_path / "csv")  # a folder without .nc files


def test_export_cli(store, tmp_path):
    from nnethics.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["export", str(store), "--format", "JSON", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 14 + len(MEANS) and all("(" in ln for ln in lines)
    assert (tmp_path / "e" / "attribution.json").exists()
    res = runner.invoke(cli, ["export", str(tmp_path / "e")])
    assert res.exit_code == 2 and "no result files" in res.stderr


REGRESSION = Path(__file__).parent / "data" / "regression" / "smollm2-135m-instruct"


def test_no_table_repeats_a_constant_column(tmp_path):
    """On a real store (the regression one: one lens, a grid on the resid component only, means over prompts):
    a row dim of length one and every variable without the prompt dim stay out of the per-prompt tables; the
    length-one dims are in metadata.json, the means in their own ``*_means`` table."""
    paths = export_store(REGRESSION, "csv", tmp_path)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    for p in paths:
        if p.suffix != ".csv" or "prompt_id" not in (df := pd.read_csv(p)):
            continue
        source = xr.load_dataset(REGRESSION / meta["tables"][p.name]["source"])
        unit = [d for d, n in source.sizes.items() if n == 1 and d != "prompt"]
        not_per_prompt = [n for n, v in source.data_vars.items() if "prompt" not in v.dims]
        assert not set(df.columns) & set(unit + not_per_prompt), (p.name, set(df.columns) & set(unit + not_per_prompt))
        for d in unit:
            if d in df.columns or any(d in v.dims for v in source.data_vars.values() if "prompt" in v.dims):
                assert meta["tables"][p.name]["constants"].get(d, "?") != "?" or d not in df.columns
    grid = xr.load_dataset(REGRESSION / "patching_grid.nc")
    assert meta["tables"]["patching_grid.csv"]["constants"] == {"component": str(grid["component"].values[0])}
    means = pd.read_csv(tmp_path / "patching_grid_means.csv")
    assert len(means) == grid["mean_effect"].size
    np.testing.assert_allclose(means.mean_effect, grid["mean_effect"].transpose("position", "layer", "component")
                               .values.ravel(), rtol=1e-6, equal_nan=True)
    assert meta["sources"]["patching.nc"]["constants"]["atp_exact_correlation_pooled"] == pytest.approx(
        float(xr.load_dataset(REGRESSION / "patching.nc")["atp_exact_correlation_pooled"]))
    assert meta["sources"]["decisions.nc"]["attrs"]["analysis"] == "decisions"


def test_the_lens_top_k_file_is_named_after_the_lens_it_holds(tmp_path):
    """The regression store has only the logit lens: logit_lens_topk.json, no tuned_lens*.json, and the
    trajectories carry the lens as a constant, not a column."""
    paths = export_store(REGRESSION, "csv", tmp_path)
    names = {p.name for p in paths}
    assert "logit_lens_topk.json" in names and not any(n.startswith("tuned_lens") for n in names)
    recs = json.loads((tmp_path / "logit_lens_topk.json").read_text(encoding="utf-8"))
    ds = xr.load_dataset(REGRESSION / "lens.nc")
    assert len(recs) == ds.sizes["prompt"] * ds.sizes["side"] * ds.sizes["layer"] and "lens" not in recs[0]
    one = ds.sel(lens="logit", prompt=recs[5]["prompt_id"], side=recs[5]["side"], layer=recs[5]["layer"])
    assert recs[5]["top_token_ids"] == one["top_token_id"].values.tolist()
    assert recs[5]["top_probs"] == pytest.approx(one["top_prob"].values.tolist(), rel=1e-12)
    assert "lens" not in pd.read_csv(tmp_path / "token_trajectories.csv")
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["tables"]["logit_lens_topk.json"]["constants"] == {"lens": "logit"}
    assert meta["tables"]["token_trajectories.csv"]["constants"] == {"lens": "logit"}


def test_effect_by_default_and_the_seed_names_on_request(store, tmp_path):
    export_store(store, "csv", tmp_path / "ours")
    ours = pd.read_csv(tmp_path / "ours" / "detailed_layer_data.csv")
    assert "effect" in ours and "causal_score" not in ours
    paths = export_store(store, "csv", tmp_path / "seed", seed_names=True)
    seed = pd.read_csv(tmp_path / "seed" / "detailed_layer_data.csv")
    assert "causal_score" in seed and "effect" not in seed
    np.testing.assert_array_equal(seed.causal_score, ours.effect)
    names = {p.name for p in paths}
    assert "tuned_lens.json" in names and "tuned_lens_topk.json" not in names and "logit_lens_topk.json" in names
    assert json.loads((tmp_path / "seed" / "metadata.json").read_text())["column_aliases"] == {"effect": "causal_score"}
    from nnethics.cli import cli

    res = CliRunner().invoke(cli, ["export", str(store), "--seed-names", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "causal_score" in pd.read_csv(tmp_path / "cli" / "detailed_layer_data.csv")


def test_json_tables_keep_full_precision(store, tmp_path):
    export_store(store, "json", tmp_path)
    recs = pd.DataFrame(json.loads((tmp_path / "detailed_layer_data.json").read_text()))
    ds = xr.load_dataset(store / "patching.nc")
    want = ds["effect"].transpose("prompt", "layer", "component").values.ravel()
    np.testing.assert_allclose(recs.effect.astype(float), want, rtol=1e-12, equal_nan=True)


def test_rows_follow_the_file_order_of_unsorted_prompt_ids():
    """Prompt ids in no sorted order (as a user's file has them): every column of a row belongs to that row."""
    ds = synthetic.decisions(n_prompts=5)
    ds = ds.assign_coords(prompt=["zeta", "alpha", "mu", "beta", "10"])
    df = decisions_table(ds)
    assert df.prompt_id.tolist() == [p for p in ds["prompt"].values.tolist() for _ in range(2)]
    for _, row in df.iterrows():
        one = ds.sel(prompt=row.prompt_id, side=row.side)
        assert row.logit_diff == pytest.approx(float(one["logit_diff"]))
        assert row.logit_1 == pytest.approx(float(one["label_logit"].sel(option="1")))
        assert row.prob_2 == pytest.approx(float(one["label_prob"].sel(option="2")))


# OWASP's CSV-injection characters, written out here (not read from nnethics.export): a cell starting with one of
# them is run as a formula by spreadsheets, so it gets a leading apostrophe.
GUARDED = ("=", "+", "-", "@", "\t", "\r")


def test_csv_guard_covers_every_formula_character_and_leaves_the_rest():
    from nnethics.export import neutralise_formulas

    cells = [c + "1+1" for c in GUARDED] + ["-3.5", "+44 20 7946 0000", "plain", " =1+1", "a=b", "1-2", "'=x", ""]
    want = (["'" + c + "1+1" for c in GUARDED] + ["'-3.5", "'+44 20 7946 0000"]  # number-looking text too
            + ["plain", " =1+1", "a=b", "1-2", "'=x", ""])
    df = pd.DataFrame({"text": cells, "number": np.linspace(-3.0, 3.0, len(cells))})
    out = neutralise_formulas(df)
    assert list(out["text"]) == want
    pd.testing.assert_series_equal(out["number"], df["number"])  # numbers, negative ones included, untouched
    assert list(df["text"]) == cells  # the caller's frame is not changed


def test_written_csv_guards_every_formula_character(tmp_path):
    from nnethics.store import write_atomic

    ids = [c + "SUM(A1)" for c in GUARDED] + ["-31415.9265", "plain"]  # a number-looking text cell too
    ds = synthetic.decisions(n_prompts=len(ids)).assign_coords(prompt=ids)
    write_atomic(ds, tmp_path / "m" / "decisions.nc")
    path = next(p for p in export_store(tmp_path / "m") if p.name == "decisions.csv")
    text = path.read_bytes().decode("utf-8")  # as written: tab and CR kept
    for i in ids[:-1]:
        assert text.count("'" + i) == text.count(i) > 0, repr(i)  # every occurrence guarded
    assert "'plain" not in text and "plain" in text


def test_a_text_cell_with_a_carriage_return_stays_one_row(tmp_path):
    """A CR inside a cell must be quoted, or every CSV reader (and a spreadsheet) splits the row in two."""
    import csv
    import io

    from nnethics.store import write_atomic

    ids = ["a\rb", "c\nd", "plain", "\rlead"]
    ds = synthetic.decisions(n_prompts=len(ids)).assign_coords(prompt=ids)
    write_atomic(ds, tmp_path / "m" / "decisions.nc")
    path = next(p for p in export_store(tmp_path / "m") if p.name == "decisions.csv")
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), [len(r) for r in body]
    col = header.index("prompt_id")
    assert sorted({r[col] for r in body}) == sorted(["a\rb", "c\nd", "plain", "'\rlead"])
    frame = pd.read_csv(path, keep_default_na=False)
    assert len(frame) == len(body)
