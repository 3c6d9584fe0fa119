#!/usr/bin/env bash
# Install Debian's Chromium + ChromeDriver for the report's headless-browser tests and PNG export.
# Nothing is downloaded from anywhere but the Debian archive. Each of the two is checked on its own, so a
# machine with chromium but no chromedriver gets the driver.
#
# Where apt or root is missing, or the install fails, it says so and the browser tests skip themselves;
# with NNETHICS_REQUIRE_ALL=1 (set by .ci/run) it exits 1 instead, as the tests would then fail.
#
# Each package is "present" when its program is on PATH (which) or dpkg lists it installed; only the missing
# ones are installed (tests/test_install_browser.py runs this script against stub apt-get/dpkg-query).
set -u
on_path() { command -v "$1" >/dev/null 2>&1; }
dpkg_has() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
have_chromium() { on_path chromium || dpkg_has chromium; }
have_driver() { on_path chromedriver || dpkg_has chromium-driver; }

fail() {
  echo "install_browser: $1" >&2
  if [ "${NNETHICS_REQUIRE_ALL:-0}" = "1" ]; then exit 1; fi
  echo "install_browser: the browser tests will be skipped" >&2
  exit 0
}

missing=()
have_chromium || missing+=(chromium)
have_driver || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_browser: chromium and chromium-driver are present" >&2
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install ${missing[*]} by hand"
SUDO=""
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 || fail "not root and no sudo; run: sudo apt-get install -y ${missing[*]}"
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "install_browser: apt-get install ${missing[*]}" >&2
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  fail "could not install ${missing[*]} (the apt output is above)"
fi
have_chromium || fail "chromium installed but not found (no chromium on PATH, dpkg does not list it)"
have_driver || fail "chromium-driver installed but chromedriver is not on PATH"
echo "install_browser: installed ${missing[*]}" >&2
