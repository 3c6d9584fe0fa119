"""Every environment variable nnethics reads, in one table: shown at the end of ``nnethics --help`` and listed in
the README (a test checks both, and that no ``os.environ`` read in the package is missing here).

Variables behind an option are the option's click ``envvar`` (``--store`` ← ``NNETHICS_STORE``), so that
option's ``--help`` names them too; the others are read where they are needed (the model loader, the remote
backend, the lock). Secrets are only ever named here, never shown.
"""

from __future__ import annotations

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("NNETHICS_STORE", "default of --store (output folder)"),
    ("NNETHICS_LOCK_TIMEOUT", "default of --lock-timeout (seconds to wait for a busy model folder)"),
    ("NNETHICS_REMOTE", "default of --remote/--local (1: run on NDIF)"),
    ("NNETHICS_CONFIG", "models file for --model keys (default: config/models.json)"),
    ("NNETHICS_CACHE", "cache of the built-in model and trained lenses (default: ~/.cache/nnethics)"),
    ("NNETHICS_NDIF_RETRIES", "extra attempts after a dropped NDIF connection (default 3; 0 to 100)"),
    ("NNETHICS_NDIF_TIMEOUT", "seconds of NDIF silence before an attempt is abandoned (default 900; above 0, "
                              "at most 86400)"),
    ("NNETHICS_NDIF_BACKOFF", "first wait in seconds between NDIF attempts, doubled each time (default 2; 0 to "
                              "3600)"),
    ("NDIF_API_KEY", "NDIF API key for --remote (secret: never printed or stored)"),
    ("NDIF_HOST", "NDIF server URL (default: nnsight's config, else https://api.ndif.us)"),
    ("HF_TOKEN", "default of --token, Hugging Face token for gated models (secret: never printed or stored)"),
    ("HUGGING_FACE_HUB_TOKEN", "older name of HF_TOKEN (secret)"),
    ("HF_HUB_OFFLINE", "1: no hub look-ups (models and --tuned-lens hub:... from the local cache only)"),
    ("HF_HUB_CACHE", "Hugging Face hub cache (models and --tuned-lens hub:ORG/REPO)"),
    ("_NNETHICS_COMPLETE", "shell completion: eval \"$(_NNETHICS_COMPLETE=bash_source nnethics)\" (zsh_source, "
                           "fish_source)"),
)
"""(name, what it sets), in the order ``--help`` lists them."""

TEST_ONLY = ("NNETHICS_REQUIRE_ALL",)
"""Read by the test suite and scripts only (documented in the README's test section)."""


def epilog() -> str:
    """The ``Environment:`` block at the end of ``nnethics --help`` (``\\b``: click keeps the lines as they are)."""
    width = max(len(name) for name, _ in ENVIRONMENT)
    lines = [f"  {name.ljust(width)}  {text}" for name, text in ENVIRONMENT]
    return "\b\nEnvironment:\n" + "\n".join(lines)
