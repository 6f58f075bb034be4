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

The Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``;
``standard_headers``) are sent as well, so receivers can verify with those libraries.

Order and isolation: one event per POST, and only the oldest undelivered row of a tenant
is ever sent (the store's ``outbox_head``). Each tenant has its own worker thread and
keep-alive connection pool (``_TenantWorker``, ``transport.client``): a failing or hanging
receiver holds back that tenant's later events, never another tenant's. Failed attempts
are retried with exponential backoff (``backoff``), without a maximum: the backlog shows in
metrics and ``relayctl stats``. Connections go only where the egress policy allows
(``egress``), and ``webhook.timeout`` bounds each whole request (``transport``).

Replays (``replay``) queue a tenant's events again from a sequence number, marked as such.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlsplit

import httpx

from relay_milter import defaults
from relay_milter.config import TenantSecrets, TenantSet, TrackingSettings
from relay_milter.tracking import egress, transport
from relay_milter.tracking.events import Event, Kind, engagement_detail, iso
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
    Kind.OPENED: "Opened: the recipient's mail client loaded the open pixel (engagement tracking)",
    Kind.CLICKED: "Clicked: the recipient followed a tracked link (engagement tracking)",
    Kind.DELAYED: "Delayed beyond the smarthost: a remote server reported a temporary failure",
    Kind.COMPLAINED: "Complaint: a feedback report (ARF) about the message",
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
    data = {
        "meta": {"tenant": ev.tenant, "node": node or ev.node, "version": PAYLOAD_VERSION, "receivedTs": iso(ev.ts)},
        "notifications": [
            {
                "meta": {
                    "id": ev.id,
                    "seq": ev.seq,
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
    if ev.kind.engagement:  # opens and clicks: {"repeat": bool, "count": n, "url": ...}
        data["notifications"][0]["content"]["engagement"] = engagement_detail(ev)
    if ev.detail is not None:  # bounce tracking (issue 15 A): a report past the smarthost
        data["notifications"][0]["meta"]["event"]["async"] = bool(ev.detail.get("async"))
        data["notifications"][0]["content"]["report"] = ev.detail
    return data


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


def replay_body(ev: Event) -> str:
    """The body of a replayed event: the original payload with ``meta.replay: true``."""
    data = payload(ev)
    data["meta"]["replay"] = True
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def replay(store: "Store", tenant: str, after: int, batch: int = 1000) -> int:
    """Queue ``tenant``'s events with a sequence number above ``after`` for sending again,
    marked as replays (``meta.replay``, header ``X-Relay-Replay: 1``) and signed as usual.
    They go behind the tenant's pending rows, in sequence order. Returns how many."""
    queued = 0
    while True:
        events = store.events_after(tenant, after, batch)
        if not events:
            return queued
        with store.transaction() as tx:
            for ev in events:
                tx.queue_webhook(ev, replay_body(ev), replay=True)
        queued += len(events)
        after = events[-1].seq or after


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


# -- Standard Webhooks ------------------------------------------------------------------


def standard_headers(secret: str, msg_id: str, body: bytes, t: float) -> dict[str, str]:
    """The Standard Webhooks header set (standardwebhooks.com) for ``body``: ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 over
    ``f"{id}.{timestamp}.{body}"``). The key is the UTF-8 bytes of the tenant's
    ``webhook_secret``; in the libraries' ``whsec_`` form that is
    ``"whsec_" + base64(webhook_secret)`` (``standard_secret``)."""
    ts = str(int(t))
    mac = hmac.new(secret.encode(), f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": "v1," + base64.b64encode(mac).decode()}


def standard_secret(secret: str) -> str:
    """The tenant's ``webhook_secret`` as a Standard Webhooks library expects it."""
    return "whsec_" + base64.b64encode(secret.encode()).decode()


# -- sending --------------------------------------------------------------------------


def _where(url: str) -> str:
    """The URL without user info, path or query (which may carry a token), for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def egress_connector(allow: Iterable[egress.IPNetwork] = ()) -> transport.Connector:
    """Connections the egress policy allows: public unicast addresses, plus ``allow``
    (settings ``tracking.webhook_allow_networks``), judged on the resolved address."""
    allowed = tuple(allow)

    def connect(host: str, port: int, deadline: float) -> Any:
        return egress.connect(host, port, deadline, allowed)

    return connect


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, allow: Iterable[egress.IPNetwork] = (),
         http: httpx.Client | None = None) -> tuple[int | None, str]:
    """POST and return (HTTP status or None, error text; "" on 2xx). The error text is the
    status alone ("HTTP 500"): the receiver's answer is not stored. ``timeout`` bounds the
    whole request. ``http`` is the worker's pooled client (its connector applies the egress
    policy); without one, a one-off client connects to what egress allows (``allow``)."""
    if http is None:
        with transport.client(egress_connector(allow)) as once:
            return post(url, body, headers, timeout, http=once)
    where = _where(url)
    try:
        status = transport.post(http, url, body, headers, timeout)
    except transport.DeadlineExceeded as exc:
        return None, f"{where}: {exc}"
    except httpx.HTTPError as exc:  # refused, reset, bad reply, ...
        cause = exc.__context__ or exc.__cause__
        return None, f"{where}: {type(exc).__name__}" + (f" ({cause})" if cause and str(cause) else (f" ({exc})" if str(exc) else ""))
    except OSError as exc:  # the connector refused the address, ...
        return None, f"{where}: {exc.strerror if exc.strerror else exc}"
    if 200 <= status < 300:
        return status, ""
    return status, f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")


class _Job:
    """One request to drain a tenant; ``done`` is set when the drain has finished."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.delivered = 0


class _TenantWorker:
    """One tenant's sender thread with its own connection pool. It drains the tenant's
    outbox strictly in order when asked (``request``) and waits otherwise."""

    def __init__(self, sender: "WebhookSender", tenant: str):
        self.sender = sender
        self.tenant = tenant
        self.http = transport.client(sender.connector)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: _Job | None = None
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"webhooks:{tenant}", daemon=True)
        self.thread.start()

    def request(self) -> _Job:
        """Ask for a drain (a no-op while one is already waiting to start)."""
        with self._lock:
            if self._pending is None:
                self._pending = _Job()
                self._wake.set()
            return self._pending

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                with self._lock:
                    if self._stopping:
                        job = self._pending
                        break
                    job, self._pending = self._pending, None
                    self._wake.clear()
                if job is None:
                    continue
                try:
                    job.delivered = self.sender._drain(self)
                except Exception as exc:  # noqa: BLE001 - logged; the next request retries
                    log_event(log, logging.ERROR, None, "webhook_sender_error", tenant=self.tenant,
                              error=f"{type(exc).__name__}: {exc}")
                finally:
                    job.done.set()
            if job is not None:
                job.done.set()
        finally:
            self.http.close()


class WebhookSender:
    """Delivers the outbox: one worker thread per tenant, each with its own keep-alive
    connection pool, draining its tenant's rows strictly in order. Tenants are independent:
    a receiver that hangs until its timeout holds up only its own tenant.

    ``run`` (the tracker's thread) polls for tenants with due rows and wakes their workers;
    ``run_once`` (tests, ``track --once``) drains every due tenant concurrently and waits.
    ``update`` swaps in new tenants and secrets (a tenant file change) without a restart.

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
        connector: transport.Connector | None = None,
    ):
        self.store = store
        self.tenants = tenants
        self.secrets = secrets
        self.settings = settings
        self.clock = clock
        # Connections go where egress allows (public, or tracking.webhook_allow_networks).
        self.connector = connector or egress_connector(settings.webhook_allow_networks)
        self._workers: dict[str, _TenantWorker] = {}
        self._lock = threading.Lock()
        self._parked: set[str] = set()  # tenants without a usable webhook (logged once)
        self._closing = False

    # -- configuration --
    def update(self, tenants: TenantSet, secrets: dict[str, TenantSecrets]) -> None:
        """New tenant definitions and secrets; the next row sent uses them."""
        with self._lock:
            self.tenants, self.secrets = tenants, secrets

    def _target(self, tenant: str) -> tuple[str, str, float] | None:
        """(url, secret, timeout) or None when the tenant's webhook is not configured."""
        with self._lock:
            t = self.tenants.by_id(tenant)
            secret = self.secrets.get(tenant)
        if t is None or t.webhook is None or secret is None or not secret.webhook_secret:
            return None
        return t.webhook.url, secret.webhook_secret, t.webhook.timeout

    def _park(self, row: "OutboxRow") -> None:
        with self._lock:
            if row.tenant in self._parked:
                return
            self._parked.add(row.tenant)
        backlog = self.store.outbox_backlog().get(row.tenant, 0)
        why = "no such tenant" if self.tenants.by_id(row.tenant) is None else "no webhook url or webhook_secret"
        log_event(log, logging.WARNING, None, "webhook_parked", tenant=row.tenant, backlog=backlog, reason=why,
                  action="rows kept; they are sent once the tenant has a webhook again")

    def _unpark(self, tenant: str) -> None:
        with self._lock:
            if tenant not in self._parked:
                return
            self._parked.discard(tenant)
        log_event(log, logging.INFO, None, "webhook_resumed", tenant=tenant)

    # -- workers --
    def _worker(self, tenant: str) -> _TenantWorker:
        with self._lock:
            worker = self._workers.get(tenant)
            if worker is None:
                worker = self._workers[tenant] = _TenantWorker(self, tenant)
            return worker

    def _drain(self, worker: _TenantWorker) -> int:
        """Send the tenant's due rows in order until none is due or one fails; returns how
        many were delivered. Each row is one transaction: on PostgreSQL it holds the
        tenant's advisory lock over the POST, so two nodes never send the same tenant."""
        delivered = 0
        while not self._closing:
            with self.store.transaction() as tx:
                row = tx.outbox_head(worker.tenant, self.clock())
                if row is None:
                    return delivered
                target = self._target(row.tenant)
                if target is None:
                    self._park(row)
                    return delivered
                self._unpark(row.tenant)
                error = self._send(worker.http, row, *target)
                at = self.clock()
                if not error:
                    tx.outbox_done(row.id, at)
                else:
                    retry = at + backoff(row.attempts + 1, self.settings.webhook_backoff_base, self.settings.webhook_backoff_max)
                    tx.outbox_failed(row.id, at, error, retry)
            if error:
                self._log_failed(row, error, retry)
                return delivered
            delivered += 1
            self._log_done(row)
        return delivered

    def headers(self, row: "OutboxRow", secret: str, body: bytes) -> dict[str, str]:
        """Every header of one attempt: ours and the Standard Webhooks set. ``webhook-id``
        is the outbox row (the same on every retry; a replay is a new row)."""
        now = self.clock()
        out = {
            "Content-Type": "application/json",
            "X-Relay-Event-Id": str(row.event_id),
            defaults.WEBHOOK_SIGNATURE_HEADER: sign(secret, body, now),
            **standard_headers(secret, f"msg_{row.id}", body, now),
        }
        if row.replay:
            out["X-Relay-Replay"] = "1"
        return out

    def _send(self, http: httpx.Client, row: "OutboxRow", url: str, secret: str, timeout: float) -> str:
        body = row.payload.encode("utf-8")
        status, error = post(url, body, self.headers(row, secret, body), timeout, http=http)
        if status is not None and 200 <= status < 300:
            return ""
        return error or f"HTTP {status}"

    def due_tenants(self) -> list[str]:
        return self.store.outbox_due_tenants(self.clock())

    def run_once(self) -> int:
        """Drain every tenant that has a due row, concurrently, and wait; returns how many
        rows were delivered. A tenant stops at its first failure (its head then waits
        for its backoff)."""
        jobs = [self._worker(t).request() for t in self.due_tenants()]
        for job in jobs:
            job.done.wait()
        return sum(job.delivered for job in jobs)

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set: every poll interval, wake the workers of tenants
        with due rows. A store error is logged and retried after a pause: the sender must
        not die quietly while the tracker runs."""
        interval = self.settings.poll_interval
        log_event(log, logging.INFO, None, "webhook_sender_started", store=self.store.safe_dsn)
        try:
            while not stop.is_set():
                try:
                    for tenant in self.due_tenants():
                        self._worker(tenant).request()
                except Exception as exc:  # noqa: BLE001 - logged, retried
                    log_event(log, logging.ERROR, None, "webhook_sender_error", error=f"{type(exc).__name__}: {exc}")
                    stop.wait(max(interval, 5.0))
                    continue
                stop.wait(interval)
        finally:
            self.close()
            log_event(log, logging.INFO, None, "webhook_sender_stopped")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers; a POST in flight finishes (within its deadline) and is recorded."""
        self._closing = True
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.stop()
        end = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.0, end - time.monotonic()))
        self._closing = False

    def __enter__(self) -> "WebhookSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _qid(row: "OutboxRow") -> str | None:
        try:
            return json.loads(row.payload)["notifications"][0]["meta"].get("queueId")
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def _log_done(self, row: "OutboxRow") -> None:
        log_event(log, logging.INFO, self._qid(row), "webhook_delivered", tenant=row.tenant, event_id=row.event_id,
                  attempts=row.attempts + 1, **({"replay": 1} if row.replay else {}))

    def _log_failed(self, row: "OutboxRow", error: str, retry: float) -> None:
        log_event(log, logging.WARNING, self._qid(row), "webhook_failed", tenant=row.tenant, event_id=row.event_id,
                  attempts=row.attempts + 1, error=error, next_attempt=iso(retry))
