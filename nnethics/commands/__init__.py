"""Analysis-specific CLI commands; each module exposes ``register(cli)``."""
