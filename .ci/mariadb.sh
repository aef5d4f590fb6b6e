#!/usr/bin/env bash
# Install Debian's MariaDB server binaries for the InterCode-SQL MySQL-backend
# tests, non-interactively, if they are missing. The system service is NOT
# started (nor left running): the test fixture runs its own mariadbd on
# 127.0.0.1 with a temporary datadir and stops it by PID.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if have mariadbd && have mariadb-install-db; then
  echo "mariadb: already installed ($( (command -v mariadbd || echo /usr/sbin/mariadbd) ))"
  exit 0
fi

. "$(dirname "$0")/apt.sh"
apt_sudo mariadb mariadb-server

# policy-rc.d exit 101 = "do not start services": the package's postinst
# would otherwise start (and leave running) the system mariadb service.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  CREATED_POLICY=1
fi
cleanup() { if [ "$CREATED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

apt_install mariadb-server mariadb-client
echo "mariadb: installed $(/usr/sbin/mariadbd --version 2>/dev/null || mariadbd --version)"
