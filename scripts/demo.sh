#!/usr/bin/env bash
# Bring up a complete relay on loopback and send real signed mail through it, as root.
# Pass --keep to leave it running for inspection (Ctrl-C ends it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${RELAY_VENV:-$root/.venv}
exec "$venv/bin/relayctl" demo "$@"
