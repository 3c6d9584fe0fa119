"""What the model reads: chat formatting, the answer labels' tokens, context length, tokenization diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .pairs import SIDES, PromptError, PromptPair, PromptSet


def check_context_length(tokenizer: Any, pairs: Sequence[PromptPair], texts: Sequence[str], limit: int,
                         source: str = "its config") -> None:
    """Raise :class:`PromptError` naming every prompt longer than ``limit`` tokens (``texts`` as from
    ``format_pairs``: all base prompts, then all counterfactuals), before any forward pass."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    n = len(pairs)
    problems = [
        f"prompt_id {pairs[i % n].prompt_id!r} ({'base' if i < n else 'counterfactual'}): {length} tokens as the model "
        f"reads it (chat template included), but the model reads at most {limit} ({source}); shorten the prompt or "
        "remove the pair"
        for i, length in enumerate(lengths) if length > limit
    ]
    if problems:
        raise PromptError(problems)



def format_prompt(tokenizer: Any, text: str, chat: bool | None = None) -> str:
    """The exact text given to the model: wrapped in the chat template when there is one (``chat=None``)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat formatting was requested but the tokenizer has no chat template; use --no-chat")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


class LabelTokenError(ValueError):
    """The answer labels do not map to distinct single next tokens."""


def _continuation(tokenizer: Any, text: str, suffix: str) -> list[int] | None:
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + suffix, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix:
        return None
    return full[len(prefix):]


def label_candidates(tokenizer: Any, text: str, label: str) -> list[tuple[str, list[int] | None]]:
    """How ``label`` would continue ``text``: with a leading space, and without."""
    variants = [" " + label, label] if text and not text[-1].isspace() else [label]
    return [(v, _continuation(tokenizer, text, v)) for v in variants]


def resolve_label_tokens(tokenizer: Any, texts: Sequence[str], labels: Sequence[str]) -> list[int]:
    """The single token each label would be emitted as after every formatted prompt.

    For each label the first variant (``" 1"`` after ``"Answer:"``, else ``"1"``) that is one
    token is used. Every prompt must agree, and the labels' tokens must differ.
    """
    chosen: list[int] = []
    for label in labels:
        per_text = set()
        for text in texts:
            options = [ids[0] for _, ids in label_candidates(tokenizer, text, label) if ids and len(ids) == 1]
            if not options:
                shown = ", ".join(f"{v!r} -> {ids}" for v, ids in label_candidates(tokenizer, text, label))
                raise LabelTokenError(
                    f"Cannot find distinct token IDs: label {label!r} is not a single next token after the prompt "
                    f"(tokenizations: {shown}). Use labels that are single tokens for this tokenizer (e.g. --labels A,B), "
                    "or end the prompt so the label follows as one token (run `nnethics tokens` to see the details)."
                )
            per_text.add(options[0])
        if len(per_text) != 1:
            raise LabelTokenError(
                f"Cannot find distinct token IDs: label {label!r} tokenizes differently across prompts ({sorted(per_text)}); "
                "end every prompt the same way (e.g. with 'Answer:')."
            )
        chosen.append(per_text.pop())
    if len(set(chosen)) != len(chosen):
        raise LabelTokenError(
            f"Cannot find distinct token IDs: labels {list(labels)} map to the same token(s) {chosen}; use distinct labels."
        )
    return chosen


def tokenization_report(tokenizer: Any, prompts: PromptSet, chat: bool | None = None, limit: int = 5) -> str:
    """Human-readable diagnostics: label tokens, prompt ends, base/cf length alignment (the seed's analyze_tokenization)."""
    lines = []
    texts = [format_prompt(tokenizer, p.text(s), chat) for p in prompts.pairs for s in SIDES]
    sample = texts[0]
    lines.append(f"prompt set: {prompts.name} ({len(prompts)} pairs), labels {list(prompts.labels)}")
    lines.append(f"chat template: {'on' if sample != prompts.pairs[0].base else 'off'}")
    for label in prompts.labels:
        for variant, ids in label_candidates(tokenizer, sample, label):
            toks = tokenizer.convert_ids_to_tokens(ids) if ids else None
            lines.append(f"  label {label!r} as {variant!r}: ids {ids} tokens {toks}")
    try:
        ids = resolve_label_tokens(tokenizer, texts, prompts.labels)
        lines.append(f"resolved label tokens: {dict(zip(prompts.labels, ids))}")
    except LabelTokenError as e:
        lines.append(f"ERROR: {e}")
    lengths = [(p.prompt_id, len(tokenizer(format_prompt(tokenizer, p.base, chat), add_special_tokens=False)["input_ids"]),
                len(tokenizer(format_prompt(tokenizer, p.cf, chat), add_special_tokens=False)["input_ids"]))
               for p in prompts.pairs]
    same = sum(b == c for _, b, c in lengths)
    lines.append(f"base/cf token lengths equal for {same}/{len(lengths)} pairs (needed for --positions grid)")
    for pid, b, c in lengths[:limit]:
        lines.append(f"  {pid}: base {b} tokens, cf {c} tokens")
    end = tokenizer(sample, add_special_tokens=False)["input_ids"][-8:]
    lines.append(f"last tokens of the first prompt: {tokenizer.convert_ids_to_tokens(end)}")
    return "\n".join(lines)
