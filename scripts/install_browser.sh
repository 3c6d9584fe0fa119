#!/usr/bin/env bash
# Install Debian's Chromium + ChromeDriver for the report's headless-browser tests.
# No browser is downloaded from anywhere but the Debian archive; where apt or root is missing,
# the browser tests skip themselves with a clear reason.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: apt-get not found; browser tests will be skipped" >&2; exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install_browser: not root and no sudo; browser tests will be skipped" >&2; exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
  || echo "install_browser: could not install chromium; browser tests will be skipped" >&2
exit 0
