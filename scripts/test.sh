#!/usr/bin/env bash
# Run the whole test suite (unit, milter adapter, real-Postfix end to end) on Debian 12, as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k dkim -x
# Test modules run in RELAY_TEST_WORKERS parallel processes (pytest-xdist, --dist
# loadgroup; default 2, the CI machine's cores): each module whole on one worker, the
# tests/ansible modules one after another (tests/conftest.py). RELAY_TEST_WORKERS=0
# runs everything serially in this one process.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${RELAY_VENV:-$root/.venv}
cd "$root"
workers=${RELAY_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/python" -m pytest -n "$workers" --dist loadgroup "$@"
