#!/usr/bin/env bash
# Soak the relay at a steady rate (default 10 minutes) and report milter memory growth.
# As root; not part of CI. Extra arguments go to bench/soak.py (see --help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh" >&2
venv=${RELAY_VENV:-$root/.venv}
exec "$venv/bin/python" "$root/bench/soak.py" "$@"
