#!/usr/bin/env bash
# Install Debian's Chromium for the browser check of the Prefect UI pages
# (tests/test_ui_browser.py drives it with playwright's Python package, which
# downloads no browser of its own). If the install is impossible, that test
# skips with the reason.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "chromium: already installed ($(chromium --version 2>/dev/null))"
  exit 0
fi
. "$(dirname "$0")/apt.sh"
apt_sudo chromium "Debian's chromium"
apt_install chromium fonts-liberation
echo "chromium: installed $(chromium --version 2>/dev/null)"
