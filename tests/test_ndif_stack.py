"""scripts/ndif/stack.py without starting the server: its inputs, and the model key it deploys under."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "ndif"))

import stack  # noqa: E402


@pytest.mark.parametrize("spec, says", [
    ("org/tiny", "give ORG/NAME=FOLDER"),             # no folder
    ("tiny=/tmp", "give ORG/NAME=FOLDER"),            # no org
    ("org/tiny=", "give ORG/NAME=FOLDER"),            # empty folder
    ("org/tiny={missing}", "is not a model folder"),  # a folder that does not exist
    ("org/tiny={empty}", "is not a model folder"),    # a folder without config.json
])
def test_a_bad_model_spec_is_one_line_and_exit_2_before_anything_starts(spec, says, tmp_path):
    (tmp_path / "empty").mkdir()
    spec = spec.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ndif" / "stack.py"), "up", "--model", spec,
                          "--folder", str(tmp_path / "stack")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stack.py up: error: argument --model:") and says in last and "Traceback" not in out.stderr
    assert not (tmp_path / "stack").exists()  # nothing was made


def test_a_good_model_spec(tiny_model_dir):
    assert stack.model_spec(f"org/tiny-llama={tiny_model_dir}") == ("org/tiny-llama", Path(tiny_model_dir))


def test_the_deployed_key_is_the_one_the_client_sends(tiny_model_dir):
    """The server is deployed ahead by exact key (on-demand deployment fails with nnsight 0.8.1): a key that differs
    from the client's by one character would never be served."""
    from nnsight.modeling.huggingface import _ID_CACHE

    from nnethics.models import load_model

    _ID_CACHE[str(tiny_model_dir)] = "org/tiny-llama"
    handle = load_model(str(tiny_model_dir), remote="http://127.0.0.1:9")
    assert handle.lm.to_model_key() == stack.model_key("org/tiny-llama")


def test_the_hub_cache_layout(tiny_model_dir, tmp_path):
    """What huggingface_hub reads offline: refs/main names a snapshot holding the folder's files."""
    from huggingface_hub import snapshot_download

    stack.lay_out(tmp_path / "hub", "org/tiny-llama", tiny_model_dir)
    got = Path(snapshot_download("org/tiny-llama", cache_dir=tmp_path / "hub", local_files_only=True))
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in Path(tiny_model_dir).iterdir())
    assert (got / "config.json").read_bytes() == (Path(tiny_model_dir) / "config.json").read_bytes()
