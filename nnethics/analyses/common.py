"""Shared plumbing for the analyses: encoding prompt pairs into left-padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..prompts import SIDES, PromptPair, format_prompt, resolve_label_tokens

if TYPE_CHECKING:  # imported when encoding, so declaring analyses needs no torch
    import torch


@dataclass
class Encoded:
    """A left-padded batch. ``input_ids``/``attention_mask``/``position_ids`` are ``[N, T]``;
    ``lengths[i]`` is row i's real token count, so position -1 is every row's last real token."""

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]

    def inputs(self, rows: Sequence[int] | slice | None = None) -> dict[str, torch.Tensor]:
        sel = slice(None) if rows is None else rows
        ids, mask, pos = self.input_ids[sel], self.attention_mask[sel], self.position_ids[sel]
        if isinstance(sel, slice) or len(ids) == 0:
            width = int(mask.sum(-1).max()) if len(ids) else 0
        else:
            width = int(mask.sum(-1).max())
        # drop columns that are padding in every selected row
        return {"input_ids": ids[:, -width:], "attention_mask": mask[:, -width:], "position_ids": pos[:, -width:]}

    def tokens(self, row: int) -> list[int]:
        n = self.lengths[row]
        return self.input_ids[row, -n:].tolist() if n else []


def left_pad(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with ``pad`` to ``width``: ``(ids, mask)``, both ``[len(rows), width]`` long."""
    import torch

    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r))
            mask[i, width - len(r):] = 1
    return ids, mask


def encode(tokenizer: Any, texts: Sequence[str], device: Any = None) -> Encoded:
    """Tokenize formatted texts (no special tokens added: the chat template carries its own) with left padding."""

    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if getattr(tokenizer, "bos_token_id", None) is not None and getattr(tokenizer, "add_bos_token", False):
        rows = [r if r[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *r] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(rows, max(len(r) for r in rows), pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return Encoded(list(texts), ids, mask, pos, [len(r) for r in rows])


@dataclass
class PairBatch:
    """Pairs encoded as one batch: rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}]``."""

    pairs: list[PromptPair]
    encoded: Encoded
    label_ids: list[int]

    @property
    def n(self) -> int:
        return len(self.pairs)

    def row(self, i: int, side: str) -> int:
        return i if side == "base" else self.n + i


def format_pairs(tokenizer: Any, pairs: Sequence[PromptPair], chat: bool | None) -> list[str]:
    return [format_prompt(tokenizer, p.text(s), chat) for s in SIDES for p in pairs]


def encode_pairs(model: Any, pairs: Sequence[PromptPair], labels: Sequence[str], chat: bool | None = None,
                 label_ids: Sequence[int] | None = None) -> PairBatch:
    texts = format_pairs(model.tokenizer, pairs, chat)
    if label_ids is None:
        label_ids = resolve_label_tokens(model.tokenizer, texts, labels)
    return PairBatch(list(pairs), encode(model.tokenizer, texts, device=model.input_device), list(label_ids))

