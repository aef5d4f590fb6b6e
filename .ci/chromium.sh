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
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "chromium: not root and no sudo: install Debian's chromium yourself" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
echo "chromium: installed $(chromium --version 2>/dev/null)"
