"""relayctl's one error path: the exit-code table and ``fail()``.

Every relayctl command ends with one of the codes of ``ExitCode``; no command module
exits with a number of its own. An error is reported by
``fail(code, message)``: one line ``relayctl: MESSAGE`` on standard error (details, if
any, indented below it), then the exit. The same table is shown by ``relayctl --help``
and in the README's relayctl section (a test checks that they agree):

"""

from __future__ import annotations

import sys
import textwrap
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import NoReturn

import click

from relay_milter.config import ConfigError

PREFIX = "relayctl"


class ExitCode(IntEnum):
    """relayctl's exit codes (stable, for scripts)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    CONFIG = 3
    CHECK_FAILED = 4
    UNAVAILABLE = 4  # alias: same code, for the tracking and queue commands
    INTERNAL = 5

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: (
        "done, with a negative answer: nothing found or matched (trace; requeue, hold, release), "
        "a request refused (user add/remove, cert selfsigned over an existing file; ip failover "
        "without a healthy standby), an address or domain listed (reputation check), "
        "no at a confirmation prompt, or the demo saw a wrong result"
    ),
    ExitCode.USAGE: "usage error: unknown command or option, bad argument or option value",
    ExitCode.CONFIG: (
        "invalid configuration: a tenant, settings or secrets file, or an unknown tenant; "
        "nothing was changed"
    ),
    ExitCode.CHECK_FAILED: (
        "Postfix or the event store failed: the staged configuration failed Postfix's checks "
        "(check, apply: nothing was installed) or the reload failed; Postfix or the event store "
        "is unavailable; an output file cannot be written; the milter's socket file was removed "
        "while it ran (milter: restart it)"
    ),
    ExitCode.INTERNAL: (
        "unexpected error: an exception relayctl does not handle (a bug, or an operating-system "
        "error); the traceback is printed"
    ),
}


def table(indent: str = "  ", width: int = 78) -> list[str]:
    """The table as text lines, wrapped to ``width`` (aliases folded into their code)."""
    lines: list[str] = []
    for code in ExitCode:
        lines += textwrap.wrap(
            code.meaning, width, initial_indent=f"{indent}{int(code)}  ", subsequent_indent=indent + "   "
        )
    return lines


# The one exception: `relayctl status` is a monitoring check and exits with the Nagios
# plugin codes (cli/status.py: OK, WARNING, CRITICAL, UNKNOWN), which a monitoring system
# reads as states. Documented here, in --help and in the README, next to the table.
NAGIOS_NOTE = (
    "`relayctl status` alone exits with the Nagios plugin codes instead:",
    "  0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a check could not run, or invalid settings)",
)


__doc__ = (__doc__ or "") + "\n".join(table()) + "\n\n" + "\n".join(NAGIOS_NOTE) + "\n"


def fail(code: ExitCode, message: str, details: Iterable[str] = ()) -> NoReturn:
    """Print ``relayctl: MESSAGE`` (and each detail, indented) on stderr and exit ``code``."""
    click.echo(f"{PREFIX}: {message}", err=True)
    for line in details:
        click.echo(f"  {line}", err=True)
    sys.exit(int(code))


def warn(message: str) -> None:
    """Print ``relayctl: warning: MESSAGE`` on stderr; the command goes on."""
    click.echo(f"{PREFIX}: warning: {message}", err=True)


def invalid_configuration(exc: ConfigError) -> NoReturn:
    """Exit 3 with the validation errors (each names the file, tenant and field)."""
    text = str(exc)
    fail(ExitCode.CONFIG, f"invalid configuration:\n{text}" if "\n" in text else f"invalid configuration: {text}")


# click's own control flow (usage errors exit 2, --help, Ctrl-C, a declined prompt) and
# our own exits pass through untouched.
_PASS_THROUGH = (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit, SystemExit, KeyboardInterrupt)


@contextmanager
def reported() -> Iterator[None]:
    """Map what a command lets escape onto the table: ConfigError -> 3, anything else -> 5."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except ConfigError as exc:
        invalid_configuration(exc)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        fail(ExitCode.INTERNAL, f"unexpected error: {type(exc).__name__}: {exc} (traceback above)")
