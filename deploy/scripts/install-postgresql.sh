#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries (initdb, postgres) for the tests of the prediction
# log on PostgreSQL (tests/conftest.py starts its own server on loopback; nothing here starts one).
# Does nothing when a server is already installed; needs root and apt-get (Debian 12 in CI).
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null; then
  echo "PostgreSQL already installed: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
  exit 0
fi
if ! command -v apt-get > /dev/null; then
  echo "error: no apt-get here: install the PostgreSQL server (initdb, postgres) with this system's packages" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: installing PostgreSQL needs root (run: sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends postgresql
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null || {
  echo "error: apt-get installed postgresql but no /usr/lib/postgresql/*/bin/pg_ctl exists" >&2
  exit 1
}
echo "PostgreSQL installed: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
