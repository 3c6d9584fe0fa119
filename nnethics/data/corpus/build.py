"""Regenerate the default lens-training corpus files in this folder.

    python -m nnethics.data.corpus.build --moralchoice DIR_WITH_MORALCHOICE_CSVS [--prompts prompts]

Writes ``moralchoice.txt`` (one document per MoralChoice scenario: context, then both actions, one per
line) and ``nnethics_prompts.txt`` (the shipped base prompts). Documents are separated by a blank line.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _clean(text: str) -> str:
    return " ".join(text.split())


def moralchoice_documents(folder: Path) -> list[str]:
    docs = []
    for name in ("moralchoice_low_ambiguity.csv", "moralchoice_high_ambiguity.csv"):
        with open(folder / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                docs.append("\n".join(_clean(row[k]) for k in ("context", "action1", "action2")))
    return docs


def prompt_documents(folder: Path) -> list[str]:
    records = json.loads((folder / "base_prompts.json").read_text(encoding="utf-8"))
    return ["\n".join(line.strip() for line in r["prompt"].strip().splitlines()) for r in records]


def write(path: Path, docs: list[str]) -> None:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{path}: {len(docs)} documents")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moralchoice", type=Path, required=True, help="folder with moralchoice_{low,high}_ambiguity.csv")
    ap.add_argument("--prompts", type=Path, default=HERE.parents[2] / "prompts", help="folder with base_prompts.json")
    args = ap.parse_args()
    write(HERE / "moralchoice.txt", moralchoice_documents(args.moralchoice))
    write(HERE / "nnethics_prompts.txt", prompt_documents(args.prompts))


if __name__ == "__main__":
    main()
