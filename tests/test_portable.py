"""Dataclasses shipped to a server rebuild there (nnethics.models.remote.portable): no bytecode travels.

A server in another Python (the NDIF server needs 3.12 or newer) cannot run this client's bytecode: a request that hashed a
patching row crashed the real server's model actor (make test-ndif). These tests pickle as a remote request does,
with nnsight's pickler, and load in this Python; tests/test_ndif_real.py loads in the server's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
from conftest import bytecode_fallbacks
from nnsight.intervention.serialization import dumps

from nnethics.models.remote.portable import portable


def _module(tmp_path, monkeypatch):
    """A by-value module of dataclasses (as nnethics is for a request), written to a file so its source is found."""
    (tmp_path / "shipped_dc.py").write_text(textwrap.dedent('''
        from __future__ import annotations  # string annotations, as in nnethics

        import dataclasses

        @dataclasses.dataclass(frozen=True)
        class Noise:
            start: int
            scale: float = 3.0

        @dataclasses.dataclass
        class Plan:
            rows: list = dataclasses.field(default_factory=list)
            noise: Noise | None = None
            note: str = dataclasses.field(default="", repr=False, compare=False)

            def total(self) -> int:
                return len(self.rows) + (self.noise.start if self.noise else 0)

        @dataclasses.dataclass(frozen=True, order=True)
        class Key(Noise):
            extra: int = 0
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import shipped_dc

    cloudpickle.register_pickle_by_value(shipped_dc)
    return shipped_dc


CHECK = textwrap.dedent("""
    import dataclasses, sys
    import cloudpickle
    got = cloudpickle.loads(open(sys.argv[1], "rb").read())
    plan, keys = got["plan"], got["keys"]
    Noise, Plan, Key = type(plan.noise), type(plan), type(next(iter(keys)))
    assert "shipped_dc" not in sys.modules  # rebuilt from the payload, not imported
    assert plan == Plan([1, 2], Noise(4), note="other") and plan.total() == 6  # note: compare=False
    assert hash(Noise(4)) == hash(Noise(4, 3.0)) and {Noise(4): 1}[Noise(4, 3.0)] == 1
    try:
        plan.noise.start = 5
        raise SystemExit("a frozen field was set")
    except dataclasses.FrozenInstanceError:
        pass
    assert Plan().rows == [] and Plan().rows is not Plan().rows  # default_factory kept
    assert "note" not in repr(plan) and repr(Noise(1)) == "Noise(start=1, scale=3.0)", repr(plan)
    assert keys[Key(1, 2.0, 3)] == "a" and Key(1, 2.0, 0) < Key(1, 2.0, 3)  # order=True, inherited fields
    assert [f.name for f in dataclasses.fields(Key)] == ["start", "scale", "extra"]
    print("ok", sys.version_info[0], sys.version_info[1])
""")


def _payload(tmp_path, monkeypatch, seen: list[str] | None = None) -> Path:
    from nnethics.models.remote import register_nnethics

    register_nnethics()  # as every request does: the rebuild (nnethics' own code) travels by value too
    m = _module(tmp_path, monkeypatch)
    try:
        value = {"plan": m.Plan([1, 2], m.Noise(4), note="x"), "keys": {m.Key(1, 2.0, 3): "a"}}
        with portable():
            blob = dumps(value)
        if seen is not None:
            assert [s for s in seen if s.startswith("shipped_dc")] == []  # no generated method as bytecode
            dumps(value)
            assert "shipped_dc.Noise.__hash__" in seen and "shipped_dc.Plan.__init__" in seen  # without portable()
    finally:
        cloudpickle.unregister_pickle_by_value(m)
    path = tmp_path / "payload" / "blob.pkl"
    path.parent.mkdir()
    path.write_bytes(blob)
    return path


def _load(python: str, path: Path) -> subprocess.CompletedProcess:
    """Load the payload in a fresh process (where the class is not known: it must be built from the payload)."""
    return subprocess.run([python, "-c", CHECK, str(path)], capture_output=True, text=True, cwd=path.parent)


def test_a_shipped_dataclass_is_rebuilt_with_the_same_behaviour_and_no_bytecode(tmp_path, monkeypatch):
    seen = bytecode_fallbacks(monkeypatch)
    out = _load(sys.executable, _payload(tmp_path, monkeypatch, seen))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.ndif
def test_a_rebuilt_dataclass_loads_in_another_python(tmp_path, monkeypatch):
    """The payload made here loads, hashes and compares in another Python when one with cloudpickle is at hand (the
    NDIF server's venv, after `make ndif-server`); elsewhere the same-Python test above stands for it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "ndif"))
    import stack

    if not (stack.venv_dir() / ".complete").exists():
        pytest.skip("no NDIF server venv here (make ndif-server): the other-Python load runs under make test-ndif")
    out = _load(str(stack.venv_dir() / "bin" / "python"), _payload(tmp_path, monkeypatch))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
    assert out.stdout.split()[1:] != [str(v) for v in sys.version_info[:2]], out.stdout  # really another Python
