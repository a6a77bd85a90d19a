#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries (initdb, postgres) for the tests of the prediction
# log on PostgreSQL (tests/conftest.py starts its own server on loopback; nothing here starts one).
# Does nothing when a server is already installed.
set -euo pipefail
source "$(dirname "$0")/apt-install-once.sh"
apt_install_once postgresql compgen -G "/usr/lib/postgresql/*/bin/pg_ctl"
echo "PostgreSQL binaries: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
