# Sourced by the install-*.sh scripts: apt_install_once PACKAGE CHECK... installs a Debian package
# unless the command CHECK (e.g. `command -v chromium`) already succeeds, and fails when CHECK
# still fails afterwards. Needs root and apt-get (Debian 12 in CI).
apt_install_once() {
  local package="$1"
  shift
  if "$@" > /dev/null 2>&1; then
    echo "$package already installed"
    return 0
  fi
  if ! command -v apt-get > /dev/null; then
    echo "error: no apt-get here: install $package with this system's packages (checked with: $*)" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing $package needs root (run: sudo $0)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$package"
  if ! "$@" > /dev/null 2>&1; then
    echo "error: apt-get installed $package but the check still fails: $*" >&2
    return 1
  fi
  echo "$package installed"
}
