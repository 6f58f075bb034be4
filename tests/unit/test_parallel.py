"""scripts/test.sh's parallel run (pytest-xdist, --dist loadgroup, tests/conftest.py): every
test of a module runs on one worker, in file order, so a module-scoped lab or deployment is
started once and its tests see the state the earlier ones left."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support.paths import REPO

# Two quick modules of 5 and 3 tests: scheduled test by test, each lands on both workers.
MODULES = ["tests/test_hygiene.py", "tests/ansible/test_run_with_env.py"]


def test_each_module_runs_whole_on_one_worker_in_file_order():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RELAY_LAB_SLOT"))}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider", *MODULES],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ran = re.findall(r"^\[(gw\d+)\] \[\s*\d+%\] PASSED (\S+?)::(\w+)", r.stdout, re.M)
    assert len(ran) == 8, r.stdout[-3000:]
    for module in MODULES:
        here = [(worker, name) for worker, path, name in ran if path == module]
        assert len({worker for worker, _ in here}) == 1, (module, here)
        source = (REPO / module).read_text()
        assert [name for _, name in here] == sorted((name for _, name in here), key=lambda n: source.index(f"def {n}(")), here
