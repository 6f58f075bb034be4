"""The one way this package runs a Postfix command-line tool.

Postfix tools print their diagnostics only when stderr is a terminal; otherwise the
messages go to syslog, which a container or a private instance may not have, and
``postfix check`` just exits 1. ``script`` gives the tool a pseudo-terminal so the
caller can read why it failed.
"""

from __future__ import annotations

import shlex
import subprocess

DEFAULT_TIMEOUT = 120.0


def run_postfix(argv: list[str], timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``argv`` (e.g. ``["postfix", "-c", DIR, "check"]``) under a pseudo-terminal.

    Returns the completed process; stdout holds what the tool printed, diagnostics
    included. Never raises for a non-zero exit: callers decide what it means."""
    cmd = " ".join(shlex.quote(a) for a in argv)
    return subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
