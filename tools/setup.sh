#!/usr/bin/env bash
# Idempotent setup: the venv with pinned tools, per-board stubs, and Debian's mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.setup-stamp
if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] || [ requirements-stubs.txt -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  while read -r board pkg; do
    case "$board" in ''|'#'*) continue ;; esac
    rm -rf ".venv/stubs/$board"
    .venv/bin/pip install -q --disable-pip-version-check --target ".venv/stubs/$board" "$pkg"
  done < requirements-stubs.txt
  touch "$stamp"
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "mosquitto is missing: run 'sudo apt-get install -y mosquitto' and then make again" >&2
    exit 1
  fi
fi
