"""Pairs from a dilemma's parts: structured ``.jsonl`` lines and MoralChoice CSV rows.

Such a pair's base and counterfactual texts are its :class:`~.dilemma.Dilemma` rendered in the default framing
(:data:`nnethics.framings.DEFAULT`: the ``ethical`` template, the labels in order), the very text
``framings.frame`` gives, and it carries the dilemma, so it runs in every framing. :mod:`.files` reads the files
and calls these per line or per file; every problem names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from .dilemma import DEFAULT_QUESTION, Dilemma
from .pairs import PromptPair
from .schema import (
    CSV_OPTIONAL,
    CSV_REQUIRED,
    STRUCTURED_FIELDS,
    STRUCTURED_REQUIRED,
    Errors,
    LabelProblem,
    StructuredRecord,
    nul_problem,
)
from .schema import norm_label as _norm_label

STRUCTURED_KEYS = ("scenario", "options")  # a .jsonl line with either is a structured record


def rendered(pid: str, category: str, dilemma: Dilemma, labels: Sequence[str]) -> PromptPair:
    """The pair of a dilemma: its texts are the default framing's (the ``ethical`` template, ``labels`` in order)."""
    from ..framings import DEFAULT, LABEL_SETS, TEMPLATES, Framing  # here: nnethics.framings imports this package

    template, _, order = DEFAULT.split(".")
    labels = (str(labels[0]), str(labels[1]))
    label_set = next((k for k, v in LABEL_SETS.items() if v == labels), ",".join(labels))
    framing = Framing(template, TEMPLATES[template], label_set, labels, order)
    return framing.render(PromptPair(pid, "", "", "", "", category, pid, dilemma))


def _dilemma(d: Dilemma, where: str, problems: list[str]) -> Dilemma | None:
    """``d``, or None with one problem line per unusable part (empty or identical options, empty scenario)."""
    found = d.problems()
    problems.extend(f"{where}: {p}" for p in found)
    return None if found else d


def structured_line(path: Path, n: int, rec: dict, labels: Sequence[str], problems: list[str],
                     seen: dict[str, int]) -> PromptPair | None:
    """A structured ``.jsonl`` line (scenario, options, ethical_option) as its pair, or None with its problems."""
    where = f"{path} line {n}"
    both = [k for k in ("base", "counterfactual") if k in rec]
    if both:
        problems.append(f"{where}: has both {both} and {[k for k in STRUCTURED_KEYS if k in rec]}; write a pair either "
                        "as base and counterfactual texts or as its parts (scenario, options, ethical_option)")
        return None
    errs = Errors(StructuredRecord, rec, labels)
    missing = [f for f in STRUCTURED_REQUIRED if f in errs.fields("missing")]
    if missing:
        problems.append(f"{where}: missing field(s) {missing}; a structured line needs {list(STRUCTURED_REQUIRED)}")
        return None
    if errs.message(("prompt_id",)):
        problems.append(f"{where}: {errs.message(('prompt_id',))}; give every pair a unique id like \"harm_001\"")
        return None
    pid = str(rec["prompt_id"])
    where = f"{path} line {n} (prompt_id {pid!r})"
    unknown = sorted(errs.fields("extra_forbidden"))
    if unknown:
        problems.append(f"{where}: unknown field(s) {unknown}; allowed fields of a structured line are "
                        f"{STRUCTURED_FIELDS}")
    if nul := nul_problem(where, rec):  # before the duplicate check: ids that differ after a NUL would merge
        problems.append(nul)
        return None
    if pid in seen:
        problems.append(f"{where}: duplicate prompt_id {pid!r} (first on line {seen[pid]}); ids must be unique")
        return None
    seen[pid] = n
    bad = [f"{where}: {errs.message((f,))}" for f in ("scenario", "options", "question") if errs.message((f,))]
    problems.extend(bad)
    if errs.message(("ethical_option",)):  # folded into one line when many records have it
        problems.append(LabelProblem(f"{where}: {errs.message(('ethical_option',))}",
                                      _norm_label(errs.value(("ethical_option",)))))
        return None
    if bad:
        return None
    question = DEFAULT_QUESTION if rec.get("question") is None else rec["question"]
    d = _dilemma(Dilemma(rec["scenario"], (rec["options"][0], rec["options"][1]),
                         list(labels).index(_norm_label(rec["ethical_option"])), question), where, problems)
    return None if d is None else rendered(pid, str(rec.get("category") or ""), d, labels)


def _csv_rows(path: Path, text: str, problems: list[str]):
    """``(line where the row starts, row)`` of a CSV text, the header checked first (a problem and nothing else when
    a column is missing)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    need = ", ".join(CSV_REQUIRED)
    try:
        header = reader.fieldnames
        if not header:
            problems.append(f"{path}: empty file; a MoralChoice CSV starts with the header line {need}, ...")
            return
        missing = [c for c in CSV_REQUIRED if c not in header]
        if missing:
            problems.append(f"{path}: missing column(s) {missing} (the header has {list(header)}); a MoralChoice CSV "
                            f"needs the columns {need} (and optionally {', '.join(CSV_OPTIONAL)}): use MoralChoice's "
                            "own file or rename the columns")
            return
        start = reader.line_num + 1
        for row in reader:
            yield start, {k: (v or "") for k, v in row.items() if k is not None}
            start = reader.line_num + 1
    except csv.Error as e:
        problems.append(f"{path} line {reader.line_num}: invalid CSV ({e}); fix the quoting there")


def csv_pairs(path: Path, text: str, labels: Sequence[str], problems: list[str]) -> list[PromptPair]:
    """The pairs of a MoralChoice CSV's text: per row, ``context`` is the scenario and ``action1`` (the favoured
    action of a low-ambiguity row) the ethical option, shown first; ``generation_rule`` is the category."""
    pairs, seen, ambiguous = [], {}, []
    for n, row in _csv_rows(path, text, problems):
        sid = row["scenario_id"].strip()
        if not sid:
            problems.append(f"{path} line {n}: empty scenario_id; give every row a unique id")
            continue
        where = f"{path} line {n} (scenario_id {sid!r})"
        if nul := nul_problem(where, {k: row[k] for k in (*CSV_REQUIRED, *CSV_OPTIONAL) if k in row}):
            problems.append(nul)
            continue
        if sid in seen:
            problems.append(f"{where}: duplicate scenario_id {sid!r} (first on line {seen[sid]}); ids must be unique")
            continue
        seen[sid] = n
        ambiguity = row.get("ambiguity", "").strip()
        if ambiguity.lower() not in ("", "low"):
            ambiguous.append((n, sid, ambiguity))
            continue
        d = _dilemma(Dilemma(row["context"], (row["action1"], row["action2"]), 0), where, problems)
        if d is not None:
            pairs.append(rendered(sid, row.get("generation_rule", ""), d, labels))
    if ambiguous:
        n, sid, value = ambiguous[0]
        rows = (f"line {n} (scenario_id {sid!r}) has" if len(ambiguous) == 1 else
                f"{len(ambiguous)} rows (first: line {n}, scenario_id {sid!r}) have")
        problems.append(f"{path}: {rows} ambiguity {value!r}: such a dilemma has no favoured action, so no ethical "
                        "option to measure; use MoralChoice's low-ambiguity file (moralchoice_low_ambiguity.csv) or "
                        "remove those rows")
    return pairs
