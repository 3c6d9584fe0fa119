"""Prompt loading and validation: every bad-input case names the file, the record and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PROMPTS

from nnethics.prompts import (
    LabelTokenError,
    PromptError,
    format_prompt,
    load_prompts,
    resolve_label_tokens,
)


def _write_seed(folder: Path, base: list, cf: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base_prompts.json").write_text(json.dumps(base))
    (folder / "counterfactual_prompts.json").write_text(json.dumps(cf))
    return folder


def _rec(pid="p1", prompt="Dilemma.\nOption 1: a.\nOption 2: b.\nAnswer:", eth="1", **kw):
    return {"prompt_id": pid, "prompt": prompt, "ethical_option": eth, **kw}


def _problems(path, **kw) -> list[str]:
    with pytest.raises(PromptError) as err:
        load_prompts(path, **kw)
    return err.value.problems


def test_shipped_prompts_are_valid():
    ps = load_prompts(PROMPTS)
    assert len(ps) >= 60
    cats = {p.category for p in ps.pairs}
    assert len(cats) >= 6
    for p in ps.pairs:
        assert p.base_ethical != p.cf_ethical, p.prompt_id  # options swapped, so the ethical label flips
    assert len(ps.sha256) == 64


def test_jsonl_layout(tmp_path):
    ps = load_prompts(PROMPTS / "examples" / "example_pairs.jsonl")
    assert len(ps) == 3 and ps.pairs[0].prompt_id == "example_001"


def test_missing_file(tmp_path):
    (tmp_path / "base_prompts.json").write_text("[]")
    probs = _problems(tmp_path)
    assert any("counterfactual_prompts.json: file not found" in p for p in probs)


def test_invalid_json_reports_line_and_column(tmp_path):
    _write_seed(tmp_path, [_rec()], [_rec(eth="2")])
    (tmp_path / "counterfactual_prompts.json").write_text('[\n  {"prompt_id": "p1",\n  "prompt": }\n]')
    probs = _problems(tmp_path)
    assert any("counterfactual_prompts.json: invalid JSON at line 3, column" in p for p in probs)


def test_missing_and_unknown_fields(tmp_path):
    base = [{"prompt_id": "p1", "prompt": "x"}, _rec("p2", colour="red")]
    _write_seed(tmp_path, base, [_rec("p1", eth="2"), _rec("p2", eth="2")])
    probs = _problems(tmp_path)
    assert any("record 0 (prompt_id 'p1'): missing field(s) ['ethical_option']" in p for p in probs)
    assert any("record 1 (prompt_id 'p2'): unknown field(s) ['colour']" in p for p in probs)


def test_duplicate_ids(tmp_path):
    _write_seed(tmp_path, [_rec("p1"), _rec("p1")], [_rec("p1", eth="2")])
    probs = _problems(tmp_path)
    assert any("duplicate prompt_id 'p1' (first at record 0)" in p and "base_prompts.json record 1" in p for p in probs)


def test_ids_on_one_side_only_are_listed(tmp_path):
    _write_seed(tmp_path, [_rec("p1"), _rec("p2"), _rec("p3")], [_rec("p1", eth="2"), _rec("p9", eth="2")])
    probs = _problems(tmp_path)
    assert any("no counterfactual for prompt_id(s) ['p2', 'p3']" in p for p in probs)
    assert any("no base prompt for prompt_id(s) ['p9']" in p for p in probs)


def test_ethical_option_must_be_a_label(tmp_path):
    _write_seed(tmp_path, [_rec("p1", eth="3")], [_rec("p1", eth="2")])
    probs = _problems(tmp_path)
    assert any("ethical_option '3' is not one of the answer labels ['1', '2']" in p for p in probs)
    # the same files are fine with other labels only if they match
    _write_seed(tmp_path, [_rec("p1", eth="A")], [_rec("p1", eth="B")])
    assert len(load_prompts(tmp_path, labels=("A", "B"))) == 1


def test_integer_labels_are_accepted(tmp_path):
    _write_seed(tmp_path, [_rec("p1", eth=1)], [_rec("p1", eth=2)])
    ps = load_prompts(tmp_path)
    assert ps.pairs[0].base_ethical == "1" and ps.pairs[0].cf_ethical == "2"


def test_empty_prompt(tmp_path):
    _write_seed(tmp_path, [_rec("p1", prompt="  ")], [_rec("p1", eth="2")])
    probs = _problems(tmp_path)
    assert any("'prompt' is empty" in p and "base_prompts.json record 0" in p for p in probs)


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt_id": "a", "base": {"prompt": "x", "ethical_option": "1"},
            "counterfactual": {"prompt": "y", "ethical_option": "2"}}
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps(good),
                            json.dumps({"prompt_id": "b", "base": {"prompt": "x"}, "counterfactual": good["counterfactual"]})]))
    probs = _problems(f)
    assert any("pairs.jsonl line 2: invalid JSON" in p for p in probs)
    assert any("line 3 (prompt_id 'a'): duplicate prompt_id 'a' (first on line 1)" in p for p in probs)
    assert any("line 4 (prompt_id 'b'): 'base' is missing ['ethical_option']" in p for p in probs)


def test_folder_without_prompt_files(tmp_path):
    probs = _problems(tmp_path)
    assert "found no prompt files" in probs[0]


def test_label_tokens_after_chat_template(tokenizer):
    text = format_prompt(tokenizer, "Option 1: a.\nOption 2: b.\nAnswer with 1 or 2.")
    assert text.startswith("<|im_start|>") and text.endswith("assistant\n")
    ids = resolve_label_tokens(tokenizer, [text], ("1", "2"))
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2"]


def test_label_tokens_without_chat_use_the_natural_next_token(tokenizer):
    text = format_prompt(tokenizer, "Which is better?\nAnswer:", chat=False)
    ids = resolve_label_tokens(tokenizer, [text], ("A", "B"))
    # ' A' is one token in this vocabulary, so it is the natural continuation after "Answer:"
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠA", "ĠB"]


def test_labels_that_are_not_single_tokens_fail_clearly(tokenizer):
    text = format_prompt(tokenizer, "Pick one.", chat=False)
    with pytest.raises(LabelTokenError, match="Cannot find distinct token IDs.*supercalifragilistic"):
        resolve_label_tokens(tokenizer, [text], ("supercalifragilistic", "2"))


def _jl(pid="a", **kw) -> str:
    rec = {"prompt_id": pid, "base": {"prompt": "x", "ethical_option": "1"},
           "counterfactual": {"prompt": "y", "ethical_option": "2"}}
    return json.dumps({**rec, **kw})


B, C = "base_prompts.json", "counterfactual_prompts.json"
OK_B, OK_C = [_rec()], [_rec(eth="2")]
# (case, files written into a fresh folder {name: bytes | str | JSON value}, path loaded ("" = the folder),
#  labels, a substring of the expected problem)
BAD_INPUT = [
    ("labels-equal", {B: OK_B, C: OK_C}, "", ("1", "1"), "answer labels must be two different strings, got ['1', '1']"),
    ("labels-three", {B: OK_B, C: OK_C}, "", ("1", "2", "3"), "answer labels must be two different strings"),
    ("no-such-path", {}, "nothing-here", ("1", "2"), "nothing-here: no such file or folder; pass a folder with"),
    ("unknown-type", {"pairs.txt": "x"}, "pairs.txt", ("1", "2"), "pairs.txt: unknown prompt file type"),
    ("two-jsonl", {"a.jsonl": _jl(), "b.jsonl": _jl()}, "", ("1", "2"), "(found 2: name one of them)"),
    ("seed-not-found", {B: OK_B}, "", ("1", "2"), f"{C}: file not found; create it or point --prompts at a folder"),
    ("seed-not-utf8", {B: b"\xff\xfe[]", C: OK_C}, "", ("1", "2"), f"{B} line 1: not UTF-8 text (invalid start byte at byte 0); save the file as UTF-8"),
    ("seed-bad-json", {B: "[{]", C: OK_C}, "", ("1", "2"), f"{B}: invalid JSON at line 1, column 3"),
    ("seed-not-array", {B: {"prompt_id": "p1"}, C: OK_C}, "", ("1", "2"), f"{B}: expected a JSON array of prompt records, got dict"),
    ("seed-record-not-object", {B: ["p1"], C: OK_C}, "", ("1", "2"), f"{B} record 0: expected an object with"),
    ("seed-missing-field", {B: [{"prompt_id": "p1", "prompt": "x"}], C: OK_C}, "", ("1", "2"),
     "record 0 (prompt_id 'p1'): missing field(s) ['ethical_option']; every record needs"),
    ("seed-unknown-field", {B: [_rec(colour="red")], C: OK_C}, "", ("1", "2"),
     "record 0 (prompt_id 'p1'): unknown field(s) ['colour']; allowed fields are"),
    ("seed-empty-id", {B: [_rec(pid="  ")], C: OK_C}, "", ("1", "2"), "prompt_id must be a non-empty string"),
    ("seed-bool-id", {B: [_rec(pid=True)], C: OK_C}, "", ("1", "2"), "prompt_id must be a non-empty string"),
    ("seed-duplicate-id", {B: [_rec(), _rec()], C: OK_C}, "", ("1", "2"), "duplicate prompt_id 'p1' (first at record 0)"),
    ("seed-empty-prompt", {B: [_rec(prompt="")], C: OK_C}, "", ("1", "2"), "'prompt' is empty or not a string"),
    ("seed-prompt-not-string", {B: [_rec(prompt=7)], C: OK_C}, "", ("1", "2"), "'prompt' is empty or not a string"),
    ("seed-ethical-not-label", {B: OK_B, C: [_rec(eth="B")]}, "", ("1", "2"),
     "ethical_option 'B' is not one of the answer labels ['1', '2']; use one of them (or pass --labels"),
    ("seed-bool-ethical", {B: [_rec(eth=True)], C: OK_C}, "", ("1", "2"), "ethical_option True is not one of"),
    ("seed-base-only", {B: [_rec(), _rec("p2")], C: OK_C}, "", ("1", "2"), "no counterfactual for prompt_id(s) ['p2']"),
    ("seed-cf-only", {B: OK_B, C: [_rec(eth="2"), _rec("p2", eth="2")]}, "", ("1", "2"), "no base prompt for prompt_id(s) ['p2']"),
    ("seed-empty", {B: [], C: []}, "", ("1", "2"), "no prompt pairs found; add at least one pair"),
    ("jsonl-not-found", {}, "missing.jsonl", ("1", "2"), "missing.jsonl: file not found"),
    ("jsonl-bad-json", {"p.jsonl": "{oops"}, "p.jsonl", ("1", "2"), "p.jsonl line 1: invalid JSON at column 2"),
    ("jsonl-not-object", {"p.jsonl": "[1, 2]"}, "p.jsonl", ("1", "2"), "p.jsonl line 1: expected a JSON object per line"),
    ("jsonl-missing-field", {"p.jsonl": json.dumps({"prompt_id": "a", "base": {}})}, "p.jsonl", ("1", "2"),
     "line 1: missing field(s) ['counterfactual']; a line needs prompt_id, base and counterfactual"),
    ("jsonl-unknown-field", {"p.jsonl": _jl(colour="red")}, "p.jsonl", ("1", "2"),
     "line 1 (prompt_id 'a'): unknown field(s) ['colour']; allowed fields are"),
    ("jsonl-duplicate-id", {"p.jsonl": _jl() + "\n\n" + _jl()}, "p.jsonl", ("1", "2"),
     "line 3 (prompt_id 'a'): duplicate prompt_id 'a' (first on line 1)"),
    ("jsonl-side-not-object", {"p.jsonl": _jl(base="text")}, "p.jsonl", ("1", "2"), "'base' must be an object with"),
    ("jsonl-side-missing", {"p.jsonl": _jl(counterfactual={"prompt": "y"})}, "p.jsonl", ("1", "2"),
     "'counterfactual' is missing ['ethical_option']"),
    ("jsonl-side-unknown", {"p.jsonl": _jl(counterfactual={"prompt": "y", "ethical_option": "2", "z": 1})}, "p.jsonl",
     ("1", "2"), "'counterfactual' has unknown field(s) ['z']; allowed are"),
    ("jsonl-side-bad-label", {"p.jsonl": _jl(base={"prompt": "x", "ethical_option": "3"})}, "p.jsonl", ("1", "2"),
     "line 1 (prompt_id 'a') base: ethical_option '3' is not one of the answer labels"),
    ("jsonl-side-empty-prompt", {"p.jsonl": _jl(counterfactual={"prompt": " ", "ethical_option": "2"})}, "p.jsonl",
     ("1", "2"), "line 1 (prompt_id 'a') counterfactual: 'prompt' is empty or not a string"),
    ("jsonl-empty", {"p.jsonl": "\n\n"}, "p.jsonl", ("1", "2"), "no prompt pairs found"),
]


@pytest.mark.parametrize("files, target, labels, message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gives_its_message(tmp_path, files, target, labels, message):
    for name, content in files.items():
        f = tmp_path / name
        if isinstance(content, bytes):
            f.write_bytes(content)
        elif isinstance(content, str):
            f.write_text(content, encoding="utf-8")
        else:
            f.write_text(json.dumps(content), encoding="utf-8")
    probs = _problems(tmp_path / target if target else tmp_path, labels=labels)
    assert any(message in p for p in probs), probs


def test_wrong_labels_for_a_whole_prompt_set_are_one_line_with_the_fix():
    """The shipped prompts (labelled 1/2) read with --labels A,B: one line with the count and the flag to pass,
    not one line per record (exit code 2 through the CLI)."""
    from click.testing import CliRunner

    from nnethics.cli import cli

    probs = _problems(PROMPTS, labels=("A", "B"))
    assert len(probs) == 1
    n = 2 * len(load_prompts(PROMPTS))
    assert f"{n} ethical_option values are not the answer labels --labels A,B" in probs[0]
    assert probs[0].endswith("pass --labels 1,2")
    res = CliRunner().invoke(cli, ["prompts", "check", str(PROMPTS), "--labels", "A,B"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "pass --labels 1,2" in res.output and "more" not in res.output


def test_the_record_schema_is_pydantic_and_its_errors_carry_the_fix():
    """files.py words the schema's errors; the value checks' messages are the fixes the user reads."""
    from nnethics.prompts.schema import JSONL_FIELDS, SEED_FIELDS, SIDE_FIELDS, Errors, JsonlRecord, SeedRecord

    assert SEED_FIELDS == ["category", "ethical_option", "original_id", "prompt", "prompt_id"]
    assert JSONL_FIELDS == ["base", "category", "counterfactual", "prompt_id"] and SIDE_FIELDS == ["ethical_option", "prompt"]
    ok = {"prompt_id": 1, "base": {"prompt": "p", "ethical_option": 1}, "counterfactual": {"prompt": "q", "ethical_option": "2"}}
    assert Errors(JsonlRecord, ok, ["1", "2"]).errors == []
    bad = Errors(JsonlRecord, {**ok, "x": 0, "counterfactual": {"prompt": " ", "ethical_option": "3"}}, ["1", "2"])
    assert bad.fields("extra_forbidden") == ["x"]
    assert bad.message(("counterfactual", "prompt")) == "'prompt' is empty or not a string; give the dilemma text"
    assert bad.message(("counterfactual", "ethical_option")).startswith("ethical_option '3' is not one of the answer labels")
    assert Errors(SeedRecord, {"prompt_id": True, "prompt": "p"}, ["1", "2"]).fields("missing") == ["ethical_option"]
