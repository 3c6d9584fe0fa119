"""Tokens and keys: read from the environment or a git-ignored config, never written anywhere.

``config/models.json`` keeps the seed's shape so seed users can reuse their file::

    {"llama8b": {"name": "meta-llama/Llama-3.1-8B-Instruct", "token": "hf_..."}}

Optional per-entry fields: ``revision``, ``dtype``, ``remote`` (bool).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_ENV = "NNETHICS_CONFIG"
DEFAULT_CONFIG = Path("config") / "models.json"
_REDACTED = "***"


class ConfigError(ValueError):
    """The models config file is malformed."""


@dataclass(frozen=True)
class ConfiguredModel:
    key: str
    name: str
    token: str | None = None
    revision: str | None = None
    dtype: str | None = None
    remote: bool = False

    def __repr__(self) -> str:  # never show the token
        shown = "set" if self.token else "none"
        return f"ConfiguredModel(key={self.key!r}, name={self.name!r}, revision={self.revision!r}, token={shown})"


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_model_config(path: Path | None = None) -> dict[str, ConfiguredModel]:
    """Read the configured models; a missing file means no configured models."""
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object mapping keys to {{'name': ..., 'token': ...}}")
    models = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{path}: entry {key!r} needs a string 'name' (a hub id, a local directory or a .gguf file)")
        unknown = set(entry) - {"name", "token", "revision", "dtype", "remote"}
        if unknown:
            raise ConfigError(f"{path}: entry {key!r} has unknown fields {sorted(unknown)}")
        models[key] = ConfiguredModel(
            key=key,
            name=entry["name"],
            token=entry.get("token") or None,
            revision=entry.get("revision"),
            dtype=entry.get("dtype"),
            remote=bool(entry.get("remote", False)),
        )
    return models


def resolve_token(explicit: str | None = None, configured: ConfiguredModel | None = None) -> str | None:
    """Explicit token, then ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``), then the config entry."""
    for candidate in (
        explicit,
        os.environ.get("HF_TOKEN"),
        os.environ.get("HUGGING_FACE_HUB_TOKEN"),
        configured.token if configured else None,
    ):
        if candidate:
            return candidate
    return None


def known_secrets() -> list[str]:
    """Every secret this process could hold, for redaction."""
    found = [os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NDIF_API_KEY")]
    try:
        found += [m.token for m in load_model_config().values()]
    except ConfigError:
        pass
    return [s for s in found if s]


_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text: str, *secrets: str | None) -> str:
    """Remove secrets (and anything shaped like an HF token) from text meant for users or files."""
    for secret in [*secrets, *known_secrets()]:
        if secret:
            text = text.replace(secret, _REDACTED)
    return _TOKEN_PATTERN.sub(_REDACTED, text)
