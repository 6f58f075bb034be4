#!/usr/bin/env bash
# Install everything the relay, the demo and the tests need on Debian 12, as root.
# Idempotent: a second run installs nothing new. The venv lives in .venv
# (override with RELAY_VENV).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${RELAY_VENV:-$root/.venv}

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: run as root (apt-get, and Postfix starts as root)" >&2
  exit 2
fi

mapfile -t pkgs < <(cat "$root"/deps/apt/*.txt | sed 's/#.*//' | awk 'NF {print $1}' | sort -u)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Install Postfix without a system configuration: the relay renders its own.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating venv $venv"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
echo "bootstrap: installing the relay and its test tools into $venv"
"$venv/bin/python" -m pip install -q -e "$root[test]"
for req in "$root"/deps/pip/*.txt; do
  [ -e "$req" ] || continue
  "$venv/bin/python" -m pip install -q -r "$req"
done
echo "bootstrap: ready ($("$venv/bin/relayctl" --version))"
