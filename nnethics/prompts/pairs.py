"""Prompt pairs as values: a dilemma and its counterfactual, a validated set of them, and the error that lists
every problem of an input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .dilemma import Dilemma

SIDES = ("base", "cf")
DEFAULT_LABELS = ("1", "2")
MAX_LISTED = 25


class PromptError(ValueError):
    """Invalid prompt input. ``problems`` lists every problem found, each naming file, record and fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        text = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        if len(self.problems) == 1:  # one problem: one line (the file, the record and the fix)
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the prompt input:\n{text}")


@dataclass(frozen=True)
class PromptPair:
    """A dilemma and its counterfactual (same dilemma, options swapped or changed)."""

    prompt_id: str
    base: str
    cf: str
    base_ethical: str
    cf_ethical: str
    category: str = ""
    original_id: str = ""
    dilemma: Dilemma | None = None  # its parts, when known (nnethics.framings renders it in other framings)

    def text(self, side: str) -> str:
        return self.base if side == "base" else self.cf

    def ethical(self, side: str) -> str:
        return self.base_ethical if side == "base" else self.cf_ethical


@dataclass(frozen=True)
class PromptSet:
    """Validated pairs plus what provenance needs: a name, the files read and their sha256."""

    pairs: tuple[PromptPair, ...]
    name: str
    sha256: str
    labels: tuple[str, ...] = DEFAULT_LABELS
    files: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[tuple[str, str], ...] = ()  # (prompt_id, message): pairs that load but look wrong; ("", note)
    framing: str = ""  # the framing id the pairs were rendered in (nnethics.framings.frame), "" for their own text

    def __len__(self) -> int:
        return len(self.pairs)

    def ids(self) -> list[str]:
        return [p.prompt_id for p in self.pairs]

    def subset(self, limit: int | None = None, ids: Sequence[str] | None = None) -> PromptSet:
        pairs = self.pairs
        if ids is not None:
            wanted = set(ids)
            pairs = tuple(p for p in pairs if p.prompt_id in wanted)
        if limit is not None:
            pairs = pairs[:limit]
        kept = {p.prompt_id for p in pairs}
        return PromptSet(pairs, self.name, self.sha256, self.labels, self.files,
                         tuple(w for w in self.warnings if w[0] in kept or w[0] == ""), self.framing)
