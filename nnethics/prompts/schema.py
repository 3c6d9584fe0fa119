"""The prompt records' schema as pydantic models; :mod:`.files` turns their errors into today's messages.

A record is validated with ``model_validate(record, context={"labels": labels})``; every check of one
record (missing and unknown fields, a side that is not an object, an empty prompt, a label that is not
an answer label, an unusable ``prompt_id``) is one pydantic error, whose message (for the value checks)
is the fix the user reads. Duplicates and the pairing of the seed's two files span records, so
:mod:`.files` checks them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator


def norm_label(value: Any) -> Any:
    """A label as the string the prompt files mean: ``1`` and ``"1"`` are the same label."""
    return str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else value


def valid_id(pid: Any) -> bool:
    return isinstance(pid, (str, int)) and not isinstance(pid, bool) and str(pid).strip() != ""


NUL = "\x00"


def nul_fields(value: Any, at: str = "") -> list[str]:
    """Where the strings of a record hold a NUL character (``prompt_id``, ``base.prompt``, ``options[1]``), in order."""
    if isinstance(value, str):
        return [at] if NUL in value else []
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in nul_fields(v, f"{at}.{k}" if at else str(k))]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in nul_fields(v, f"{at}[{i}]")]
    return []


def nul_problem(where: str, record: Any) -> str | None:
    """The problem line of a record whose strings hold a NUL, else None. A stored result cannot hold one: NetCDF
    strings end at it, so a text would be stored cut there and two ids that differ only after it would merge."""
    found = nul_fields(record)
    if not found:
        return None
    names = ", ".join(f"'{f}'" for f in found)
    return (f"{where}: {names} contain{'s' if len(found) == 1 else ''} a NUL character (\\u0000), which a stored "
            "result cannot hold (NetCDF strings end at it: the text would be cut there); remove it")


class Side(BaseModel):
    """One side of a pair: the dilemma text and which answer label is the ethical one."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any
    ethical_option: Any

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            raise ValueError("'prompt' is empty or not a string; give the dilemma text")
        return v

    @field_validator("ethical_option")
    @classmethod
    def _label(cls, v: Any, info: ValidationInfo) -> Any:
        labels = list((info.context or {}).get("labels", ()))
        if norm_label(v) not in labels:
            raise ValueError(f"ethical_option {v!r} is not one of the answer labels {labels}; "
                             "use one of them (or pass --labels to match your prompts)")
        return v


class SeedRecord(Side):
    """A record of the seed's ``base_prompts.json`` / ``counterfactual_prompts.json``."""

    prompt_id: Any
    category: Any = None
    original_id: Any = None

    @field_validator("prompt_id")
    @classmethod
    def _id(cls, v: Any) -> Any:
        if not valid_id(v):
            raise ValueError(f"prompt_id must be a non-empty string, got {json.dumps(v)}")
        return v


class JsonlRecord(BaseModel):
    """One line of a ``.jsonl`` prompt file."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: Any
    category: Any = None
    base: Side
    counterfactual: Side

    _id = field_validator("prompt_id")(SeedRecord._id.__func__)


class StructuredRecord(BaseModel):
    """A ``.jsonl`` line written as a dilemma's parts; ``ethical_option`` is the label beside the ethical option in
    the base prompt, where the options are shown in the order given (``options[0]`` beside the first label)."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: Any
    category: Any = None
    scenario: Any
    options: Any
    ethical_option: Any
    question: Any = None

    _id = field_validator("prompt_id")(SeedRecord._id.__func__)
    _label = field_validator("ethical_option")(Side._label.__func__)

    @field_validator("scenario")
    @classmethod
    def _scenario(cls, v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError(f"'scenario' must be a string, got {json.dumps(v)}; give the dilemma's situation")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: Any) -> Any:
        if not isinstance(v, list) or len(v) != 2 or not all(isinstance(o, str) for o in v):
            raise ValueError(f"'options' must be a list of two strings (the two actions), got {json.dumps(v)}")
        return v

    @field_validator("question")
    @classmethod
    def _question(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            raise ValueError(f"'question' must be a string, got {json.dumps(v)}; give a one-line question or leave "
                             "it out")
        return v


SEED_REQUIRED = ("prompt_id", "prompt", "ethical_option")
JSONL_REQUIRED = ("prompt_id", "base", "counterfactual")
STRUCTURED_REQUIRED = ("prompt_id", "scenario", "options", "ethical_option")
SEED_FIELDS = sorted(SeedRecord.model_fields)
JSONL_FIELDS = sorted(JsonlRecord.model_fields)
SIDE_FIELDS = sorted(Side.model_fields)
STRUCTURED_FIELDS = sorted(StructuredRecord.model_fields)
# MoralChoice (Scherrer et al. 2023) CSV: the columns read; the others (a1_death, ...) are ignored
CSV_REQUIRED = ("scenario_id", "context", "action1", "action2")
CSV_OPTIONAL = ("ambiguity", "generation_rule")


class LabelProblem(str):
    """A problem line (of :mod:`.files`) for an ethical_option outside --labels; remembers the label so many of them fold into one."""

    def __new__(cls, text: str, found: Any) -> LabelProblem:
        obj = super().__new__(cls, text)
        obj.found = found
        return obj


class Errors:
    """A record's pydantic errors, looked up by where they are (``loc``) and what they are (``type``)."""

    def __init__(self, model: type[BaseModel], record: dict, labels: Sequence[str]) -> None:
        try:
            model.model_validate(record, context={"labels": list(labels)})
            self.errors: list[dict] = []
        except ValidationError as e:
            self.errors = e.errors(include_url=False)

    def fields(self, kind: str, at: tuple = ()) -> list[str]:
        """Field names directly under ``at`` with an error of type ``kind`` (e.g. missing, extra_forbidden)."""
        return [str(e["loc"][-1]) for e in self.errors if e["type"] == kind and tuple(e["loc"][:-1]) == at]

    def has(self, kind: str, at: tuple) -> bool:
        return any(e["type"] == kind and tuple(e["loc"]) == at for e in self.errors)

    def value(self, at: tuple) -> Any:
        """The input a value check at ``at`` refused."""
        return next((e["input"] for e in self.errors if tuple(e["loc"]) == at and e["type"] == "value_error"), None)

    def message(self, at: tuple) -> str | None:
        """The fix written by a value check at ``at`` (without pydantic's "Value error, " prefix)."""
        for e in self.errors:
            if tuple(e["loc"]) == at and e["type"] == "value_error":
                return str(e["ctx"]["error"])
        return None
