"""Every environment variable is documented (``nnethics --help`` and the README), options take theirs through
click's ``envvar``, secrets never show, and click's shell completion (``_NNETHICS_COMPLETE``) works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from nnethics.cli import cli
from nnethics.commands.envvars import ENVIRONMENT, TEST_ONLY

ROOT = Path(__file__).resolve().parents[1]
NAMES = [name for name, _ in ENVIRONMENT]
SECRET = "hf_s3cr3t-value-never-shown"


def test_every_environment_read_in_the_package_is_documented():
    read = set()
    for path in (ROOT / "nnethics").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"environ(?:\.get)?[\(\[]\s*\"([A-Z_]+)\"", text))
        read |= set(re.findall(r"getenv\(\s*\"([A-Z_]+)\"", text))
        read |= set(re.findall(r"envvar=\"([A-Z_]+)\"", text))
        read |= {m for m in re.findall(r"\"((?:NNETHICS|NDIF)_[A-Z_]+)\"", text)}
    assert read, "the scan found nothing: the pattern is wrong"
    missing = read - set(NAMES) - set(TEST_ONLY)
    assert not missing, f"read but not in nnethics/commands/envvars.py ENVIRONMENT: {sorted(missing)}"


def test_help_and_readme_list_every_variable():
    res = CliRunner().invoke(cli, ["--help"], prog_name="nnethics")
    assert res.exit_code == 0
    readme = (ROOT / "README.md").read_text()
    for name in NAMES:
        assert name in res.output, f"{name} not in `nnethics --help`"
        assert f"`{name}`" in readme or name in readme, f"{name} not in README.md"
    for name in TEST_ONLY:
        assert name in readme


def _all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


def test_options_name_their_variable_and_secrets_never_show(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    runner = CliRunner()
    run_help = runner.invoke(cli, ["run", "--help"], prog_name="nnethics").output
    for flag, var in (("--store", "NNETHICS_STORE"), ("--lock-timeout", "NNETHICS_LOCK_TIMEOUT"),
                      ("--remote", "NNETHICS_REMOTE"), ("--token", "HF_TOKEN")):
        block = run_help[run_help.index(flag):]
        assert f"env var: {var}" in " ".join(block[:600].split()), (flag, var)
    for path, _ in _all_commands(cli):
        res = runner.invoke(cli, [*path, "--help"], prog_name="nnethics")
        assert res.exit_code == 0, path
        assert SECRET not in res.output, f"`nnethics {' '.join(path)} --help` shows a secret"
    res = runner.invoke(cli, ["models"], prog_name="nnethics")
    assert SECRET not in res.output


def test_store_comes_from_nnethics_store(tmp_path, monkeypatch):
    """--store's default is $NNETHICS_STORE: a bad one is refused naming the flag, before anything loads."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NNETHICS_STORE", str(blocker))
    res = CliRunner().invoke(cli, ["run", "--limit", "1"], prog_name="nnethics")
    assert res.exit_code == 2 and str(blocker) in res.output, res.output


def test_shell_completion_through_the_environment_variable():
    runner = CliRunner()
    src = runner.invoke(cli, [], prog_name="nnethics", env={"_NNETHICS_COMPLETE": "bash_source"})
    assert src.exit_code == 0 and "_nnethics_completion" in src.output and "_NNETHICS_COMPLETE" in src.output
    env = {"_NNETHICS_COMPLETE": "bash_complete", "COMP_WORDS": "nnethics ex", "COMP_CWORD": "1"}
    res = runner.invoke(cli, [], prog_name="nnethics", env=env)
    assert res.output.split() == ["plain,export"], res.output
    env = {"_NNETHICS_COMPLETE": "bash_complete", "COMP_WORDS": "nnethics export x --form", "COMP_CWORD": "3"}
    assert "plain,--format" in runner.invoke(cli, [], prog_name="nnethics", env=env).output.split()


def test_shell_completion_from_the_real_entry_point():
    """As the shell runs it: the installed entry point (``nnethics.cli:main``) reading ``_NNETHICS_COMPLETE``."""
    env = {**os.environ, "_NNETHICS_COMPLETE": "zsh_source", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", "from nnethics.cli import main; main()"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#compdef nnethics" in out.stdout
