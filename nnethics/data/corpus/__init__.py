"""Text corpora for training tuned lenses: the shipped default, reading user files, splitting, tokenizing.

A corpus is one or more UTF-8 text files; documents are separated by blank lines. The held-out split is
made at the document level with a seeded permutation, so training and evaluation never share a document
and the same (files, seed, fraction) always give the same split.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_FILES = ("moralchoice.txt", "nnethics_prompts.txt")


class CorpusError(ValueError):
    """A corpus file is missing, unreadable or empty."""


def default_files() -> list[Path]:
    """The shipped corpus: MoralChoice scenarios (MIT) and nnethics' own prompts; see README.md here."""
    return [HERE / name for name in DEFAULT_FILES]


def read_documents(files: Sequence[str | Path] | None = None) -> tuple[list[str], str]:
    """Documents of the given files (default: the shipped corpus) and the sha256 of their bytes, in order."""
    files = [Path(f) for f in files] if files else default_files()
    digest = hashlib.sha256()
    docs: list[str] = []
    for f in files:
        try:
            raw = f.expanduser().read_bytes()
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {f}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorpusError(f"corpus file {f} is not UTF-8 text") from None
        digest.update(raw)
        docs.extend(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())
    if not docs:
        raise CorpusError(f"the corpus {[str(f) for f in files]} holds no text")
    return docs, digest.hexdigest()


def split_documents(docs: Sequence[str], heldout: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: a seeded shuffle of the documents, ``heldout`` of them (at least one) held out."""
    if not 0 < heldout < 1:
        raise CorpusError(f"the held-out fraction must be between 0 and 1, got {heldout}")
    if len(docs) < 2:
        raise CorpusError("the corpus needs at least two documents (separate them with a blank line)")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_held = min(len(docs) - 1, max(1, round(heldout * len(docs))))
    return [docs[i] for i in order[n_held:]], [docs[i] for i in order[:n_held]]


def chat_documents(tokenizer: Any, docs: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``docs`` with a seeded ``fraction`` of them wrapped in the tokenizer's chat template, each as a user
    turn followed by the assistant header, so the lens also sees the position the analyses decode at (the
    last prompt token of a chat-formatted prompt). Unchanged when the tokenizer has no chat template."""
    if not 0 <= fraction <= 1:
        raise CorpusError(f"the chat fraction must be between 0 and 1, got {fraction}")
    if not fraction or not getattr(tokenizer, "chat_template", None):
        return list(docs)
    from ...prompts import format_prompt

    chosen = set(np.random.default_rng(seed + 1).permutation(len(docs))[:round(fraction * len(docs))].tolist())
    return [format_prompt(tokenizer, d, chat=True) if i in chosen else d for i, d in enumerate(docs)]


def token_windows(tokenizer: Any, docs: Sequence[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Concatenate the documents (each followed by a blank line) and cut the token stream into windows of
    ``seq_len`` tokens, at most ``max_tokens`` tokens in all; a shorter last window is dropped unless it
    is the only one."""
    if seq_len < 2:
        raise CorpusError(f"windows need at least 2 tokens, got seq_len={seq_len}")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    windows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    if len(windows) > 1 and len(windows[-1]) < seq_len:
        windows.pop()
    if not windows or len(windows[0]) < 2:
        raise CorpusError("the corpus is too short to make a training window")
    return windows
