"""Tokens and keys: read from the environment or a git-ignored config, never written anywhere.

``config/models.json`` keeps the seed's shape so seed users can reuse their file::

    {"llama8b": {"name": "meta-llama/Llama-3.1-8B-Instruct", "token": "hf_..."}}

Optional per-entry fields: ``revision`` (string), ``dtype`` (``auto``/``float32``/``bfloat16``/``float16``),
``remote`` (``true``/``false`` or a server URL). Every field is type-checked: ``"remote": "no"`` is an error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

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
    remote: bool | str = False  # True for NDIF, or a server URL

    def __repr__(self) -> str:  # never show the token
        shown = "set" if self.token else "none"
        return f"ConfiguredModel(key={self.key!r}, name={self.name!r}, revision={self.revision!r}, token={shown})"


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


class _Entry(BaseModel):
    """One entry of config/models.json, strictly typed: ``"remote": "no"`` is an error, not a truthy string."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    token: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    remote: bool | Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] = False


_FIELD_HINTS = {
    "name": "a hub id (org/name), a local model folder or a .gguf file, as a string",
    "token": "a string (better: leave it out and set HF_TOKEN)",
    "revision": "a branch, tag or commit, as a string",
    "dtype": 'one of "auto", "float32", "bfloat16", "float16"',
    "remote": 'true, false or a server URL like "https://api.ndif.us" (JSON true/false, not a string)',
}


def _entry_problem(path: Path, key: str, entry: dict, err: ValidationError) -> str:
    problems = []
    for field in dict.fromkeys(str(e["loc"][0]) for e in err.errors() if e["loc"]):
        kinds = {e["type"] for e in err.errors() if e["loc"] and str(e["loc"][0]) == field}
        if "extra_forbidden" in kinds:
            problems.append(f"unknown field {field!r} (allowed: {', '.join(_FIELD_HINTS)})")
        elif "missing" in kinds:
            problems.append(f"{field!r} is missing; give {_FIELD_HINTS[field]}")
        else:
            value = entry.get(field)
            shown = f"a {type(value).__name__}" if field == "token" else json.dumps(value)  # never echo a token
            problems.append(f"{field!r} must be {_FIELD_HINTS[field]}, got {shown}")
    return f"{path}: entry {key!r}: " + "; ".join(problems) + f"; fix it in {path}"


def load_model_config(path: Path | None = None) -> dict[str, ConfiguredModel]:
    """Read the configured models; a missing ``config/models.json`` means no configured models, but a missing file
    that ``NNETHICS_CONFIG`` names is an error (a typo there must not send a --model key to the hub)."""
    named = path is None and bool(os.environ.get(CONFIG_ENV))
    path = path or config_path()
    if not path.exists():
        if named:
            raise ConfigError(f"{CONFIG_ENV}={path}: no such file; create it, fix the path, or unset {CONFIG_ENV} to "
                              f"use {DEFAULT_CONFIG}")
        return {}
    try:
        raw = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); fix its permissions or set {CONFIG_ENV}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object mapping keys to {{'name': ..., 'token': ...}}")
    models = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {key!r} must be an object like {{\"name\": \"org/model\"}}; fix it in {path}")
        try:
            e = _Entry.model_validate(entry)
        except ValidationError as err:
            raise ConfigError(_entry_problem(path, key, entry, err)) from None
        models[key] = ConfiguredModel(key=key, name=e.name, token=e.token or None, revision=e.revision, dtype=e.dtype,
                                      remote=e.remote)
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
