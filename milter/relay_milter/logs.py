"""Structured logging: one logfmt line per event, led by the Postfix queue id.

    3Fv9Qd1m2kz9sL: event=accepted tenant=acme client=127.0.0.1 rcpts=1 ...

so ``grep QUEUEID /var/log/postfix.log /var/log/relay-milter.log`` finds both sides.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_.,:@/<>+=\-\[\]]+$")


# Recipient lists are the tracker's record of a message: never cut short (the relay takes
# at most 1,000 recipients, so a line stays well under Postfix-sized limits).
UNCUT_FIELDS = frozenset({"rcpts", "orig_rcpts"})
MAX_VALUE = 512
MAX_UNCUT_VALUE = 512 * 1024


_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\x00": "\\0"}
_C0_DEL = re.compile(r"[\x00-\x1f\x7f]")
_C0_DEL_BUT_NL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _escape_char(m: re.Match) -> str:
    c = m.group(0)
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def escape_controls(text: str) -> str:
    """Client text made safe for a log line: non-ASCII as ``\\xNN``/``\\uNNNN`` (this
    includes the C1 controls), every C0 control and DEL as ``\\r``, ``\\n``, ``\\t``,
    ``\\0`` or ``\\xNN``. No terminal escape sequence, line break or field separator from
    a client ever reaches the log, and the tracker's parser accepts the line."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _C0_DEL.sub(_escape_char, text)


def logfmt_value(value: Any, limit: int = MAX_VALUE) -> str:
    if value is None:
        return '""'
    text = escape_controls(str(value))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def event(logger: logging.Logger, level: int, qid: str | None, name: str, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts += [
        f"{k}={logfmt_value(v, MAX_UNCUT_VALUE if k in UNCUT_FIELDS else MAX_VALUE)}"
        for k, v in fields.items()
        if v is not None and v != ""
    ]
    logger.log(level, "%s: %s", qid or "NOQUEUE", " ".join(parts))


class SafeFormatter(logging.Formatter):
    """Escapes control characters (but the newlines of a traceback) in every record, also
    those not written through ``event`` (exception texts may quote client input)."""

    def format(self, record: logging.LogRecord) -> str:
        return _C0_DEL_BUT_NL.sub(_escape_char, super().format(record))


def formatter() -> logging.Formatter:
    """The format of the milter's and the tracker's logs (what tracking.logparse reads)."""
    return SafeFormatter("%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")


def setup(level: str = "info", log_file: str | None = None) -> None:
    handler: logging.Handler
    if log_file:
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(log_file)  # follows logrotate's rename
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
