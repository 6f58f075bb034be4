"""Pure helpers shared by the command groups: time arguments and event tables."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from relay_milter.tracking.events import Event, iso

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float) -> float:
    """``now``, a duration back from now (``90s``, ``15m``, ``24h``, ``7d``, ``2w``) or an
    ISO 8601 time (``2026-11-25``, ``2026-11-25T08:00:00+01:00``; no zone means UTC)."""
    value = text.strip()
    if value == "now":
        return now
    m = _DURATION.match(value)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither 'now', a duration like 15m, 24h or 7d, nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def human_age(seconds: float | None) -> str:
    """Compact age for tables: 45s, 2m05s, 3h07m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _tls_text(tls: dict | None) -> str:
    if not tls:
        return "-"
    if not tls.get("established", True):
        return "none"
    return " ".join(str(tls[k]) for k in ("protocol", "cipher") if tls.get(k)) or str(tls.get("level") or "yes")


def _code_text(ev: Event) -> str:
    return " ".join(x for x in (ev.response_code, ev.dsn) if x) or "-"


def trace_table(events: list[Event]) -> list[str]:
    """One aligned line per event; the reason (free text) goes last, unpadded."""
    header = ("TIME", "TENANT", "QUEUE ID", "EVENT", "RECIPIENT", "RELAY", "CODE", "TLS", "REASON")
    rows = [
        (
            (iso(ev.ts) or "-").replace(".000Z", "Z"),
            ev.tenant or "-",
            ev.queue_id or "-",
            ev.kind.value + (" async" if ev.detail and ev.detail.get("async") else ""),  # issue 15 A
            ev.recipient or "-",
            ev.relay or "-",
            _code_text(ev),
            _tls_text(ev.tls),
            ev.reason or "-",
        )
        for ev in events
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1]
        for r in [header, *rows]
    ]


__all__ = ["human_age", "parse_when", "trace_table"]
