"""The tracker's correlation state, typed: one :class:`MessageState` per Postfix queue id and
one :class:`TlsSession` per delivery process.

The store keeps each as a JSON object in its ``state`` table (``to_dict``/``from_dict``),
message state under its queue id and a TLS session under ``"tls <service>[<pid>]"`` (queue
ids never contain a space). The JSON keys are the ones earlier versions wrote, so state
left by a running tracker survives an upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

TLS_KEY = "tls "  # store key prefix of TLS sessions


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    """Leave out what is not set (None, False, empty), as the stored JSON always did."""
    return {k: v for k, v in data.items() if v is not None and v is not False and v != [] and v != {}}


@dataclass
class Attempt:
    """The last deferral of one recipient: what an expiry bounce reports."""

    dsn: str | None = None
    code: str | None = None
    relay: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "code": self.code, "relay": self.relay, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Attempt":
        return cls(data.get("dsn"), data.get("code"), data.get("relay"), data.get("reason"))


@dataclass
class MilterReject:
    """The milter's own record of an END-OF-MESSAGE reject (Postfix's line lacks the code)."""

    code: str | None = None
    tenant: str | None = None
    message_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "tenant": self.tenant, "message_id": self.message_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MilterReject":
        return cls(data.get("code"), data.get("tenant"), data.get("message_id"))


@dataclass
class MessageState:
    """What the tracker knows about one queue id, from both logs."""

    ts: float | None = None  # log time of the last line that changed it (for expiry)
    # smtpd client=: set only for mail from an SMTP client (relay-generated mail has none)
    client: str | None = None
    # the milter's accepted record
    milter: bool = False
    tenant: str | None = None
    sender: str | None = None  # envelope sender as the milter received it
    upstream_id: str | None = None
    rcpts: list[str] = field(default_factory=list)  # decoded recipients
    orig: dict[str, str] = field(default_factory=dict)  # decoded -> encoded recipient
    message_id: str | None = None
    reject: MilterReject | None = None
    # Postfix's own lines
    route_tenant: str | None = None
    route_to: str | None = None  # the first (encoded) recipient, from the route header line
    size: int | None = None
    pf_sender: str | None = None  # qmgr from=
    received: bool = False  # RECEIVED was recorded
    requeued_from: str | None = None
    seen: list[str] = field(default_factory=list)  # recipients with a delivery line
    final: list[str] = field(default_factory=list)  # recipients with a final event
    last: dict[str, Attempt] = field(default_factory=dict)  # recipient -> last deferral
    # Bounce tracking (issue 15 A): a report to a VERP return path; no tenant events of its own.
    bounce: bool = False

    @property
    def upstream(self) -> bool:
        """Mail from an SMTP client (smtpd logged client= for it)."""
        return self.client is not None

    @property
    def any_tenant(self) -> str | None:
        return self.tenant or self.route_tenant

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["reject"] = self.reject.to_dict() if self.reject else None
        data["last"] = {r: a.to_dict() for r, a in self.last.items()}
        return _compact(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MessageState":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if isinstance(values.get("reject"), dict):
            values["reject"] = MilterReject.from_dict(values["reject"])
        values["last"] = {r: Attempt.from_dict(a or {}) for r, a in (values.get("last") or {}).items()}
        for name in ("rcpts", "seen", "final"):
            values[name] = list(values.get(name) or [])
        values["orig"] = dict(values.get("orig") or {})
        values["milter"] = bool(values.get("milter"))
        values["received"] = bool(values.get("received"))
        return cls(**values)


@dataclass
class TlsSession:
    """The last "TLS connection established" line of one delivery process (``service[pid]``).
    It belongs to the first queue id that process delivers afterwards."""

    ts: float
    level: str | None = None
    protocol: str | None = None
    cipher: str | None = None
    qid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "qid": self.qid, "level": self.level, "protocol": self.protocol, "cipher": self.cipher}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TlsSession":
        return cls(float(data.get("ts") or 0), data.get("level"), data.get("protocol"), data.get("cipher"), data.get("qid"))


__all__ = ["TLS_KEY", "Attempt", "MilterReject", "MessageState", "TlsSession"]
