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


def logfmt_value(value: Any, limit: int = MAX_VALUE) -> str:
    if value is None:
        return '""'
    text = str(value)
    # Never let client-controlled text forge extra log lines or fields.
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")
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


def setup(level: str = "info", log_file: str | None = None) -> None:
    handler: logging.Handler
    if log_file:
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(log_file)  # follows logrotate's rename
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
