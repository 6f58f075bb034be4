#!/usr/bin/env bash
# Run the whole test suite (unit, milter adapter, real-Postfix end to end) on Debian 12, as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k dkim -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${RELAY_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
