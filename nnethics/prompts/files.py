"""Loading and validation of prompt files.

Two input layouts are read:

* the seed's: a folder with ``base_prompts.json`` and ``counterfactual_prompts.json`` (JSON arrays
  of records ``{prompt_id, prompt, ethical_option, [category], [original_id]}``) matched by
  ``prompt_id``;
* one ``.jsonl`` file, one pair per line:
  ``{"prompt_id", "category", "base": {"prompt", "ethical_option"}, "counterfactual": {...}}``, or a structured
  line, the dilemma's parts: ``{"prompt_id", "category", "scenario", "options": [o1, o2], "ethical_option",
  "question"}`` (both kinds may be mixed in one file);
* one MoralChoice CSV (Scherrer et al. 2023), one dilemma per row: ``scenario_id, context, action1, action2``
  (``generation_rule`` is the category; rows of ambiguity ``high`` are refused: they have no favoured action).

A structured line or a CSV row becomes a pair rendered from its parts (:mod:`.parts`); a base/counterfactual pair
carries its parts when its text has the shipped prompts' shape (:func:`~.dilemma.parse_pair`), else it is free text.

Every problem is reported with the file, the record and the fix; nothing is returned (and so
nothing is written downstream) while any problem remains. The record schema is the pydantic models of
:mod:`.schema`; this module words their errors (file, record, fix) and checks what spans records.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dilemma import parse_pair
from .pairs import DEFAULT_LABELS, PromptError, PromptPair, PromptSet
from .parts import STRUCTURED_KEYS, csv_pairs, structured_line
from .schema import (
    JSONL_FIELDS,
    JSONL_REQUIRED,
    SEED_FIELDS,
    SEED_REQUIRED,
    SIDE_FIELDS,
    Errors,
    JsonlRecord,
    LabelProblem,
    SeedRecord,
    nul_problem,
)
from .schema import norm_label as _norm_label

BASE_FILE = "base_prompts.json"
CF_FILE = "counterfactual_prompts.json"


def _read_text(path: Path, problems: list[str], missing: str) -> str | None:
    """The file's text (UTF-8, a leading byte-order mark allowed), or None with a problem recorded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{path}: file not found; {missing}")
        return None
    except IsADirectoryError:
        problems.append(f"{path}: is a folder, not a file; {missing}")
        return None
    except OSError as e:  # a symbolic link loop, no permission, an I/O error: a line, not a traceback
        problems.append(_loop_problem(path) if e.errno == errno.ELOOP else
                        f"{path}: cannot be read ({e.strerror or e}); fix its permissions, or {missing}")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        problems.append(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8")
        return None


def _loop_problem(path: Path) -> str:
    return (f"{path}: is a symbolic link loop (Too many levels of symbolic links: it points back at itself); "
            "point it at the real file, or pass the file itself to --prompts")


def _is_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _read_json(path: Path, problems: list[str]) -> Any:
    text = _read_text(path, problems, f"create it or point --prompts at a folder holding {BASE_FILE} and {CF_FILE}")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the syntax there")
        return None


class LabelMismatch(PromptError):
    """The one problem of the input is that its labels are not --labels: printed as that one line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        ValueError.__init__(self, self.problems[0])


def _fold_label_problems(path: Path, labels: Sequence[str], problems: list[str]) -> list[str]:
    """Many records with labels outside --labels (prompts labelled 1/2 read with --labels A,B) are one mistake:
    one line with the count, the labels found and the flag to pass, instead of one line per record."""
    wrong = [p for p in problems if isinstance(p, LabelProblem)]
    if len(wrong) < 2:
        return problems
    found = sorted({str(p.found) for p in wrong})
    fix = (f"pass --labels {','.join(found)}" if len(found) == 2
           else "pass --labels with the two labels the prompts use, or fix those records")
    line = (f"{path}: {len(wrong)} ethical_option values are not the answer labels --labels {','.join(labels)} "
            f"(the prompts use {', '.join(repr(f) for f in found)}; first: {wrong[0].split(':')[0]}); {fix}")
    return [line] + [p for p in problems if not isinstance(p, LabelProblem)]


def _side_problems(errs: Errors, at: tuple, where: str, problems: list[str]) -> None:
    """The value checks of one side (its prompt, then its label), in that order."""
    for field in ("prompt", "ethical_option"):
        msg = errs.message((*at, field))
        if msg and field == "ethical_option":  # folded into one line when many records have it
            problems.append(LabelProblem(f"{where}: {msg}", _norm_label(errs.value((*at, field)))))
        elif msg:
            problems.append(f"{where}: {msg}")


def _seed_records(path: Path, data: Any, labels: Sequence[str], problems: list[str]) -> dict[str, dict]:
    if data is None:
        return {}
    if not isinstance(data, list):
        problems.append(f"{path}: expected a JSON array of prompt records, got {type(data).__name__}")
        return {}
    out: dict[str, dict] = {}
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected an object with {list(SEED_REQUIRED)}, got {type(rec).__name__}")
            continue
        pid = rec.get("prompt_id")
        if pid is not None:
            where = f"{path} record {i} (prompt_id {pid!r})"
        errs = Errors(SeedRecord, rec, labels)
        missing = [f for f in SEED_REQUIRED if f in errs.fields("missing")]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}; every record needs {list(SEED_REQUIRED)}")
            continue
        unknown = sorted(errs.fields("extra_forbidden"))
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown}; allowed fields are {SEED_FIELDS}")
        if errs.message(("prompt_id",)):
            problems.append(f"{where}: {errs.message(('prompt_id',))}")
            continue
        pid = str(pid)
        if nul := nul_problem(where, rec):  # kept for the pairing check: the input is refused all the same
            problems.append(nul)
        if pid in out:
            problems.append(f"{where}: duplicate prompt_id {pid!r} (first at record {out[pid]['_index']}); ids must be unique")
            continue
        _side_problems(errs, (), where, problems)
        out[pid] = {**rec, "_index": i}
    return out


def _load_seed(folder: Path, labels: Sequence[str], problems: list[str]) -> list[PromptPair]:
    base_path, cf_path = folder / BASE_FILE, folder / CF_FILE
    base = _seed_records(base_path, _read_json(base_path, problems), labels, problems)
    cf = _seed_records(cf_path, _read_json(cf_path, problems), labels, problems)
    if not base or not cf:
        return []
    only_base = [k for k in base if k not in cf]
    only_cf = [k for k in cf if k not in base]
    if only_base:
        problems.append(f"{cf_path}: no counterfactual for prompt_id(s) {only_base}; add them or remove them from {BASE_FILE}")
    if only_cf:
        problems.append(f"{base_path}: no base prompt for prompt_id(s) {only_cf}; add them or remove them from {CF_FILE}")
    pairs = []
    for pid, b in base.items():
        if pid not in cf:
            continue
        c = cf[pid]
        if type(b["prompt_id"]) is not type(c["prompt_id"]):  # 5 and "5": JSON tells them apart, so we do too
            problems.append(f"{cf_path} record {c['_index']}: prompt_id {json.dumps(c['prompt_id'])} is not "
                            f"{base_path} record {b['_index']}'s prompt_id {json.dumps(b['prompt_id'])} (a number and "
                            f"a string); write it the same way in both files, e.g. {json.dumps(pid)}")
            continue
        pairs.append(
            PromptPair(
                prompt_id=pid,
                base=str(b.get("prompt", "")),
                cf=str(c.get("prompt", "")),
                base_ethical=str(_norm_label(b.get("ethical_option"))),
                cf_ethical=str(_norm_label(c.get("ethical_option"))),
                category=str(b.get("category") or c.get("category") or ""),
                original_id=str(c.get("original_id") or b.get("original_id") or ""),
            )
        )
    return pairs


def _load_jsonl(path: Path, labels: Sequence[str], problems: list[str]) -> list[PromptPair]:
    """Long because it words, in order, every problem of a line: syntax, schema, ids, each side."""
    text = _read_text(path, problems, "check the path given to --prompts")
    if text is None:
        return []
    pairs, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON at column {e.colno}: {e.msg}; each line must be one JSON object")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object per line")
            continue
        if any(k in rec for k in STRUCTURED_KEYS):
            pair = structured_line(path, n, rec, labels, problems, seen)
            pairs += [pair] if pair is not None else []
            continue
        errs = Errors(JsonlRecord, rec, labels)
        missing = [f for f in JSONL_REQUIRED if f in errs.fields("missing")]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}; a line needs prompt_id, base and counterfactual "
                            "(or prompt_id, scenario, options and ethical_option)")
            continue
        if errs.message(("prompt_id",)):
            problems.append(f"{where}: {errs.message(('prompt_id',))}; give every pair a unique id like \"harm_001\"")
            continue
        pid = str(rec["prompt_id"])
        where = f"{path} line {n} (prompt_id {pid!r})"
        unknown = sorted(errs.fields("extra_forbidden"))
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown}; allowed fields are {JSONL_FIELDS}")
        if nul := nul_problem(where, rec):  # before the duplicate check: ids that differ after a NUL would merge
            problems.append(nul)
            continue
        if pid in seen:
            problems.append(f"{where}: duplicate prompt_id {pid!r} (first on line {seen[pid]}); ids must be unique")
            continue
        seen[pid] = n
        ok = True
        for side in ("base", "counterfactual"):
            if errs.has("model_type", (side,)):
                problems.append(f"{where}: '{side}' must be an object with {SIDE_FIELDS}")
                ok = False
                continue
            miss, extra = sorted(errs.fields("missing", (side,))), sorted(errs.fields("extra_forbidden", (side,)))
            if miss:
                problems.append(f"{where}: '{side}' is missing {miss}")
                ok = False
                continue
            if extra:
                problems.append(f"{where}: '{side}' has unknown field(s) {extra}; allowed are {SIDE_FIELDS}")
            _side_problems(errs, (side,), f"{where} {side}", problems)
        if ok:
            b, c = rec["base"], rec["counterfactual"]
            pairs.append(
                PromptPair(pid, str(b["prompt"]), str(c["prompt"]), str(_norm_label(b["ethical_option"])),
                           str(_norm_label(c["ethical_option"])), str(rec.get("category") or ""), pid)
            )
    return pairs


def _load_csv(path: Path, labels: Sequence[str], problems: list[str]) -> list[PromptPair]:
    text = _read_text(path, problems, "check the path given to --prompts")
    return [] if text is None else csv_pairs(path, text, labels, problems)


def _files_for(path: Path) -> tuple[str, list[Path]]:
    if _is_loop(path):
        raise PromptError([_loop_problem(path)])
    if path.is_dir():
        if any(os.path.lexists(path / f) for f in (BASE_FILE, CF_FILE)):  # a broken or looping link is read, and named
            return "seed", [path / BASE_FILE, path / CF_FILE]
        found = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.csv"))
        if len(found) == 1:
            return found[0].suffix[1:], found
        if found:
            raise PromptError([f"{path}: cannot tell which prompt file to read (found {len(found)}: name one of them): "
                               f"{', '.join(f.name for f in found)}; e.g. pass {found[0]}"])
        raise PromptError([f"{path}: found no prompt files; expected {BASE_FILE} + {CF_FILE} (seed layout) or exactly "
                           "one .jsonl or MoralChoice .csv file"])
    if path.name in (BASE_FILE, CF_FILE):
        return "seed", [path.parent / BASE_FILE, path.parent / CF_FILE]
    if path.suffix in (".jsonl", ".csv"):
        return path.suffix[1:], [path]
    if not path.exists():
        raise PromptError([f"{path}: no such file or folder; pass a folder with {BASE_FILE} + {CF_FILE}, a .jsonl "
                           "file or a MoralChoice .csv file"])
    raise PromptError([f"{path}: unknown prompt file type; use the seed layout ({BASE_FILE} + {CF_FILE}), a .jsonl "
                       "file or a MoralChoice .csv file"])


def _pair_warnings(path: Path, pairs: Sequence[PromptPair]) -> list[tuple[str, str]]:
    """Pairs that load but cannot work: a counterfactual identical to its base, with the same ethical_option (it
    cannot move the decision) or another one (one text, two ethical answers: every choice is ethical on one side)."""
    out = []
    for p in pairs:
        if p.base.strip() != p.cf.strip():
            continue
        if p.base_ethical == p.cf_ethical:
            out.append((p.prompt_id, f"{path}: prompt_id {p.prompt_id!r}: the counterfactual is identical to the base "
                        f"prompt with the same ethical_option {p.base_ethical!r}, so it cannot move the decision; "
                        "swap the options in the counterfactual"))
        else:
            out.append((p.prompt_id, f"{path}: prompt_id {p.prompt_id!r}: the counterfactual is identical to the base "
                        f"prompt but its ethical_option is {p.cf_ethical!r} where the base's is {p.base_ethical!r}: "
                        "one text with two ethical answers; swap the options in the counterfactual's text"))
    return out


def _folder_warnings(path: Path, kind: str) -> list[tuple[str, str]]:
    """A folder holding the seed files and a .jsonl or .csv as well: which one was read (a note on the input as a
    whole: prompt_id "", printed as ``note: ...``)."""
    others = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.csv")) if path.is_dir() and kind == "seed" else []
    if not others:
        return []
    return [("", f"{path}: read {BASE_FILE} + {CF_FILE} (the seed layout); the folder also holds "
                 f"{', '.join(f.name for f in others)}, not read (pass --prompts {others[0]} to read it instead)")]


def load_prompts(path: str | Path, labels: Sequence[str] = DEFAULT_LABELS) -> PromptSet:
    """Load and validate prompt pairs; raises :class:`PromptError` listing every problem."""
    path = Path(path)
    labels = tuple(str(x) for x in labels)
    if len(labels) != 2 or labels[0] == labels[1]:
        raise PromptError([f"answer labels must be two different strings, got {list(labels)}"])
    if nul := nul_problem("--labels", {f"label {i}": label for i, label in enumerate(labels, 1)}):
        raise PromptError([nul])
    kind, files = _files_for(path)
    problems: list[str] = []
    if kind == "seed":
        pairs = _load_seed(files[0].parent, labels, problems)
    else:
        pairs = (_load_csv if kind == "csv" else _load_jsonl)(files[0], labels, problems)
    if not problems and not pairs:
        problems.append(f"{path}: no prompt pairs found; add at least one pair")
    # a pair written in the shipped prompts' shape carries its parts (scenario, options), for other framings
    pairs = [p if p.dilemma is not None else
             dataclasses.replace(p, dilemma=parse_pair(p.base, p.cf, p.base_ethical, p.cf_ethical, labels))
             for p in pairs]
    if problems:
        folded = _fold_label_problems(path, labels, problems)
        raise PromptError(folded) if len(folded) > 1 or folded == problems else LabelMismatch(folded)
    warnings = (*_folder_warnings(path, kind), *_pair_warnings(path, pairs))
    digest = hashlib.sha256()
    for f in files:
        if kind != "csv":  # a CSV's is the sha256 of its bytes, the checksum its publisher gives
            digest.update(f.name.encode())
        digest.update(f.read_bytes())
    name = path.name if path.is_dir() else path.stem
    if path.is_dir() and path.resolve().name == "prompts":
        name = "nnethics-prompts"
    return PromptSet(tuple(pairs), name=name, sha256=digest.hexdigest(), labels=labels, files=tuple(str(f) for f in files),
                     warnings=warnings)
