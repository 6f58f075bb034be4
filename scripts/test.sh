#!/usr/bin/env bash
# Run the whole test suite (unit, milter adapter, real-Postfix end to end) on Debian 12, as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k dkim -x
# RELAY_TEST_WORKERS=N runs test modules in N parallel processes (pytest-xdist,
# --dist loadgroup). The default, 0, runs everything in this one process: in
# parallel, test_deploy.py's in-tree wheel build and test_operator_safety.py
# still fail (under investigation), so CI runs serially.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${RELAY_VENV:-$root/.venv}
cd "$root"
workers=${RELAY_TEST_WORKERS:-0}
if [ "$workers" = 0 ]; then
  exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/python" -m pytest -n "$workers" --dist loadgroup "$@"
