"""The options of the patching analysis (the declaration, :mod:`nnethics.analyses.patching`, and its own-forward run,
:mod:`.run`, both read them, so neither imports the other)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...metrics import DEFAULT_MIN_GAP
from ..base import (
    KV_CACHE,
    OptionError,
    chat_field,
    check_values,
    labels_field,
    max_tokens_field,
    option,
    parse_layers,
    parse_list,
)
from ..decisions import MIN_GAP_HELP
from .results import COMPONENTS

POSITIONS = ("last", "all", "grid")
CORRUPTIONS = ("counterfactual", "noise")


SPAN_HELP = "Tokens to corrupt: option1, option2, options, or regex:<pattern> on the formatted prompt."


def parse_span(value: str) -> str:
    """``option1``/``option2``/``options`` or ``regex:<pattern>`` (the pattern must compile)."""
    if value.startswith("regex:"):
        try:
            re.compile(value[len("regex:"):])
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
    elif value not in ("option1", "option2", "options"):
        raise ValueError(f"expected option1, option2, options or regex:<pattern>, got {value!r}")
    return value


@dataclass(frozen=True)
class PatchingOptions:
    """Options of the patching analysis (every one is recorded in provenance; see each field's help).

    ``layers`` None means every layer. With ``noise_samples`` > 1 each prompt gets that many noise draws and the
    corrupted and every restored LD are means over them. ``max_tokens`` bounds the tokens of one forward
    (rows x width); the rows per forward halve on out-of-memory.
    """

    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    components: tuple[str, ...] = option(
        COMPONENTS, "Comma-separated states to patch: resid (layer output), attn, mlp (their contributions).",
        choices=COMPONENTS, parse=parse_list)
    positions: str = option("last", "last: the decision position; grid: each aligned position on its own (position x "
                                    "layer); all: every position at once.", choices=POSITIONS)
    corruption: str = option("counterfactual", "Patch from the counterfactual prompt, or restore clean states into a "
                                               "noised base (Meng et al. 2022).", choices=CORRUPTIONS)
    layers: tuple[int, ...] | None = option(None, "Layers to patch, e.g. '0-5,10' (default: all).", parse=parse_layers)
    window: int = option(1, "Patch/restore this many neighbouring layers around each layer (ROME window).", min=1)
    noise_scale: float = option(3.0, "Noise std as a multiple of the std of the clean embeddings over the span.",
                                min=0)
    noise_std: float | None = option(None, "Absolute noise std (overrides --noise-scale).", min=0)
    noise_samples: int = option(1, "Noise draws per prompt; the corrupted and restored logit differences are their "
                                   "mean (ROME uses 10).", min=1)
    noise_span: str = option("option1", SPAN_HELP, parse=parse_span)
    seed: int = option(0, "Noise seed.")
    atp: bool | None = option(
        None, "Attribution patching beside the exact values (default: on with --positions grid or all, where it "
              "saves work; off at the last position, where the exact values cost about one token each).")
    kv_cache: str = option("auto", "Reuse the prefix's key/value cache when only the last position is patched (auto: "
                                   "where it applies; on: insist; off: full forwards).", choices=KV_CACHE)
    min_gap: float = option(DEFAULT_MIN_GAP, MIN_GAP_HELP, min=0)
    max_tokens: int = max_tokens_field()

    def __post_init__(self) -> None:
        check_values(self)
        if self.kv_cache == "on" and self.positions != "last":
            raise OptionError("kv_cache", "'on' needs positions 'last' (only the last position can reuse the prefix "
                                          "cache)")
