"""Small synthetic Datasets that follow the store contracts, for render/report/export tests.

Every builder is deterministic given ``seed`` and internally consistent (DLA parts add up to the
logit difference, the lens crossing layer is where the label logits cross, patching peaks are
where the effect is largest), so tests can check rendered data against known values.
No torch: these are plain numpy/xarray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr

from nnethics import verdict
from nnethics.store import SCHEMA_VERSION, write_atomic

SIDES = ("base", "cf")
COMPONENTS = ("resid", "attn", "mlp")
CATEGORIES = ("harm_care", "fairness", "honesty")
ALL = ("decisions", "patching", "patching_grid", "patching_noise", "patching_noise_grid", "attribution", "lens")
# what each VOCAB entry decodes to (tokenizer.decode): leading-space markers become spaces
VOCAB_TEXT = np.array([" the", " a", "1", "2", " to", " hello", "naïve", "中文", "🙂", "line\nbreak", "<b>x</b>", " 1"])
VOCAB = np.array(["Ġthe", "Ġa", "1", "2", "Ġto", "▁hello", "naïve", "中文", "🙂", "line\nbreak", "<b>x</b>", "Ġ1"])


def prompt_ids(n: int) -> list[str]:
    return [f"case_{i:03d}" for i in range(n)]


def _attrs(analysis: str, slug: str, n_layers: int, schema_version: int = SCHEMA_VERSION) -> dict:
    """Provenance as ``store.provenance`` writes it; ``schema_version=1`` leaves the attr out (files before it)."""
    version = {"schema_version": schema_version} if schema_version > 1 else {}
    return {"analysis": analysis, **version, "nnethics_version": "0.1.0", "model_id": f"synthetic/{slug}", "model_slug": slug,
            "n_layers": n_layers, "prompt_set": "synthetic", "labels": json.dumps(["1", "2"]),
            "created": "2026-01-01T00:00:00+00:00", "options": json.dumps({"synthetic": True})}


def decisions(n_prompts: int = 6, seed: int = 0, labels: tuple[str, str] = ("1", "2"), slug: str = "synthetic",
              n_layers: int = 6, n_tokens: int = 12) -> xr.Dataset:
    """decisions.nc: dims prompt, side, option, token."""
    rng = np.random.default_rng(seed)
    n = n_prompts
    logit = rng.normal(20.0, 1.5, size=(n, 2, 2)).astype(np.float32)
    lse = logit.max(-1) + 2.0
    prob = np.exp(logit - lse[..., None]).astype(np.float32)
    chosen_idx = logit.argmax(-1)
    chosen = np.array(labels)[chosen_idx]
    ethical = np.array([[labels[i % 2], labels[(i + 1) % 2]] for i in range(n)])
    chose = chosen == ethical
    ids = np.full((n, 2, n_tokens), -1, dtype=np.int32)
    n_tok = rng.integers(n_tokens // 2, n_tokens + 1, size=(n, 2)).astype(np.int32)
    texts = np.empty((n, 2), dtype=object)
    for i in range(n):
        for j, side in enumerate(SIDES):
            ids[i, j, : n_tok[i, j]] = rng.integers(0, 1000, size=n_tok[i, j])
            texts[i, j] = (f"<|im_start|>user\nDilemma {i} ({side}) <script>alert('x')</script> & 🙂\n"
                           f"Option 1: act.\nOption 2: wait.<|im_end|>")
    ds = xr.Dataset(
        {
            "label_logit": (("prompt", "side", "option"), logit),
            "label_prob": (("prompt", "side", "option"), prob),
            "logit_diff": (("prompt", "side"), (logit[..., 0] - logit[..., 1]).astype(np.float32)),
            "chosen": (("prompt", "side"), chosen.astype(str)),
            "ethical_option": (("prompt", "side"), ethical.astype(str)),
            "chose_ethical": (("prompt", "side"), chose),
            "consistent": (("prompt",), chose[:, 0] == chose[:, 1]),
            "label_is_top": (("prompt", "side"), rng.random((n, 2)) > 0.3),
            "prompt_text": (("prompt", "side"), texts.astype(str)),
            "input_ids": (("prompt", "side", "token"), ids),
            "n_tokens": (("prompt", "side"), n_tok),
            "category": (("prompt",), np.array([CATEGORIES[i % len(CATEGORIES)] for i in range(n)])),
        },
        coords={"prompt": prompt_ids(n), "side": list(SIDES), "option": list(labels),
                "label_token_id": ("option", np.array([33, 34], dtype=np.int32)),
                "label_token": ("option", np.array(list(labels)))},
        attrs=_attrs("decisions", slug, n_layers),
    )
    return verdict.finalize_decisions(ds)


def peak_layers(n_prompts: int, n_layers: int, seed: int = 0) -> np.ndarray:
    """The layer at which each synthetic prompt's resid effect peaks."""
    return np.random.default_rng(seed + 100).integers(1, n_layers - 1, size=n_prompts)


def _bump(n_layers: int, centre: np.ndarray, width: float = 1.0) -> np.ndarray:
    layers = np.arange(n_layers)
    return np.exp(-0.5 * ((layers[None, :] - centre[:, None]) / width) ** 2)


def patching(n_prompts: int = 6, n_layers: int = 6, seed: int = 0, slug: str = "synthetic",
             with_ci: bool = True, legacy: bool = False) -> xr.Dataset:
    """patching.nc: dims prompt, layer, component.

    As ``nnethics run`` writes it: ``effect`` normalised, (patched − base) / (cf − base), NaN for the
    last prompt whose base and counterfactual logit differences are too close (``effect_defined``);
    per-prompt summaries per component; ``mean_effect`` with ``effect_ci_low``/``effect_ci_high``.
    ``legacy=True`` gives the first contract instead, a schema-version-1 file: ``effect`` = patched − base in
    logit-difference units (no ``effect_kind`` attr, no ``effect_defined``), per-prompt summaries without a
    component dim, ``ci_low``/``ci_high``.
    """
    rng = np.random.default_rng(seed)
    n = n_prompts
    base = rng.normal(2.0, 0.5, size=n).astype(np.float32)
    cf = (-base + rng.normal(0, 0.3, size=n)).astype(np.float32)
    if not legacy:
        cf[-1] = base[-1] + 0.01  # too small a gap to normalise by
    peak = peak_layers(n, n_layers, seed)
    span = cf - base
    delta = np.zeros((n, n_layers, 3), dtype=np.float64)
    delta[..., 0] = span[:, None] * _bump(n_layers, peak)
    delta[..., 1] = 0.4 * span[:, None] * _bump(n_layers, peak - 0.5)
    delta[..., 2] = 0.6 * span[:, None] * _bump(n_layers, peak + 0.5)
    patched = (base[:, None, None] + delta).astype(np.float32)
    flipped = np.sign(patched) != np.sign(base)[:, None, None]
    atp_delta = delta + rng.normal(0, 0.1, size=delta.shape)
    defined = np.abs(span) >= 0.1
    if legacy:
        effect, atp = delta, atp_delta
    else:
        gap = np.where(defined, span, np.nan)[:, None, None]
        effect, atp = (patched - base[:, None, None]) / gap, atp_delta / gap
    size = np.abs(delta)
    srt = np.sort(size, axis=1)
    cum = np.cumsum(srt, axis=1)
    gini = (n_layers + 1 - 2 * (cum / cum[:, -1:]).sum(1)) / n_layers  # prompt, component
    top5 = srt[:, -5:].sum(1) / srt.sum(1)
    peaks = size.argmax(1)
    flips = flipped.sum(1)
    per = ("prompt",) if legacy else ("prompt", "component")

    def summary(a: np.ndarray) -> np.ndarray:
        return a[:, 0] if legacy else a

    ds = xr.Dataset(
        {
            "base_logit_diff": (("prompt",), base),
            "cf_logit_diff": (("prompt",), cf),
            "patched_logit_diff": (("prompt", "layer", "component"), patched),
            "effect": (("prompt", "layer", "component"), effect.astype(np.float32)),
            "flipped": (("prompt", "layer", "component"), flipped),
            "atp_effect": (("prompt", "layer", "component"), atp.astype(np.float32)),
            "peak_layer": (per, summary(peaks).astype(np.int32)),
            "num_choice_flips": (per, summary(flips).astype(np.int32)),
            "gini_coefficient": (per, summary(gini).astype(np.float32)),
            "top5_concentration": (per, summary(top5).astype(np.float32)),
            "chose_ethical_base": (("prompt",), np.arange(n) % 3 != 0),
        },
        coords={"prompt": prompt_ids(n), "layer": np.arange(n_layers), "component": list(COMPONENTS)},
        attrs=_attrs("patching", slug, n_layers, schema_version=1 if legacy else SCHEMA_VERSION),
    )
    if not legacy:
        ds["effect_defined"] = (("prompt",), defined)
        ds["effect_defined"].attrs.update(description="|cf_logit_diff - base_logit_diff| >= min_gap = 0.1", min_gap=0.1)
        ds["effect"].attrs.update(description="(patched - base_logit_diff) / (cf_logit_diff - base_logit_diff)",
                                  effect_kind="normalized")
        ds["atp_effect"].attrs["effect_kind"] = "normalized"
    if with_ci:
        ok = effect[defined]
        mean = ok.mean(0)
        sem = ok.std(0, ddof=1) / np.sqrt(len(ok))
        lo, hi = ("ci_low", "ci_high") if legacy else ("effect_ci_low", "effect_ci_high")
        ds["mean_effect"] = (("layer", "component"), mean.astype(np.float32))
        ds[lo] = (("layer", "component"), (mean - 1.5 * sem).astype(np.float32))  # not 1.96: must be read, not recomputed
        ds[hi] = (("layer", "component"), (mean + 1.5 * sem).astype(np.float32))
    return ds


def patching_positions(n_prompts: int = 6, n_layers: int = 6, n_positions: int = 5, seed: int = 0,
                       kind: str = "grid", slug: str = "synthetic") -> xr.Dataset:
    """patching_grid.nc / patching_noise_grid.nc: ``effect`` with an extra ``position`` dim (−1 = last token).

    The grid file has dims (prompt, layer, component, position); the noise grid (prompt, position, layer),
    so both layouts of the contract are exercised. The effect is largest at position −1 late in the
    network and at position −3 early (the ROME picture).
    """
    rng = np.random.default_rng(seed + 7)
    n = n_prompts
    pos = -np.arange(n_positions, 0, -1)
    layers = np.arange(n_layers)
    early = np.exp(-0.5 * ((layers - 1) / 1.0) ** 2)
    late = np.exp(-0.5 * ((layers - (n_layers - 1)) / 1.5) ** 2)
    grid = np.zeros((n_positions, n_layers))
    grid[pos == -1] = 1.5 * late
    grid[pos == -3] = early
    scale = rng.uniform(0.5, 1.5, size=n)
    eff = scale[:, None, None] * grid[None] + rng.normal(0, 0.05, size=(n, n_positions, n_layers))
    attrs = _attrs(f"patching_{kind}", slug, n_layers)
    coords = {"prompt": prompt_ids(n), "layer": layers, "position": pos}
    kind_attr = {"effect_kind": "normalized"}
    if kind == "noise":
        return xr.Dataset({"effect": (("prompt", "position", "layer"), eff.astype(np.float32), kind_attr)},
                          coords=coords, attrs=attrs)
    comps = np.stack([eff, 0.3 * eff, 0.7 * eff], axis=-1).transpose(0, 2, 3, 1)  # prompt, layer, component, position
    return xr.Dataset({"effect": (("prompt", "layer", "component", "position"), comps.astype(np.float32), kind_attr)},
                      coords={**coords, "component": list(COMPONENTS)}, attrs=attrs)


def noise_last(n_prompts: int = 6, n_layers: int = 6, seed: int = 0, slug: str = "synthetic") -> xr.Dataset:
    """patching_noise.nc: clean states restored into a noised base at the last token (no position dim).

    The receiver is the noised run (``corrupted_logit_diff``), the source the clean one (``base_logit_diff``).
    """
    ds = patching(n_prompts, n_layers, seed, slug)
    out = ds.drop_vars(["base_logit_diff", "cf_logit_diff"]).assign(
        corrupted_logit_diff=ds["base_logit_diff"], base_logit_diff=ds["cf_logit_diff"])
    out.attrs = _attrs("patching_noise", slug, n_layers)
    return out


def attribution(n_prompts: int = 6, n_layers: int = 6, n_heads: int = 4, seed: int = 0, slug: str = "synthetic",
                labels: tuple[str, str] = ("1", "2")) -> xr.Dataset:
    """attribution.nc: dims prompt, side, layer, component (attn, mlp), option, head."""
    rng = np.random.default_rng(seed + 3)
    n = n_prompts
    heads = rng.normal(0, 0.3, size=(n, 2, n_layers, n_heads, 2))
    heads[:, :, -1, 0, 0] += 1.5  # a clear "head L-1.0 pushes option 1" signal
    attn = heads.sum(3)  # prompt, side, layer, option
    mlp = rng.normal(0, 0.5, size=(n, 2, n_layers, 2))
    mlp[:, :, n_layers // 2, 1] += 1.0
    logit = np.stack([attn, mlp], axis=3).astype(np.float32)  # prompt, side, layer, component, option
    embed = rng.normal(0, 0.2, size=(n, 2, 2)).astype(np.float32)
    bias = rng.normal(0, 0.05, size=(n, 2, 2)).astype(np.float32)
    diff = logit[..., 0] - logit[..., 1]
    head_diff = (heads[..., 0] - heads[..., 1]).astype(np.float32)
    total = logit.sum((2, 3)) + embed + bias
    a1, m1 = np.abs(logit[:, :, :, 0, 0]), np.abs(logit[:, :, :, 1, 0])
    ds = xr.Dataset(
        {
            "logit_contribution": (("prompt", "side", "layer", "component", "option"), logit),
            "diff_contribution": (("prompt", "side", "layer", "component"), diff.astype(np.float32)),
            "head_contribution": (("prompt", "side", "layer", "head"), head_diff),
            "embed_contribution": (("prompt", "side"), embed[..., 0] - embed[..., 1]),
            "embed_logit_contribution": (("prompt", "side", "option"), embed),
            "bias_contribution": (("prompt", "side"), bias[..., 0] - bias[..., 1]),
            "bias_logit_contribution": (("prompt", "side", "option"), bias),
            "softcap_contribution": (("prompt", "side"), np.zeros((n, 2), np.float32)),
            "other_layers_contribution": (("prompt", "side"), np.zeros((n, 2), np.float32)),
            "attn_bias_contribution": (("prompt", "side", "layer"), np.zeros((n, 2, n_layers), np.float32)),
            "logit_diff": (("prompt", "side"), (total[..., 0] - total[..., 1]).astype(np.float32)),
            "attn_mlp_ratio": (("prompt", "side", "layer"), (a1 / (a1 + m1 + 1e-8)).astype(np.float32)),
        },
        coords={"prompt": prompt_ids(n), "side": list(SIDES), "layer": np.arange(n_layers),
                "component": ["attn", "mlp"], "option": list(labels), "head": np.arange(n_heads)},
        attrs=_attrs("attribution", slug, n_layers),
    )
    return verdict.add_position_content_split(ds, np.array([[i % 2 == 0, i % 2 == 1] for i in range(n)]))


def crossing_layer(diff: np.ndarray) -> np.ndarray:
    """First layer from which the sign of ``diff [..., layer]`` equals its final sign (−1 if none)."""
    final = np.sign(diff[..., -1:])
    agree = np.sign(diff) == final
    # from the last layer backwards, the first disagreement ends the run
    run = np.flip(np.cumprod(np.flip(agree, -1), -1), -1).astype(bool)
    first = np.argmax(run, axis=-1)
    return np.where(run.any(-1), first, -1)


def lens(n_prompts: int = 6, n_layers: int = 6, k: int = 5, seed: int = 0, slug: str = "synthetic",
         lenses: Iterable[str] = ("logit", "tuned"), labels: tuple[str, str] = ("1", "2")) -> xr.Dataset:
    """lens.nc: dims prompt, side, lens, layer, k, option."""
    rng = np.random.default_rng(seed + 5)
    lenses = list(lenses)
    n, nl = n_prompts, len(lenses)
    shape = (n, 2, nl, n_layers)
    top_ids = rng.integers(0, len(VOCAB), size=(*shape, k)).astype(np.int32)
    top_logit = np.sort(rng.normal(5, 2, size=(*shape, k)), axis=-1)[..., ::-1].astype(np.float32)
    top_prob = np.exp(top_logit - top_logit[..., :1] - 1.0).astype(np.float32)
    t = np.linspace(0, 1, n_layers)
    target = np.where(rng.random((n, 2, 1)) > 0.5, 1.0, -1.0)
    shift = rng.uniform(0.2, 0.8, size=(n, 2, nl, 1))
    diff = 4 * target[..., None] * (t - shift)  # crosses zero at layer fraction ``shift``
    o1 = 2 + t * 6 + diff / 2
    o2 = 2 + t * 6 - diff / 2
    opt_logit = np.stack([o1, o2], axis=-1).astype(np.float32)
    opt_prob = (1 / (1 + np.exp(-(opt_logit - 10)))).astype(np.float32)
    kl = (3.0 * (1 - t) ** 2 + rng.uniform(0, 0.1, size=shape)).astype(np.float32)
    if "tuned" in lenses:
        kl[:, :, lenses.index("tuned")] *= 0.4
    cross = crossing_layer(opt_logit[..., 0] - opt_logit[..., 1]).astype(np.int32)
    ds = xr.Dataset(
        {
            "top_token": (("prompt", "side", "lens", "layer", "k"), VOCAB[top_ids]),
            "top_token_text": (("prompt", "side", "lens", "layer", "k"), VOCAB_TEXT[top_ids]),
            "top_token_id": (("prompt", "side", "lens", "layer", "k"), top_ids),
            "top_prob": (("prompt", "side", "lens", "layer", "k"), top_prob),
            "top_logit": (("prompt", "side", "lens", "layer", "k"), top_logit),
            "label_logit": (("prompt", "side", "lens", "layer", "option"), opt_logit),
            "label_prob": (("prompt", "side", "lens", "layer", "option"), opt_prob),
            "kl_to_final": (("prompt", "side", "lens", "layer"), kl),
            "crossing_layer": (("prompt", "side", "lens"), cross),
        },
        coords={"prompt": prompt_ids(n), "side": list(SIDES), "lens": lenses, "layer": np.arange(n_layers),
                "k": np.arange(k), "option": list(labels)},
        attrs=_attrs("lens", slug, n_layers),
    )
    return ds


def heads(n_prompts: int = 6, n_layers: int = 6, n_heads: int = 4, seed: int = 0, slug: str = "synthetic",
          n_tokens: int = 30) -> xr.Dataset:
    """heads.nc (finalized): built by the analysis' own build_dataset + finalize from random arrays, with a clear
    "head (L-2, 1) moves the decision" signal and token counts that differ per prompt."""
    from nnethics.analyses import heads as h
    from nnethics.prompts import PromptPair

    rng = np.random.default_rng(seed + 11)
    n, L, H = n_prompts, n_layers, n_heads
    base = rng.normal(1.0, 0.5, n)
    cf = base - rng.uniform(1.0, 2.0, n)
    patched = base[:, None, None] + rng.normal(0, 0.05, (n, L, H))
    patched[:, L - 2, 1] = cf + 0.1 * rng.normal(size=n)
    lengths = rng.integers(n_tokens // 2, n_tokens + 1, size=(n, 2))
    width = int(lengths.max())
    ids = np.full((n, 2, width), -1, np.int32)
    att = np.full((n, 2, L, H, width), np.nan, np.float32)
    for i in range(n):
        for s in range(2):
            k = int(lengths[i, s])
            ids[i, s, :k] = rng.integers(0, len(VOCAB_TEXT), k)
            w = rng.dirichlet(np.ones(k), size=(L, H))
            att[i, s, :, :, :k] = w
    text = np.where(ids >= 0, VOCAB_TEXT[np.clip(ids, 0, None)], "")
    pairs = [PromptPair(prompt_id=p, base="b", cf="c", base_ethical="1", cf_ethical="2",
                        category=CATEGORIES[i % 3]) for i, p in enumerate(prompt_ids(n))]
    ds = h.build_dataset(pairs=pairs, labels=["1", "2"], base_ld=base, cf_ld=cf, patched_ld=patched,
                         atp_delta=(patched - base[:, None, None]) * 0.9, dla=rng.normal(0, 0.3, (n, 2, L, H)),
                         input_ids=ids, token_text=text, min_gap=0.1, forward_path="kv_cache", why="", top_heads=3)
    ds.attrs.update(_attrs("heads", slug, n_layers))
    ds.attrs["options"] = json.dumps({"top_heads": 3})
    ds = h.finalize(ds)  # then the complete pass's attention: the random weights of the chosen heads
    top = zip(ds["top_layer"].values, ds["top_head"].values)
    return h.with_attention(ds, np.stack([att[:, :, la, hd] for la, hd in top], axis=2))


def build(name: str, n_prompts: int = 6, n_layers: int = 6, seed: int = 0, slug: str = "synthetic") -> xr.Dataset:
    if name == "decisions":
        return decisions(n_prompts, seed, slug=slug, n_layers=n_layers)
    if name == "patching":
        return patching(n_prompts, n_layers, seed, slug=slug)
    if name == "patching_grid":
        return patching_positions(n_prompts, n_layers, seed=seed, kind="grid", slug=slug)
    if name == "patching_noise":
        return noise_last(n_prompts, n_layers, seed, slug=slug)
    if name == "patching_noise_grid":
        return patching_positions(n_prompts, n_layers, seed=seed, kind="noise", slug=slug)
    if name == "attribution":
        return attribution(n_prompts, n_layers, seed=seed, slug=slug)
    if name == "lens":
        return lens(n_prompts, n_layers, seed=seed, slug=slug)
    if name == "heads":
        return heads(n_prompts, n_layers, seed=seed, slug=slug)
    raise ValueError(f"unknown synthetic analysis {name!r}")


def write_store(root: str | Path, slug: str = "synthetic-model", n_prompts: int = 6, n_layers: int = 6,
                analyses: Iterable[str] = ALL, seed: int = 0) -> Path:
    """Write ``root/<slug>/<analysis>.nc`` for each analysis; return the model folder."""
    folder = Path(root) / slug
    for name in analyses:
        write_atomic(build(name, n_prompts, n_layers, seed, slug), folder / f"{name}.nc")
    return folder
