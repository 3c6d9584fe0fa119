"""scripts/install_browser.sh (run by `make test`): checks chromium and chromium-driver each on its own (program on
PATH, or dpkg lists the package) and installs only what is missing. Run here against stub apt-get/dpkg-query on an
isolated PATH, so nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_browser.sh"
TOOLS = ("mktemp", "tail", "id", "rm", "grep", "cat", "chmod")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or os.geteuid() != 0,
                                reason="needs bash and root (the script uses sudo otherwise)")


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!" + shutil.which("bash") + "\n" + body)
    path.chmod(0o755)


def _run(tmp_path: Path, programs: tuple[str, ...], dpkg: tuple[str, ...] = (), apt: bool = True, **env):
    """The script with PATH = a folder holding the basic tools, ``programs`` (stub chromium/chromedriver), a
    dpkg-query that lists ``dpkg`` as installed and an apt-get that logs its arguments and 'installs' stubs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        (bin_ / tool).symlink_to(shutil.which(tool))
    for p in programs:
        _stub(bin_, p, "exit 0\n")
    listed = " ".join(dpkg)
    _stub(bin_, "dpkg-query", f'for p in {listed}; do [ "${{@: -1}}" = "$p" ] && {{ echo "install ok installed"; '
                              'exit 0; }; done; exit 1\n')
    if apt:
        _stub(bin_, "apt-get", f'echo "$@" >> {tmp_path}/apt.log\n'
                               f'for a in "$@"; do case $a in chromium) : > {bin_}/chromium; chmod +x {bin_}/chromium;; '
                               f'chromium-driver) : > {bin_}/chromedriver; chmod +x {bin_}/chromedriver;; esac; done\n')
    out = subprocess.run([shutil.which("bash"), str(SCRIPT)], env={"PATH": str(bin_), **env}, capture_output=True,
                         text=True, timeout=60)
    log = tmp_path / "apt.log"
    return out, log.read_text().splitlines() if log.exists() else []


def test_chromium_present_driver_missing_installs_only_the_driver(tmp_path):
    out, apt = _run(tmp_path, ("chromium",))
    assert out.returncode == 0, out.stderr
    assert apt[-1].split()[-1] == "chromium-driver" and "chromium " not in apt[-1] + " "
    assert "installed chromium-driver" in out.stderr


def test_both_present_installs_nothing(tmp_path):
    out, apt = _run(tmp_path, ("chromium", "chromedriver"))
    assert out.returncode == 0 and apt == []
    assert "chromium and chromium-driver are present" in out.stderr


def test_dpkg_counts_as_present(tmp_path):
    out, apt = _run(tmp_path, ("chromium",), dpkg=("chromium-driver",))
    assert out.returncode == 0 and apt == []


def test_nothing_present_installs_both(tmp_path):
    out, apt = _run(tmp_path, ())
    assert out.returncode == 0, out.stderr
    assert apt[-1].split()[-2:] == ["chromium", "chromium-driver"]


def test_no_apt_skips_or_fails_under_require_all(tmp_path):
    out, _ = _run(tmp_path, ("chromium",), apt=False)
    assert out.returncode == 0 and "apt-get not found; install chromium-driver by hand" in out.stderr
    strict = tmp_path / "strict"
    strict.mkdir()
    out, _ = _run(strict, ("chromium",), apt=False, NNETHICS_REQUIRE_ALL="1")
    assert out.returncode == 1 and "the browser tests will be skipped" not in out.stderr


def test_make_test_runs_the_browser_script_first():
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    assert "test: install-dev browser" in makefile and "bash scripts/install_browser.sh" in makefile
