"""The route marker and its seal: which tenant's smarthost a queued message goes to.

The milter adds two top-level header fields to every message it accepts::

    X-Relay-Route: acme
    X-Relay-Route-Seal: v1.<base64url HMAC-SHA256>

Postfix routes on the first (``milter_header_checks``: only headers a milter
added are matched). The second binds the first to the message: an HMAC, under a
key only this relay holds (``<config_directory>/relay/route.key``), over the tenant id, the
final envelope sender and the SHA-256 of the body. All three survive a requeue
unchanged, so when an operator runs ``postsuper -r`` the milter sees the message
again (master.cf ``cleanup_requeue`` runs it in "requeue" mode), checks the seal
and re-adds the marker itself; Postfix again routes only on what the milter
added. A marker copied from another message, or one hidden in a MIME part or an
attached message, never routes anything.

Pure functions, no pymilter, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from relay_milter import defaults

SEAL_VERSION = "v1"


def seal(key: bytes, tenant_id: str, envelope_sender: str, body_sha256: bytes) -> str:
    """The seal value for a message routed to ``tenant_id``."""
    msg = b"\0".join(
        [
            b"tenant-relay route " + SEAL_VERSION.encode(),
            tenant_id.encode("ascii"),
            envelope_sender.strip().strip("<>").lower().encode("utf-8", "surrogateescape"),
            body_sha256,
        ]
    )
    mac = hmac.new(key, msg, hashlib.sha256).digest()
    return f"{SEAL_VERSION}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


@dataclass(frozen=True)
class RequeueDecision:
    """What the milter does with a message an operator requeued.

    ``tenant``: the tenant id to route to again, or None (the message then has no
    route and waits on the deferred "unrouted" transport: never another tenant).
    ``deletes``: (header name as seen, 1-based occurrence) of every marker and seal,
    bottom up. ``reason``: why it does not route, for the log.
    """

    tenant: str | None
    deletes: tuple[tuple[str, int], ...]
    reason: str = ""
    seal: str = ""


def requeue_decision(
    key: bytes,
    known_tenants: frozenset[str],
    envelope_sender: str,
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...],
    body_sha256: bytes,
) -> RequeueDecision:
    """Check the top-level marker and seal of a message coming back through cleanup.

    Exactly one marker and one seal may be present (the milter deleted every
    client copy when it accepted the message); the seal must verify for the
    marker's tenant, this envelope sender and this body.
    """
    route, seal_name = defaults.ROUTE_HEADER.lower(), defaults.ROUTE_SEAL_HEADER.lower()
    seen: dict[str, int] = {}
    markers: list[tuple[str, int, str]] = []
    seals: list[tuple[str, int, str]] = []
    for name, value in headers:
        lname = name.lower().rstrip(" \t")
        if lname in (route, seal_name):
            n = seen[lname] = seen.get(lname, 0) + 1
            (markers if lname == route else seals).append((name, n, value.strip()))
    deletes = tuple(sorted(((n, i) for n, i, _ in markers + seals), key=lambda e: (e[0].lower(), -e[1])))

    def refuse(reason: str) -> RequeueDecision:
        return RequeueDecision(None, deletes, reason)

    if not markers:
        return refuse("no route marker")
    if len(markers) != 1 or len(seals) != 1:
        return refuse(f"{len(markers)} route markers and {len(seals)} seals, expected one of each")
    tenant, got = markers[0][2], seals[0][2]
    if tenant not in known_tenants:
        return refuse(f"route marker names tenant {tenant[:40]!r}, which is not configured")
    want = seal(key, tenant, envelope_sender, body_sha256)
    if not hmac.compare_digest(want.encode(), got.encode("utf-8", "surrogateescape")):
        return refuse("route seal does not match this message")
    return RequeueDecision(tenant, deletes, seal=want)
