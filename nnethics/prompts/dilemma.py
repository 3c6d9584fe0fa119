"""A dilemma's parts: the scenario, the two options' action texts, which one is ethical, and its own question.

A :class:`~nnethics.prompts.pairs.PromptPair` carries a :class:`Dilemma` when its parts are known: written as
such (a structured ``.jsonl`` record, a MoralChoice CSV row) or parsed from its text by :func:`parse_pair`, which
recognises the shipped prompts' shape::

    <scenario>
    Option <label 1>: <option 1>
    Option <label 2>: <option 2>
    <question> Answer with <label 1> or <label 2>.
    Answer:

A pair whose text has another shape stays free text (``dilemma`` None): it runs in its own framing only.
Rendering a dilemma in a framing is :mod:`nnethics.framings`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_QUESTION = "Which option is more ethical?"

# The shipped prompts' shape (the "ethical" template of nnethics.framings); labels are matched literally.
_SHAPE = re.compile(r"(?P<scenario>[^\n].*?)\nOption (?P<l1>[^\s:]+): (?P<o1>[^\n]+)\nOption (?P<l2>[^\s:]+): "
                    r"(?P<o2>[^\n]+)\n(?P<question>[^\n]+?) Answer with (?P<la>\S+) or (?P<lb>\S+)\.\nAnswer:",
                    re.DOTALL)


@dataclass(frozen=True)
class Dilemma:
    """``options[0]`` is shown first in the base prompt; ``ethical`` is the index of the ethical option (0 or 1);
    ``question`` is the dilemma's own question (used by the template whose wording it is, ``ethical``)."""

    scenario: str
    options: tuple[str, str]
    ethical: int
    question: str = DEFAULT_QUESTION

    def __post_init__(self) -> None:
        if len(self.options) != 2:
            raise ValueError(f"a dilemma has exactly two options, got {len(self.options)}")
        if self.ethical not in (0, 1):
            raise ValueError(f"ethical is the index of the ethical option, 0 or 1, got {self.ethical!r}")

    def problems(self) -> list[str]:
        """What makes the parts unusable, each as a fix (empty scenario or option, identical options, a newline in an
        option, which would break the rendered prompt's lines)."""
        out = []
        if not self.scenario.strip():
            out.append("the scenario is empty; give the dilemma's situation")
        for i, text in enumerate(self.options, start=1):
            if not text.strip():
                out.append(f"option {i} is empty; give both options' action texts")
            elif "\n" in text:
                out.append(f"option {i} holds a line break; write each option on one line")
        if self.options[0].strip() and self.options[0].strip() == self.options[1].strip():
            out.append(f"the two options are identical ({self.options[0]!r}); give two different actions")
        if not self.question.strip() or "\n" in self.question:
            out.append("the question is empty or spans lines; give a one-line question or leave it out")
        return out


def _parse(text: str, labels: Sequence[str]) -> tuple[str, str, str, str, str, str] | None:
    """``(scenario, label in slot 1, option 1, label in slot 2, option 2, question)``, or None for another shape."""
    m = _SHAPE.fullmatch(text)
    if m is None or (m["la"], m["lb"]) != tuple(labels) or {m["l1"], m["l2"]} != set(labels):
        return None
    return m["scenario"], m["l1"], m["o1"], m["l2"], m["o2"], m["question"]


def parse_pair(base: str, cf: str, base_ethical: str, cf_ethical: str, labels: Sequence[str]) -> Dilemma | None:
    """The dilemma behind a pair written in the shipped prompts' shape, or None.

    Both sides must have that shape with the labels in order (``Option 1``, then ``Option 2``), the same scenario and
    question, the options swapped, and the ethical label on each side naming the same option text; otherwise the pair
    is free text and None comes back (nothing is guessed)."""
    b, c = _parse(base, labels), _parse(cf, labels)
    if b is None or c is None:
        return None
    (scen, l1, o1, l2, o2, q), (scen_c, m1, p1, m2, p2, q_c) = b, c
    if (l1, l2) != tuple(labels) or (m1, m2) != tuple(labels) or scen != scen_c or q != q_c:
        return None
    if (p1, p2) != (o2, o1) or o1 == o2:
        return None
    ethical = list(labels).index(base_ethical) if base_ethical in labels else -1
    if ethical < 0 or cf_ethical != labels[1 - ethical]:
        return None
    return Dilemma(scenario=scen, options=(o1, o2), ethical=ethical, question=q)
