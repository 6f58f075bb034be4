#!/usr/bin/env bash
# Run the whole test suite (unit, milter adapter, real-Postfix end to end) on Debian 12, as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k dkim -x
# Test modules run in parallel, RELAY_TEST_WORKERS at once (default 4: most of an
# end-to-end test is waiting for Postfix, so more workers than cores pays);
# RELAY_TEST_WORKERS=0 runs everything in this one process.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${RELAY_VENV:-$root/.venv}
cd "$root"
workers=${RELAY_TEST_WORKERS:-4}
if [ "$workers" = 0 ]; then
  exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/python" -m pytest -n "$workers" --dist loadgroup "$@"
