# Shared by the .ci/*.sh installers (sourced, not run): root or sudo, then a
# quiet, non-interactive apt-get install of Debian packages.

# apt_sudo NAME WHAT: set SUDO ("" as root, "sudo" otherwise) or exit 1 naming NAME.
apt_sudo() {
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "$1: not root and no sudo: install $2 yourself" >&2; exit 1; fi
  fi
}

# apt_install PKG...: install without recommends (after apt_sudo).
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
