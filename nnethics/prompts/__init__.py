"""Prompt pairs: loading, validation, chat formatting and answer-token resolution.

* :mod:`.pairs`: ``PromptPair``, ``PromptSet``, ``PromptError`` (values, no I/O);
* :mod:`.files`: ``load_prompts`` reads and validates the seed's two JSON files, one ``.jsonl`` file (texts or
  structured records) or one MoralChoice ``.csv`` file;
* :mod:`.dilemma`: ``Dilemma``, a pair's parts (scenario, options), for the framings;
* :mod:`.parts`: pairs from parts (structured ``.jsonl`` lines, MoralChoice CSV rows);
* :mod:`.tokens`: ``format_prompt`` (chat template), ``resolve_label_tokens``, ``check_context_length`` and
  the ``nnethics tokens`` diagnostics.
"""

from __future__ import annotations

from .files import BASE_FILE, CF_FILE, load_prompts
from .pairs import DEFAULT_LABELS, SIDES, PromptError, PromptPair, PromptSet
from .tokens import (
    LabelTokenError,
    check_context_length,
    format_prompt,
    label_candidates,
    resolve_label_tokens,
    tokenization_report,
)

__all__ = ["BASE_FILE", "CF_FILE", "DEFAULT_LABELS", "SIDES", "LabelTokenError", "PromptError", "PromptPair",
           "PromptSet", "check_context_length", "format_prompt", "label_candidates", "load_prompts",
           "resolve_label_tokens", "tokenization_report"]
