"""The role's relay-run-with-env: how the tracker gets its vaulted environment in
direct mode (read by root from the root-only tracker.env, never from a command line)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.paths import REPO

HELPER = REPO / "ansible" / "roles" / "relay" / "files" / "relay-run-with-env"
PRINT_ENV = [sys.executable, "-c", "import os, sys; sys.stdout.write(os.environ.get('RELAY_EVENTS_DSN', '<unset>') + '|' + os.environ.get('PLAIN', '<unset>'))"]


def run(env_file, *command):
    return subprocess.run([sys.executable, str(HELPER), str(env_file), "--", *command], capture_output=True, text=True, timeout=60)


@pytest.fixture
def env_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the helper requires a root-owned file (run as root, like the role)")
    path = tmp_path / "tracker.env"
    # As the role writes it: double quotes, with \ " $ ` escaped.
    path.write_text('# comment\n\nRELAY_EVENTS_DSN="postgresql://relay:p\\"w\\$x\\`y\\\\z@db/relay"\nPLAIN=abc\n')
    os.chmod(path, 0o600)
    return path


def test_variables_reach_the_command_unquoted(env_file):
    r = run(env_file, *PRINT_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'postgresql://relay:p"w$x`y\\z@db/relay|abc'


def test_a_file_readable_by_others_or_not_owned_by_root_is_refused(env_file):
    os.chmod(env_file, 0o640)
    r = run(env_file, *PRINT_ENV)
    assert r.returncode != 0 and "owned by root, mode 0600" in r.stderr and r.stdout == ""
    os.chmod(env_file, 0o600)
    os.chown(env_file, 65534, -1)
    r = run(env_file, *PRINT_ENV)
    assert r.returncode != 0 and "owned by root, mode 0600" in r.stderr


def test_a_symlink_or_a_malformed_line_is_refused(env_file, tmp_path):
    link = tmp_path / "link.env"
    link.symlink_to(env_file)
    r = run(link, *PRINT_ENV)
    assert r.returncode != 0 and "symlink is refused" in r.stderr and r.stdout == ""
    env_file.write_text("RELAY_EVENTS_DSN=two words\n")
    r = run(env_file, *PRINT_ENV)
    assert r.returncode != 0 and "line 1: not KEY=" in r.stderr
