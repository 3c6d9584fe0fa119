"""Reliability: a NUL character in a prompt file is refused at validation, naming the file, record and field.

NetCDF strings end at a NUL, so before this check a text with one was stored cut there, and two prompt ids that
differ only after it ("p\\u0000one", "p\\u0000two") passed `prompts check` as two pairs and were stored as one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PROMPTS

from nnethics.cli import cli
from nnethics.prompts import PromptError, load_prompts

FIX = "a NUL character (\\u0000), which a stored result cannot hold (NetCDF strings end at it: the text would be " \
      "cut there); remove it"
BASE, CF = "Should you help? 1) yes 2) no. Answer:", "Should you help? 1) no 2) yes. Answer:"



def _pair(pid="a", base=BASE, cf=CF, category="c"):
    return {"prompt_id": pid, "category": category, "base": {"prompt": base, "ethical_option": "1"},
            "counterfactual": {"prompt": cf, "ethical_option": "2"}}


def _structured(pid="s", scenario="You find a wallet.", options=("Return it.", "Keep it."), question=None):
    rec = {"prompt_id": pid, "category": "c", "scenario": scenario, "options": list(options), "ethical_option": "1"}
    return rec if question is None else {**rec, "question": question}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # NUL written as \u0000
    return path


# (records of a .jsonl file, the line and id the problem names, the field(s) it names)
CASES = [
    ([_pair("ok"), _pair("p\x00one")], 2, "p\\x00one", "'prompt_id' contains"),
    ([_pair("ok"), _pair("x", base=BASE.replace("help", "he\x00lp"))], 2, "x", "'base.prompt' contains"),
    ([_pair("x", cf=CF + "\x00")], 1, "x", "'counterfactual.prompt' contains"),
    ([_pair("x", category="harm\x00care")], 1, "x", "'category' contains"),
    ([_pair("x", base="\x00" + BASE, cf="\x00" + CF)], 1, "x", "'base.prompt', 'counterfactual.prompt' contain"),
    ([_structured("s", scenario="A\x00B")], 1, "s", "'scenario' contains"),
    ([_structured("s", options=("Return it.", "Keep\x00 it."))], 1, "s", "'options[1]' contains"),
    ([_structured("s", question="What\x00 do you do?")], 1, "s", "'question' contains"),
]


@pytest.mark.parametrize("records, line, pid, fields", CASES)
def test_a_nul_in_any_string_of_a_jsonl_line_is_refused_naming_line_and_field(tmp_path, records, line, pid, fields):
    f = _jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(PromptError) as err:
        load_prompts(f)
    assert err.value.problems == [f"{f} line {line} (prompt_id '{pid}'): {fields} {FIX}"]


def test_ids_that_differ_only_after_a_nul_are_refused_by_prompts_check(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [_pair("p\x00one"), _pair("p\x00two")])
    res = CliRunner().invoke(cli, ["prompts", "check", str(f)])
    assert res.exit_code == 2, res.output
    assert "valid pairs" not in res.output
    assert res.output.splitlines()[1:] == [f"  - {f} line 1 (prompt_id 'p\\x00one'): 'prompt_id' contains {FIX}",
                                           f"  - {f} line 2 (prompt_id 'p\\x00two'): 'prompt_id' contains {FIX}"]


def test_run_refuses_a_nul_before_the_model_loads_and_writes_nothing(tmp_path, no_model_load):
    f = _jsonl(tmp_path / "p.jsonl", [_pair("a"), _pair("b", base=BASE + "\x00 trailing")])
    res = CliRunner().invoke(cli, ["run", "--prompts", str(f), "--store", str(tmp_path / "store"),
                                   "--analyses", "decisions"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == f"Error: {f} line 2 (prompt_id 'b'): 'base.prompt' contains {FIX}"
    assert not (tmp_path / "store").exists()


def test_the_seed_layout_names_the_file_and_record(tmp_path):
    base = json.loads((PROMPTS / "base_prompts.json").read_text())[:2]
    cf = json.loads((PROMPTS / "counterfactual_prompts.json").read_text())[:2]
    cf[1]["original_id"] = "orig\x00"
    (tmp_path / "base_prompts.json").write_text(json.dumps(base))
    (tmp_path / "counterfactual_prompts.json").write_text(json.dumps(cf))
    with pytest.raises(PromptError) as err:
        load_prompts(tmp_path)
    pid = cf[1]["prompt_id"]
    assert err.value.problems == [f"{tmp_path / 'counterfactual_prompts.json'} record 1 (prompt_id {pid!r}): "
                                  f"'original_id' contains {FIX}"]


def test_a_moralchoice_csv_row_with_a_nul_is_refused(tmp_path):
    f = tmp_path / "mc.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario_id", "context", "action1", "action2", "generation_rule"])
        w.writerow(["H_001", "You find a wallet.", "Return it.", "Keep it.", "harm"])
        w.writerow(["H_002", "You see a fall.", "Help.", "Walk\x00 on.", "harm"])
    with pytest.raises(PromptError) as err:
        load_prompts(f)
    assert err.value.problems == [f"{f} line 3 (scenario_id 'H_002'): 'action2' contains {FIX}"]


def test_labels_with_a_nul_are_refused(tmp_path):
    with pytest.raises(PromptError) as err:
        load_prompts(_jsonl(tmp_path / "p.jsonl", [_pair("a")]), labels=("1\x00", "2"))
    assert err.value.problems == [f"--labels: 'label 1' contains {FIX}"]


def test_the_same_texts_without_the_nul_load(tmp_path):
    records = [_pair("p-one"), _pair("p-two"), _structured("s")]
    assert load_prompts(_jsonl(tmp_path / "p.jsonl", records)).ids() == ["p-one", "p-two", "s"]
