"""The one way this package runs a Postfix command-line tool.

Two entry points share one implementation (``_run``):

``run_postfix(argv)``
    For diagnostics (postconf, postmap, postfix check/status/reload/start/stop). Postfix
    tools print their diagnostics only when stderr is a terminal; otherwise the messages go
    to syslog, which a container or a private instance may not have, and ``postfix check``
    just exits 1. ``script`` gives the tool a pseudo-terminal so the caller can read why it
    failed (stdout and stderr arrive merged in ``stdout``). Never raises for a non-zero exit.

``run_postfix_tool(argv, input=...)``
    For the queue tools (postqueue -j/-i, postsuper -h/-H with ids on standard input).
    Plain pipes: ``input`` goes to standard input, stdout and stderr stay apart (postsuper
    reports its tally on stderr). A tool that cannot start, times out or exits non-zero
    raises ``PostfixToolError`` with a message meant for the operator as is.
"""

from __future__ import annotations

import shlex
import subprocess

DEFAULT_TIMEOUT = 120.0


class PostfixToolError(Exception):
    """A Postfix tool could not run, timed out or failed; the message says which and why."""


def first_diagnostic(text: str) -> str:
    """The line of a tool's output that best says what went wrong: the first ``fatal:``
    line, else the first non-empty one ("" if there is none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if "fatal:" in ln]
    return (fatal or lines or [""])[0]


def _run(cmd: list[str], input: str | None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",  # an 8-bit address in the queue must not crash the reader
        timeout=timeout,
    )


def run_postfix(argv: list[str], timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``argv`` (e.g. ``["postfix", "-c", DIR, "check"]``) under a pseudo-terminal.

    Returns the completed process; stdout holds what the tool printed, diagnostics
    included. Never raises for a non-zero exit: callers decide what it means."""
    return _run(["script", "-qec", shlex.join(argv), "/dev/null"], None, timeout)


def run_postfix_tool(
    argv: list[str],
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    what: str | None = None,
    done: str | None = None,
    not_found_ok: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``input`` on standard input (else /dev/null); return it on exit 0.

    ``what`` names the tool in errors (default: the command line); ``done`` says what was
    already done when this run is one of several (earlier chunks stay changed). Raises
    PostfixToolError: "cannot run X: ... (is Postfix installed?)", "WHAT timed out after
    Ns (DONE; is Postfix running?)" or "WHAT failed (exit N) after DONE: <diagnostic>".
    ``not_found_ok``: exit 1 without a diagnostic is fine too (``postmap -q`` found nothing).
    """
    what = what or shlex.join(argv)
    try:
        r = _run(argv, input, timeout)
    except OSError as exc:
        raise PostfixToolError(f"cannot run {argv[0]}: {exc} (is Postfix installed?)") from None
    except subprocess.TimeoutExpired:
        hint = f"{done}; is Postfix running?" if done else "is Postfix running?"
        raise PostfixToolError(f"{what} timed out after {timeout:g}s ({hint})") from None
    if not_found_ok and r.returncode == 1 and not first_diagnostic(r.stderr):
        return r
    if r.returncode != 0:
        after = f" after {done}" if done else ""
        raise PostfixToolError(
            f"{what} failed (exit {r.returncode}){after}: {first_diagnostic(r.stderr) or 'no message'}"
        )
    return r
