#!/usr/bin/env bash
# Run the benchmark: bare Postfix vs Postfix + OpenDKIM vs Postfix + the relay milter,
# side by side, and print the table. As root. Extra arguments go to bench/bench.py
# (see --help), e.g.  bench/run.sh --markdown bench/RESULTS.md
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/bootstrap.sh" >&2
venv=${RELAY_VENV:-$root/.venv}
exec "$venv/bin/python" "$root/bench/bench.py" "$@"
