"""CSV/JSON export of a model folder (the original scripts' file layout), on synthetic stores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import synthetic
import xarray as xr
from click.testing import CliRunner

from nnethics.export import (
    ExportError,
    attribution_table,
    detailed_layer_data,
    export_store,
    lens_topk_records,
    summary_results,
    trajectory_table,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic.write_store(tmp_path_factory.mktemp("store"), n_prompts=5, n_layers=6)


def test_detailed_layer_data_is_one_row_per_prompt_layer_component():
    ds = synthetic.patching(n_prompts=4, n_layers=6)
    df = detailed_layer_data(ds)
    assert len(df) == 4 * 6 * 3
    assert list(df.columns[:4]) == ["prompt_id", "layer", "component", "causal_score"]
    row = df[(df.prompt_id == "case_002") & (df.layer == 4) & (df.component == "mlp")].iloc[0]
    assert row.causal_score == pytest.approx(float(ds["effect"].sel(prompt="case_002", layer=4, component="mlp")))
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
    assert names == sorted(["decisions.csv", "verdict_pairs.csv", "verdict_groups.csv", "detailed_layer_data.csv", "summary_results.csv", "patching_grid.csv",
                            "patching_noise.csv", "patching_noise_grid.csv", "attribution.csv",
                            "attribution_heads.csv", "token_trajectories.csv", "tuned_lens.json"])
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
    tokens = json.loads((tmp_path / "csv" / "tuned_lens.json").read_text(encoding="utf-8"))
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
    assert len(lines) == 12 and all("(" in ln for ln in lines)
    assert (tmp_path / "e" / "attribution.json").exists()
    res = runner.invoke(cli, ["export", str(tmp_path / "e")])
    assert res.exit_code == 2 and "no result files" in res.stderr
