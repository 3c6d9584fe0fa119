"""Which tokens noise corruption (Meng et al. 2022) covers, and its per-prompt seeds.

A span is named in the options and found in each formatted prompt by character offsets:

* ``option1`` / ``option2``: the line of the first / second answer option (``Option <label>: ...``,
  case-insensitive, up to the end of the line);
* ``options``: from the start of the first option line to the end of the second;
* ``regex:<pattern>``: the first match of a Python regular expression (multiline mode).

The tokens whose character ranges overlap the match are corrupted. A prompt where the span is not
found is skipped with the reason stored.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

SPANS = ("option1", "option2", "options")


class SpanError(ValueError):
    """The span could not be located in a prompt."""


def _option_line(label: str) -> str:
    return rf"(?im)^[ \t]*option[ \t]*{re.escape(label)}\b[^\n]*"


def span_chars(text: str, span: str, labels: Sequence[str]) -> tuple[int, int]:
    """Character range ``[start, end)`` of ``span`` in ``text``."""
    if span.startswith("regex:"):
        m = re.search(span[len("regex:"):], text, flags=re.MULTILINE)
        if not m or m.end() == m.start():
            raise SpanError(f"pattern {span[len('regex:'):]!r} does not match")
        return m.start(), m.end()
    if span not in SPANS:
        raise ValueError(f"unknown noise span {span!r}; use one of {SPANS} or 'regex:<pattern>'")
    found = []
    for label in labels[:2]:
        m = re.search(_option_line(label), text)
        if not m:
            raise SpanError(f"no line 'Option {label}: ...' in the prompt")
        found.append((m.start() + len(m.group(0)) - len(m.group(0).lstrip()), m.end()))
    if span == "option1":
        return found[0]
    if span == "option2":
        return found[1]
    return min(found[0][0], found[1][0]), max(found[0][1], found[1][1])


def span_tokens(tokenizer: Any, text: str, tokens: Sequence[int], chars: tuple[int, int]) -> tuple[int, int]:
    """Token range ``[start, end)`` (from the start of ``tokens``) of the tokens overlapping ``chars``.

    ``tokens`` are the ids the model runs (possibly with a BOS the tokenizer call adds nothing for);
    they must end with the tokenization of ``text``.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as e:
        raise SpanError(f"the tokenizer gives no character offsets ({e})") from None
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    shift = len(tokens) - len(ids)
    if shift < 0 or list(tokens[shift:]) != ids:
        raise SpanError("the tokenization with offsets differs from the model input")
    lo, hi = chars
    hit = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
    if not hit:
        raise SpanError("no token covers the span")
    return shift + hit[0], shift + hit[-1] + 1


def pair_seed(seed: int, prompt_id: str, sample: int = 0) -> int:
    """A per-prompt seed that does not depend on how prompts are chunked or ordered; ``sample`` numbers
    the noise draws of one prompt (draw 0 is the same whatever the number of draws)."""
    return (int(seed) * 1_000_003 + zlib.crc32(prompt_id.encode("utf-8")) + int(sample) * 7_919) % (2**31 - 1)


def restore_layers(n_layers: int, layer: int, window: int = 1) -> tuple[int, ...]:
    """ROME's window around ``layer``: ``max(0, l - w//2) .. min(L, l + ceil(w/2))`` (exclusive)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))
