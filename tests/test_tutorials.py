"""The numbered tutorial notebooks (``scripts/tutorials/``): saved with their outputs, and those outputs are what
today's code prints.

The fast tests read the committed files: every code cell ran, in order, without an error; every figure is a saved
PNG (GitHub shows no Bokeh); nothing local or secret leaked into an output. The slow test runs each notebook in a
fresh kernel (06 against the loopback NDIF server) and requires every output of a cell not tagged ``volatile``
(timings, byte counts) to equal the saved one, so a change of results without re-running
``scripts/tutorials/execute.py`` fails here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "scripts" / "tutorials"
SERIES = ["01_quickstart", "02_decisions_and_bias", "03_activation_patching", "04_attribution", "05_lenses",
          "06_remote_ndif"]
NEEDS = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("nbclient", "ipykernel", "nbformat")),
                           reason="needs nbclient, ipykernel and nbformat (pip install -e '.[dev]')")


def _read(name: str):
    import nbformat

    return nbformat.read(HERE / f"{name}.ipynb", as_version=4)


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(output) -> str:
    """What a reader sees of one output, as text (images by kind only: PNG bytes vary with the font renderer)."""
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    if "image/png" in data:
        return "<png>"
    return data.get("text/plain", "") if "text/html" not in data or "text/plain" in data else data["text/html"]


def test_the_series_is_numbered_and_linked_from_the_readme():
    assert sorted(p.stem for p in HERE.glob("[0-9][0-9]_*.ipynb")) == SERIES
    readme = (ROOT / "README.md").read_text()
    for name in SERIES:
        assert f"scripts/tutorials/{name}.ipynb" in readme, name


@NEEDS
@pytest.mark.parametrize("name", SERIES)
def test_saved_outputs_are_complete_and_clean(name):
    nb = _read(name)
    cells = _code(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "run top to bottom, every cell"
    for cell in cells:
        kinds = [o.output_type for o in cell.outputs]
        assert "error" not in kinds, cell.source[:80]
        assert not any(o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text for o in cell.outputs)
        if re.search(r"^show\(", cell.source, re.M):
            assert sum("image/png" in o.get("data", {}) for o in cell.outputs) == cell.source.count("show("), \
                f"{name}: every show() saved as a PNG"
    text = "".join(_text(o) for c in cells for o in c.outputs)
    assert text.strip(), name
    assert "/work/" not in text and "/root/" not in text and "/home/" not in text, "a local path leaked into an output"
    assert "loopback-" not in text, "the NDIF key leaked into an output"
    assert "application/javascript" not in str(nb), "Bokeh's JS in the saved file (figures are PNGs)"
    assert (HERE / f"{name}.ipynb").stat().st_size < 1_000_000


@NEEDS
def test_the_headline_numbers_are_in_the_saved_outputs():
    def out(name: str) -> str:
        return "".join(_text(o) for c in _code(_read(name)) for o in c.outputs)

    assert "read back equal: True" in out("01_quickstart")
    assert "it chose label '1' on 6 of 6 prompts" in out("02_decisions_and_bias")
    parts = float(re.search(r"max \|sum of parts - LD\| = (\S+)", out("04_attribution")).group(1))
    assert parts < 1e-4
    remote = [float(x) for x in re.findall(r"max \|remote - local\| = (\S+) logits", out("06_remote_ndif"))]
    assert len(remote) == 2 and max(remote) < 1e-4


@NEEDS
@pytest.mark.slow
@pytest.mark.parametrize("name", SERIES)
def test_running_the_notebook_reproduces_its_saved_outputs(name, tmp_path):
    sys.path.insert(0, str(HERE))
    import nbformat
    from execute import execute

    ran = nbformat.read(execute(HERE / f"{name}.ipynb", tmp_path, log_dir=tmp_path), as_version=4)
    saved = _read(name)
    assert len(_code(ran)) == len(_code(saved))
    for new, old in zip(_code(ran), _code(saved)):
        assert "error" not in [o.output_type for o in new.outputs], "".join(
            o.get("evalue", "") for o in new.outputs if o.output_type == "error")
        if "volatile" in old.metadata.get("tags", []):
            continue
        assert [_text(o) for o in new.outputs] == [_text(o) for o in old.outputs], \
            f"{name}: re-run scripts/tutorials/execute.py {name[:2]} and commit the outputs\n{old.source[:200]}"
