"""Provenance attrs of every stored Dataset, and the fingerprint that says whether stored work can be reused."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .. import __version__
from .schema import SCHEMA_VERSION


def attr_value(value: Any) -> str | int | float:
    """``value`` as a NetCDF attr: str/int/float kept, bool as "true"/"false", None as "", anything else as JSON."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else ""
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def provenance(analysis: str, model: Any = None, prompts: Any = None, options: Mapping[str, Any] | None = None,
               **extra: Any) -> dict[str, str | int | float]:
    """Provenance attrs (str/int/float only: NetCDF rejects bool, None and dicts), with the ``schema_version``
    of the variables written under them. No secrets."""
    import nnsight
    import torch
    import transformers

    attrs: dict[str, Any] = {
        "analysis": analysis,
        "schema_version": SCHEMA_VERSION,
        "nnethics_version": __version__,
        "nnsight_version": nnsight.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": json.dumps(dict(options or {}), sort_keys=True, default=str),
    }
    if model is not None:
        attrs.update(model.provenance())
    if prompts is not None:
        attrs.update(prompt_set=prompts.name, prompt_set_sha256=prompts.sha256, labels=json.dumps(list(prompts.labels)))
        if getattr(prompts, "framing", ""):  # the framing the pairs were rendered in (nnethics.framings)
            attrs.update(framing_attrs(prompts.framing, prompts.labels))
    attrs.update(extra)
    return {k: attr_value(v) for k, v in attrs.items()}


def framing_attrs(framing: str, labels: Any) -> dict[str, str]:
    """The attrs of a file computed in a framing ``<template>.<label set>.<order>`` (its id, parts and labels)."""
    template, _, order = framing.split(".")
    return {"framing": framing, "framing_template": template, "framing_labels": ",".join(labels),
            "framing_order": order, "counterfactual_kind": "label" if order == "swap" else "content"}


FINGERPRINT_KEYS = ("analysis", "model_id", "model_revision", "dtype", "quantization", "prompt_set_sha256", "options",
                    "labels")


def _fingerprinted(attrs: Mapping[str, Any], key: str) -> str:
    value = str(attrs.get(key, ""))
    # A GGUF source's quantization ("gguf-q4_1 (dequantized to float32)") only says where de-quantized weights came
    # from, which model_id and model_revision already pin: results stored before it was recorded stay reusable.
    return "" if key == "quantization" and value.startswith("gguf-") else value


def fingerprint(attrs: Mapping[str, Any]) -> str:
    """What must match for parts of an interrupted run, or a stored result, to be reused."""
    blob = json.dumps({k: _fingerprinted(attrs, k) for k in FINGERPRINT_KEYS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def json_or_text(value: str) -> Any:
    """``value`` parsed as JSON, or ``value`` itself when it is not JSON (attrs hold both)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _option_differences(stored: str, ours: str) -> list[str] | None:
    """The options (a JSON object each) that differ, key by key; None when either is not a JSON object."""
    sa, sb = json_or_text(stored or "{}"), json_or_text(ours)
    if not (isinstance(sa, dict) and isinstance(sb, dict)):
        return None
    unset = object()
    out = []
    for k in sorted(set(sa) | set(sb)):
        va, vb = sa.get(k, unset), sb.get(k, unset)
        if va != vb:
            show = [("(unset)" if v is unset else json.dumps(v, default=str)) for v in (va, vb)]
            out.append(f"{k}: stored {show[0]}, this run {show[1]}")
    return out


def describe_differences(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The fingerprint fields (options key by key) in which ``stored`` attrs differ from ``ours``, in words."""
    if "fingerprint" not in stored:
        return ["it has no fingerprint (written by an older nnethics or another tool)"]
    if "analysis" not in stored:  # a part written before parts carried their provenance
        return [f"fingerprint: stored {stored.get('fingerprint')!r}, this run {fingerprint(ours)!r}"]
    out = []
    for key in FINGERPRINT_KEYS:
        a, b = str(stored.get(key, "")), str(ours.get(key, ""))
        if a == b:
            continue
        options = _option_differences(a, b) if key == "options" else None
        if options is not None:
            out += options
        elif key == "prompt_set_sha256":
            out.append(f"prompt set sha256: stored {a[:12] or '(none)'}, this run {b[:12]} (the prompt file changed)")
        else:
            out.append(f"{key}: stored {a!r}, this run {b!r}")
    return out or [f"fingerprint: stored {stored.get('fingerprint')!r}, this run {fingerprint(ours)!r}"]
