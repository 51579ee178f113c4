#!/usr/bin/env bash
# Sets up a fresh machine: system packages (Go for the interop tests,
# Chromium for the dashboard test) and the project's virtualenv.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}

need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/golang.org/x/mod ] || need+=(golang-golang-x-mod-dev)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]}" >&2
    # a new machine may still be installing something else: wait for dpkg's lock
    lock=(-o DPkg::Lock::Timeout=300)
    $SUDO apt-get "${lock[@]}" update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${lock[@]}" install -y -q "${need[@]}" >/dev/null \
      || echo "setup: WARNING: could not install ${need[*]}; the tests that need them will skip loudly" >&2
  else
    echo "setup: WARNING: no apt-get; install ${need[*]} yourself" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The locked versions (requirements.lock, checked by `make audit`) as constraints.
"$VENV/bin/python" -m pip install -q -e '.[dev]' -c requirements.lock
