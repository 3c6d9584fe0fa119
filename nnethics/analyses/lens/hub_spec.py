"""The syntax of ``--tuned-lens hub:[spaces/]ORG/REPO[/subfolder][@revision]`` (no torch, no hub: the options
check it before a model loads; :mod:`nnethics.analyses.lens.hub` fetches the lens)."""

from __future__ import annotations

PREFIX = "hub:"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
SYNTAX = "expected hub:ORG/REPO[/subfolder][@revision] (e.g. hub:spaces/AlignmentResearch/tuned-lens/lens/gpt2)"


def is_hub_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def split_hub_spec(spec: str) -> tuple[str, str, str | None, str | None] | None:
    """``hub:[spaces/]ORG/REPO[/subfolder][@revision]`` -> (repo_id, repo_type, subfolder, revision), or None when
    it names no ORG/REPO."""
    rest, _, revision = spec[len(PREFIX):].partition("@")
    parts = [p for p in rest.split("/") if p]
    repo_type = REPO_TYPES.get(parts[0], "model") if parts else "model"
    parts = parts[1:] if parts and parts[0] in REPO_TYPES else parts
    if len(parts) < 2:
        return None
    return "/".join(parts[:2]), repo_type, "/".join(parts[2:]) or None, revision or None
