#!/usr/bin/env bash
# Installs Debian's Chromium for the headless-browser tests of the HTML reports (tests/browser.py
# runs it with the network cut off; nothing here starts it). Does nothing when a `chromium` is
# already on PATH.
set -euo pipefail
source "$(dirname "$0")/apt-install-once.sh"
apt_install_once chromium command -v chromium
chromium --version
