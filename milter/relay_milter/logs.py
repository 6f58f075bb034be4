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


def logfmt_value(value: Any) -> str:
    if value is None:
        return '""'
    text = str(value)
    # Never let client-controlled text forge extra log lines or fields.
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")
    if len(text) > 512:
        text = text[:509] + "..."
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def event(logger: logging.Logger, level: int, qid: str | None, name: str, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts += [f"{k}={logfmt_value(v)}" for k, v in fields.items() if v is not None and v != ""]
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
