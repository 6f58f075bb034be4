"""Delivery events: what the tracker records, the CLI shows and webhooks push.

Pure data, no I/O. One event per recipient per attempt: a message to two recipients that
is deferred twice and then relayed gives 2 RECEIVED, 4 DEFERRED and 2 RELAYED.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from enum import Enum
from typing import Any


class Kind(str, Enum):
    RECEIVED = "RECEIVED"  # accepted by the relay (queued)
    RELAYED = "RELAYED"  # the tenant's smarthost said 2xx: the final point for the relay
    DEFERRED = "DEFERRED"  # temporary failure; Postfix retries until maximal_queue_lifetime
    BOUNCED = "BOUNCED"  # permanent failure (5xx), or expired in the queue
    REJECTED = "REJECTED"  # refused at ingress (SMTP reply to the upstream client)
    # Engagement tracking (opt-in; relayctl web): the recipient opened the message / followed a link.
    OPENED = "OPENED"
    CLICKED = "CLICKED"
    # Bounce tracking (issue 15 A): reports that reach the tenant's bounce domain after the
    # smarthost accepted the message (BOUNCED with detail.async too).
    DELAYED = "DELAYED"  # a remote MTA's delay DSN (RFC 3464 Action: delayed)
    COMPLAINED = "COMPLAINED"  # a feedback report (ARF, RFC 5965) about the message

    def __str__(self) -> str:
        return self.value

    @property
    def state(self) -> str:
        """Retarus-style processing state."""
        return {
            "RECEIVED": "PROCESSING",
            "DEFERRED": "RETRYING",
            "DELAYED": "RETRYING",
            "OPENED": "ENGAGED",
            "CLICKED": "ENGAGED",
        }.get(self.value, "FINISHED")

    @property
    def final(self) -> bool:
        return self.state == "FINISHED"

    @property
    def engagement(self) -> bool:
        return self.value in ("OPENED", "CLICKED")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Event:
    kind: Kind
    ts: float  # epoch seconds of the log line
    node: str
    tenant: str | None = None
    queue_id: str | None = None
    message_id: str | None = None
    upstream_id: str | None = None
    sender: str | None = None
    recipient: str | None = None  # decoded (final) recipient; for REJECTED the address refused
    original_recipient: str | None = None  # the encoded relay address, when there was one
    relay: str | None = None  # Postfix relay=, e.g. 127.0.0.1[127.0.0.1]:2525
    response_code: str | None = None  # "250", "451", "550"
    dsn: str | None = None  # "2.0.0"
    reason: str | None = None  # Postfix's status text, with the smarthost's own reply
    tls: dict | None = None  # requested, established, level, protocol, cipher
    next_retry: float | None = None  # DEFERRED: estimate of the next attempt
    size: int | None = None
    client: str | None = None  # ingress client, e.g. localhost[127.0.0.1]
    seq: int | None = None  # per-tenant sequence number, assigned by the store
    delay: float | None = None  # Postfix delay=: seconds from arrival to the end of this attempt
    delays: str | None = None  # Postfix delays=a/b/c/d (before qmgr, in qmgr, connect, transmit)
    # Bounce tracking (issue 15 A): what a report said ({"async": true, "reportingMta": ...}).
    detail: dict | None = None
    id: int | None = None  # assigned by the store

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)

    def to_json(self) -> dict[str, Any]:
        """Stable JSON form (relayctl --json). Times are ISO 8601 UTC."""
        out = asdict(self)
        out["kind"] = self.kind.value
        out["state"] = self.kind.state
        out["ts"] = iso(self.ts)
        out["next_retry"] = iso(self.next_retry)
        return out

    def row(self) -> dict[str, Any]:
        """Column values for a store (tls as JSON text)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "id"}
        out["kind"] = self.kind.value
        out["tls"] = json.dumps(self.tls, sort_keys=True) if self.tls is not None else None
        out["detail"] = json.dumps(self.detail, sort_keys=True) if self.detail is not None else None
        return out

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Event":
        data = dict(row)
        if isinstance(data.get("tls"), str):
            data["tls"] = json.loads(data["tls"])
        if isinstance(data.get("detail"), str):
            data["detail"] = json.loads(data["detail"])
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in fields(Event))


# -- engagement (opens and clicks): the detail is kept in the reason, no extra columns ------

_ENGAGEMENT_REASON = re.compile(r"^(first|repeat) (open|click)(?: #(\d+))?(?: (\S+))?$")


def engagement_reason(kind: Kind, count: int, url: str | None = None) -> str:
    """The reason text of an OPENED/CLICKED event: ``first open``, ``repeat open #3``,
    ``first click https://...``, ``repeat click #2 https://...`` (``count`` counts this one)."""
    what = "open" if kind is Kind.OPENED else "click"
    text = f"first {what}" if count <= 1 else f"repeat {what} #{count}"
    return f"{text} {url}" if url else text


def engagement_detail(ev: Event) -> dict[str, Any] | None:
    """``{"repeat": bool, "count": n, "url": str | None}`` of an OPENED/CLICKED event."""
    if not ev.kind.engagement:
        return None
    m = _ENGAGEMENT_REASON.match(ev.reason or "")
    if not m:
        return {"repeat": None, "count": None, "url": None}
    return {"repeat": m.group(1) == "repeat", "count": int(m.group(3) or 1), "url": m.group(4)}
