"""Webhooks: push each tenant's delivery events to the tenant, signed, in order, never dropped.

The body is built once, when the tracker records the event (``payload``), and stored in
the outbox; every retry sends the same bytes with the same ``X-Relay-Event-Id``, so a
receiver deduplicates on that id (delivery is at least once: a crash between the POST and
the commit repeats the POST).

Signature (``X-Relay-Signature: t=<unix>,v1=<hex>``): HMAC-SHA256 with the tenant's
``webhook_secret`` over ``f"{t}.".encode() + body``. The timestamp is inside the MAC so a
captured request cannot be replayed later; receivers check it with ``verify_signature``:

    from relay_milter.tracking.webhooks import verify_signature
    ok = verify_signature(secret, request.headers["X-Relay-Signature"], request.body)

Order: one event per POST, and only the oldest undelivered row of a tenant is ever sent
(the store's ``outbox_due``). A failing receiver holds back that tenant's later events,
never another tenant's. Failed attempts are retried with exponential backoff
(``backoff``), without a maximum: the backlog shows in metrics and ``relayctl stats``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import http.client
import threading
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from relay_milter import defaults
from relay_milter.config import TenantSecrets, TenantSet, TrackingSettings
from relay_milter.tracking.egress import DeadlineExceeded, EgressRefused, IPNetwork, http_post
from relay_milter.tracking.events import Event, Kind, iso
from relay_milter.logs import event as log_event

if TYPE_CHECKING:
    from relay_milter.tracking.store import OutboxRow, Store, Tx

log = logging.getLogger("relay.webhooks")

PAYLOAD_VERSION = "1"

_DESCRIPTIONS = {
    Kind.RECEIVED: "Accepted by the relay and queued for the tenant's smarthost",
    Kind.RELAYED: "Relayed: the tenant's smarthost accepted the message",
    Kind.DEFERRED: "Temporary failure: the relay retries the delivery",
    Kind.BOUNCED: "Permanent failure: the message was bounced or expired in the queue",
    Kind.REJECTED: "Refused at ingress: the relay did not accept the message",
}

# Postfix smtp_tls_security_level values that make TLS mandatory ("may" is opportunistic).
_ENFORCED_TLS = {"encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"}


# -- the body -------------------------------------------------------------------------


def _tls_requested(value: Any) -> bool:
    """Was TLS required for this hop? The tracker records Postfix's security level."""
    if isinstance(value, bool):
        return value
    return str(value or "").lower() in _ENFORCED_TLS


def _transport_encryption(tls: dict | None) -> dict[str, Any] | None:
    if tls is None:
        return None
    return {
        "requested": _tls_requested(tls.get("requested")),
        "established": bool(tls.get("established")),
        "properties": {
            "protocol": tls.get("protocol"),
            "cipherSuite": tls.get("cipher"),
            "level": tls.get("level"),
        },
    }


def payload(ev: Event, node: str | None = None) -> dict[str, Any]:
    """The webhook body for one event (Retarus-style). Deterministic: the same event gives
    the same body, so a stored payload can be compared with a rebuilt one.

    ``receivedTs`` is when the relay recorded the event (the log line's time); ``node``
    defaults to the node that recorded it.
    """
    if ev.id is None:
        raise ValueError("payload() needs a stored event (id is None)")
    return {
        "meta": {"tenant": ev.tenant, "node": node or ev.node, "version": PAYLOAD_VERSION, "receivedTs": iso(ev.ts)},
        "notifications": [
            {
                "meta": {
                    "id": ev.id,
                    "queueId": ev.queue_id,
                    "mail": {
                        "id": ev.message_id,
                        "upstreamId": ev.upstream_id,
                        "email": ev.recipient,
                        "originalEmail": ev.original_recipient,
                        "from": ev.sender,
                    },
                    "event": {
                        "type": ev.kind.value,
                        "state": ev.kind.state,
                        "ts": iso(ev.ts),
                        "description": _DESCRIPTIONS[ev.kind],
                    },
                },
                "content": {
                    "mime": {"messageId": ev.message_id, "size": str(ev.size) if ev.size is not None else None},
                    "smtp": {
                        "responseCode": ev.response_code,
                        "reason": ev.reason,
                        "relay": ev.relay,
                        "dsn": ev.dsn,
                        "nextRetry": iso(ev.next_retry),
                        "transportEncryption": _transport_encryption(ev.tls),
                    },
                },
            }
        ],
    }


def body(ev: Event) -> str:
    """The exact text stored in the outbox and POSTed on every attempt: ``payload(ev)`` as
    compact JSON (UTF-8, not ASCII-escaped)."""
    return json.dumps(payload(ev), separators=(",", ":"), ensure_ascii=False)


def record_event(tx: "Tx", ev: Event, webhook: bool = False) -> int:
    """Record ``ev`` in the store transaction ``tx``; with ``webhook`` also queue its body for
    the tenant's webhook in the same transaction. Returns the event id."""
    event_id = tx.add_event(ev)
    if webhook:
        tx.queue_webhook(ev, body(ev))
    return event_id


# -- signatures -----------------------------------------------------------------------


def _mac(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: float) -> str:
    """The X-Relay-Signature value for ``body`` sent at unix time ``t``."""
    ts = int(t)
    return f"t={ts},v1={_mac(secret, body, ts)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    tolerance: float = defaults.WEBHOOK_SIGNATURE_TOLERANCE,
    now: float | None = None,
) -> bool:
    """For receivers: True if ``header`` signs exactly ``body`` with ``secret`` and its
    timestamp is within ``tolerance`` seconds of ``now``. Several ``v1=`` values are
    accepted (any may match), which lets a sender sign with an old and a new secret."""
    t: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            try:
                t = int(value)
            except ValueError:
                return False
        elif name == "v1":
            macs.append(value)
    if t is None or not macs:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = _mac(secret, body, t)
    return any(hmac.compare_digest(expected, m) for m in macs)


def backoff(attempts: int, base: float = defaults.WEBHOOK_BACKOFF_BASE, cap: float = defaults.WEBHOOK_BACKOFF_MAX) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base, 2*base, 4*base, ...
    up to ``cap``."""
    if attempts < 1:
        return 0.0
    return float(min(base * 2 ** min(attempts - 1, 60), cap))


# -- sending --------------------------------------------------------------------------


def _where(url: str) -> str:
    """The URL without user info, path or query (which may carry a token), for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def post(url: str, body: bytes, headers: dict[str, str], timeout: float,
         allow: tuple[IPNetwork, ...] = ()) -> tuple[int | None, str]:
    """POST and return (HTTP status or None, error text; "" on 2xx). The error text is the
    status alone ("HTTP 500"): the receiver's answer is not stored. ``timeout`` bounds the
    whole request; only the addresses egress allows (public, or in ``allow``) are used."""
    where = _where(url)
    try:
        status = http_post(url, body, headers, timeout, allow)
    except EgressRefused as exc:
        return None, f"{where}: {exc}"
    except DeadlineExceeded as exc:
        return None, f"{where}: {exc}"
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, bad reply, ...
        return None, f"{where}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
    if 200 <= status < 300:
        return status, ""
    return status, f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")


class WebhookSender:
    """Delivers the outbox: the tracker runs ``run`` in a thread; tests call ``run_once``.

    A tenant whose webhook was removed from its tenant file (or who has no secret) keeps
    its undelivered rows: they are logged once and sent if the webhook comes back.
    """

    def __init__(
        self,
        store: "Store",
        tenants: TenantSet,
        secrets: dict[str, TenantSecrets],
        settings: TrackingSettings,
        clock: Callable[[], float] = time.time,
        batch: int = 50,
    ):
        self.store = store
        self.tenants = tenants
        self.secrets = secrets
        self.settings = settings
        self.clock = clock
        self.batch = batch
        self._parked: set[str] = set()  # tenants without a usable webhook (logged once)

    def _target(self, tenant: str) -> tuple[str, str, float] | None:
        """(url, secret, timeout) or None when the tenant's webhook is not configured."""
        t = self.tenants.by_id(tenant)
        secret = self.secrets.get(tenant)
        if t is None or t.webhook is None or secret is None or not secret.webhook_secret:
            return None
        return t.webhook.url, secret.webhook_secret, t.webhook.timeout

    def _park(self, row: "OutboxRow") -> None:
        if row.tenant in self._parked:
            return
        self._parked.add(row.tenant)
        backlog = self.store.outbox_backlog().get(row.tenant, 0)
        why = "no such tenant" if self.tenants.by_id(row.tenant) is None else "no webhook url or webhook_secret"
        log_event(log, logging.WARNING, None, "webhook_parked", tenant=row.tenant, backlog=backlog, reason=why,
                  action="rows kept; they are sent once the tenant has a webhook again")

    def _send(self, row: "OutboxRow", url: str, secret: str, timeout: float) -> str:
        body = row.payload.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tenant-relay-webhooks/1",
            "X-Relay-Event-Id": str(row.event_id),
            defaults.WEBHOOK_SIGNATURE_HEADER: sign(secret, body, self.clock()),
        }
        status, error = post(url, body, headers, timeout, self.settings.webhook_allow_networks)
        if status is not None and 200 <= status < 300:
            return ""
        return error or f"HTTP {status}"

    def run_round(self) -> tuple[int, int]:
        """One round: the due head row of each tenant, one POST each. Returns (delivered,
        failed). The transaction stays open over the POSTs: on PostgreSQL it holds the
        tenants' advisory locks; on SQLite it takes the writer only to record outcomes."""
        delivered = failed = 0
        with self.store.transaction() as tx:
            now = self.clock()
            due = tx.outbox_due(now, self.batch + len(self._parked))
            outcomes: list[tuple[OutboxRow, str, float]] = []
            for row in due:
                target = self._target(row.tenant)
                if target is None:
                    self._park(row)
                    continue
                if row.tenant in self._parked:
                    self._parked.discard(row.tenant)
                    log_event(log, logging.INFO, None, "webhook_resumed", tenant=row.tenant)
                outcomes.append((row, self._send(row, *target), self.clock()))
            for row, error, at in outcomes:
                if not error:
                    tx.outbox_done(row.id, at)
                    delivered += 1
                    self._log_done(row)
                else:
                    retry = at + backoff(row.attempts + 1, self.settings.webhook_backoff_base, self.settings.webhook_backoff_max)
                    tx.outbox_failed(row.id, at, error, retry)
                    failed += 1
                    self._log_failed(row, error, retry)
        return delivered, failed

    def run_once(self, max_rounds: int = 1000) -> int:
        """Send everything that is due now, tenant by tenant in order; returns how many rows
        were delivered. Stops when a round delivers nothing (all heads wait or failed)."""
        total = 0
        for _ in range(max_rounds):
            delivered, _failed = self.run_round()
            total += delivered
            if not delivered:
                break
        return total

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set. A store or programming error is logged and retried
        after a pause: the sender thread must not die quietly while the tracker runs."""
        interval = self.settings.poll_interval
        log_event(log, logging.INFO, None, "webhook_sender_started", store=self.store.safe_dsn)
        while not stop.is_set():
            try:
                delivered, _failed = self.run_round()
            except Exception as exc:  # noqa: BLE001 - logged, retried
                log_event(log, logging.ERROR, None, "webhook_sender_error", error=f"{type(exc).__name__}: {exc}")
                stop.wait(max(interval, 5.0))
                continue
            if not delivered:
                stop.wait(interval)
        log_event(log, logging.INFO, None, "webhook_sender_stopped")

    @staticmethod
    def _qid(row: "OutboxRow") -> str | None:
        try:
            return json.loads(row.payload)["notifications"][0]["meta"].get("queueId")
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def _log_done(self, row: "OutboxRow") -> None:
        log_event(log, logging.INFO, self._qid(row), "webhook_delivered", tenant=row.tenant, event_id=row.event_id,
                  attempts=row.attempts + 1)

    def _log_failed(self, row: "OutboxRow", error: str, retry: float) -> None:
        log_event(log, logging.WARNING, self._qid(row), "webhook_failed", tenant=row.tenant, event_id=row.event_id,
                  attempts=row.attempts + 1, error=error, next_attempt=iso(retry))
