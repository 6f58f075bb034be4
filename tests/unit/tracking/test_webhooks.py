"""Webhooks: the body, the signature, and the sender against a real HTTP receiver, on both stores.

Time is an injected clock: backoff is checked by moving the clock, never by sleeping.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from relay_milter.config import Tenant, TenantSecrets, TenantSet, TrackingSettings
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import Store, open_store
from relay_milter.tracking.webhooks import WebhookSender, backoff, payload, record_event, sign, verify_signature
from support.webhook_receiver import WebhookReceiver

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z
SECRETS = {"acme": TenantSecrets(webhook_secret="acme-webhook-secret-0123"), "globex": TenantSecrets(webhook_secret="globex-webhook-secret-45")}
_dbs = itertools.count()


# -- payload --------------------------------------------------------------------------


def test_payload_relayed_with_tls():
    ev = Event(
        Kind.RELAYED, T0 + 0.25, "relay1", tenant="acme", queue_id="89037160377", message_id="<m1@acme.example>",
        upstream_id="up-42", sender="news@acme.example", recipient="alice@example.org",
        original_recipient="alice=example.org@acme.relay.test", relay="127.0.0.1[127.0.0.1]:2525",
        response_code="250", dsn="2.0.0", reason="sent (250 2.0.0 Ok: queued as 4XyZ)",
        tls={"requested": "verify", "established": True, "level": "Verified", "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        size=1091, client="localhost[127.0.0.1]", id=42,
    )
    assert payload(ev) == {
        "meta": {"tenant": "acme", "node": "relay1", "version": "1", "receivedTs": "2026-11-18T11:06:40.250Z"},
        "notifications": [{
            "meta": {
                "id": 42, "seq": None, "queueId": "89037160377",
                "mail": {"id": "<m1@acme.example>", "upstreamId": "up-42", "email": "alice@example.org",
                         "originalEmail": "alice=example.org@acme.relay.test", "from": "news@acme.example"},
                "event": {"type": "RELAYED", "state": "FINISHED", "ts": "2026-11-18T11:06:40.250Z",
                          "description": "Relayed: the tenant's smarthost accepted the message"},
            },
            "content": {
                "mime": {"messageId": "<m1@acme.example>", "size": "1091"},
                "smtp": {"responseCode": "250", "reason": "sent (250 2.0.0 Ok: queued as 4XyZ)",
                         "relay": "127.0.0.1[127.0.0.1]:2525", "dsn": "2.0.0", "nextRetry": None,
                         "transportEncryption": {"requested": True, "established": True,
                                                 "properties": {"protocol": "TLSv1.3", "cipherSuite": "TLS_AES_256_GCM_SHA384", "level": "Verified"}}},
            },
        }],
    }
    assert payload(ev, node="relay9")["meta"]["node"] == "relay9"


def test_payload_deferred_has_next_retry_and_opportunistic_tls():
    ev = Event(
        Kind.DEFERRED, T0, "relay1", tenant="acme", queue_id="Q1", recipient="bob@example.org", response_code="451",
        dsn="4.3.0", reason="deferred (451 4.3.0 try again later)", next_retry=T0 + 300,
        tls={"requested": "may", "established": False}, id=7,
    )
    body = payload(ev)
    note = body["notifications"][0]
    assert note["meta"]["event"] == {"type": "DEFERRED", "state": "RETRYING", "ts": "2026-11-18T11:06:40.000Z",
                                     "description": "Temporary failure: the relay retries the delivery"}
    assert note["content"]["smtp"]["nextRetry"] == "2026-11-18T11:11:40.000Z"
    assert note["content"]["smtp"]["transportEncryption"] == {
        "requested": False, "established": False, "properties": {"protocol": None, "cipherSuite": None, "level": None}}
    assert note["content"]["mime"] == {"messageId": None, "size": None}


def test_payload_rejected():
    ev = Event(Kind.REJECTED, T0, "relay1", tenant="acme", sender="news@acme.example", recipient="x@acme.relay.test",
               response_code="550", dsn="5.7.1", reason="hop signature missing", client="localhost[127.0.0.1]", id=9)
    note = payload(ev)["notifications"][0]
    assert note["meta"]["queueId"] is None
    assert note["meta"]["event"]["type"] == "REJECTED" and note["meta"]["event"]["state"] == "FINISHED"
    assert note["content"]["smtp"] == {"responseCode": "550", "reason": "hop signature missing", "relay": None,
                                       "dsn": "5.7.1", "nextRetry": None, "transportEncryption": None}
    with pytest.raises(ValueError, match="stored event"):
        payload(Event(Kind.REJECTED, T0, "relay1"))


# -- signature, backoff ---------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering():
    secret, body = "acme-webhook-secret-0123", b'{"meta": {"tenant": "acme"}}'
    header = sign(secret, body, T0)
    assert header.startswith(f"t={int(T0)},v1=")
    assert verify_signature(secret, header, body, tolerance=300, now=T0 + 10)
    assert not verify_signature(secret, header, body + b" ", tolerance=300, now=T0)  # tampered body
    assert not verify_signature("another-secret-456789", header, body, tolerance=300, now=T0)  # wrong secret
    assert not verify_signature(secret, header, body, tolerance=300, now=T0 + 301)  # stale
    assert not verify_signature(secret, header, body, tolerance=300, now=T0 - 301)  # from the future
    # The timestamp is covered: moving it breaks the MAC.
    moved = header.replace(f"t={int(T0)}", f"t={int(T0) + 100}")
    assert not verify_signature(secret, moved, body, tolerance=300, now=T0 + 100)
    for junk in ("", "v1=abc", f"t={int(T0)}", "t=x,v1=ab", "garbage"):
        assert not verify_signature(secret, junk, body, now=T0)
    # Secret rotation: any v1 may match.
    rotated = f"{sign('old-secret-0123456789', body, T0)},v1={header.split('v1=')[1]}"
    assert verify_signature(secret, rotated, body, now=T0)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(n, 30, 3600) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff(0, 30, 3600) == 0
    assert backoff(10_000, 30, 3600) == 3600  # no overflow for a tenant down for months


# -- the sender, against a real receiver, on both stores -----------------------------------


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def tenant(tid: str, url: str | None, timeout: float = 5) -> Tenant:
    data = dict(
        id=tid, relay_domain=f"{tid}.relay.test", signing_domain=f"hop.{tid}.test", selector="s1",
        allowed_sender_domains=[f"{tid}.example"], smarthost={"host": "127.0.0.1", "port": 2525},
    )
    if url:
        data["webhook"] = {"url": url, "timeout": timeout}
    return Tenant.model_validate(data)


def tenant_set(*tenants: Tenant) -> TenantSet:
    return TenantSet(tenants=tenants, sources={t.id: Path(f"/etc/tenant-relay/tenants/{t.id}.yaml") for t in tenants})


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path}/events.db"
    else:
        from support.pgcluster import create_database

        dsn = create_database(request.getfixturevalue("pg_dsn"), f"w{next(_dbs)}")
    s = open_store(dsn)
    yield s
    s.close()


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


# The receiver is on loopback, which webhooks may only reach when allowed explicitly.
LOOPBACK = ["127.0.0.0/8"]
SETTINGS = TrackingSettings(poll_interval=0.05, webhook_backoff_base=30, webhook_backoff_max=3600, webhook_allow_networks=LOOPBACK)


def sender(store: Store, receiver: WebhookReceiver, clock: Clock, settings: TrackingSettings = SETTINGS, **urls: str | None) -> WebhookSender:
    urls = {"acme": receiver.url, "globex": receiver.url, **urls}
    return WebhookSender(store, tenant_set(*(tenant(t, u) for t, u in urls.items())), SECRETS, settings, clock=clock)


def record(store: Store, tenant_id: str, n: int, start: float = 0) -> list[int]:
    with store.transaction() as tx:
        return [
            record_event(tx, Event(Kind.RECEIVED, T0 + start + i, "relay1", tenant=tenant_id, queue_id=f"Q{tenant_id}{start + i:g}",
                                   recipient=f"r{i}@example.org"), webhook=True)
            for i in range(n)
        ]


def ids(requests, tenant_id: str | None = None) -> list[int]:
    return [r.event_id for r in requests if tenant_id is None or r.json["meta"]["tenant"] == tenant_id]


def head(store: Store, tenant_id: str):
    with store.transaction() as tx:
        return next(r for r in tx.outbox_due(float("inf")) if r.tenant == tenant_id)


def test_sender_delivers_in_order_signed(store, receiver):
    acme, globex = record(store, "acme", 3), record(store, "globex", 2, start=10)
    clock = Clock(T0 + 100)
    assert sender(store, receiver, clock).run_once() == 5
    assert ids(receiver.requests, "acme") == acme
    assert ids(receiver.requests, "globex") == globex
    for req in receiver.requests:
        assert req.path == "/hooks/relay"
        assert req.headers["Content-Type"] == "application/json"
        assert req.json["notifications"][0]["meta"]["id"] == req.event_id
        secret = SECRETS[req.json["meta"]["tenant"]].webhook_secret
        assert verify_signature(secret, req.headers["X-Relay-Signature"], req.body, now=clock.t)
    assert store.outbox_backlog() == {}
    assert sender(store, receiver, clock).run_once() == 0
    assert len(receiver.requests) == 5


def test_failure_then_redelivery_with_same_event_id(store, receiver):
    first, second = record(store, "acme", 2)
    receiver.respond(500)
    clock = Clock(T0 + 100)
    s = sender(store, receiver, clock)
    assert s.run_once() == 0
    # The failed head blocks the tenant's next event: only one request so far.
    assert [(r.event_id, r.status) for r in receiver.requests] == [(first, 500)]
    assert s.run_once() == 0 and len(receiver.requests) == 1  # not due yet
    row = head(store, "acme")
    assert (row.event_id, row.attempts, row.next_attempt) == (first, 1, clock.t + 30)
    [error] = store._query("SELECT last_error FROM outbox WHERE id = ?", [row.id])[0].values()
    assert error == "HTTP 500"  # the status, never the receiver's body
    clock.t += 30
    assert s.run_once() == 2
    assert [(r.event_id, r.status) for r in receiver.requests] == [(first, 500), (first, 200), (second, 200)]
    assert receiver.requests[0].body == receiver.requests[1].body  # the same stored bytes


@pytest.mark.parametrize("status,delivered", [(204, True), (302, False), (404, False), (503, False)])
def test_only_2xx_counts_as_delivered(store, receiver, status, delivered):
    record(store, "acme", 1)
    receiver.respond(status)
    assert sender(store, receiver, Clock(T0 + 100)).run_once() == int(delivered)
    assert store.outbox_backlog() == ({} if delivered else {"acme": 1})


def test_receiver_down_then_up_delivers_everything_once_in_order(store, receiver):
    clock = Clock(T0 + 100)
    s = sender(store, receiver, clock)
    receiver.down()
    early = record(store, "acme", 3)
    assert s.run_once() == 0
    [error] = store._query("SELECT last_error FROM outbox WHERE event_id = ?", [early[0]])[0].values()
    assert "refused" in error.lower()
    late = record(store, "acme", 2, start=50) + record(store, "globex", 2, start=60)
    clock.t += 30
    assert s.run_once() == 0  # still down: acme's head fails again, globex's fails once
    assert head(store, "acme").attempts == 2
    receiver.up()
    clock.t += 3600
    assert s.run_once() == 7
    assert ids(receiver.requests, "acme") == early + late[:2]
    assert ids(receiver.requests, "globex") == late[2:]
    assert sorted(ids(receiver.requests)) == sorted(set(ids(receiver.requests)))  # exactly once
    assert store.outbox_backlog() == {}


@pytest.mark.parametrize("cap,expected", [(3600, [30, 60, 120, 240, 480, 960]), (100, [30, 60, 100, 100, 100, 100])])
def test_backoff_grows_between_attempts(store, receiver, cap, expected):
    record(store, "acme", 1)
    receiver.default_status = 503
    clock = Clock(T0 + 100)
    settings = TrackingSettings(webhook_backoff_base=30, webhook_backoff_max=cap, webhook_allow_networks=LOOPBACK)
    s = sender(store, receiver, clock, settings)
    waits = []
    for attempt in range(1, len(expected) + 1):
        assert s.run_once() == 0
        row = head(store, "acme")
        assert row.attempts == attempt
        waits.append(row.next_attempt - clock.t)
        clock.t = row.next_attempt - 1
        assert s.run_once() == 0 and len(receiver.requests) == attempt  # one second early: nothing
        clock.t = row.next_attempt
    assert waits == expected


def test_tenant_without_webhook_keeps_its_rows(store, receiver, caplog):
    acme = record(store, "acme", 2)
    globex = record(store, "globex", 1, start=5)
    clock = Clock(T0 + 100)
    caplog.set_level(logging.INFO, logger="relay.webhooks")
    s = sender(store, receiver, clock, acme=None)  # acme's webhook was removed from its file
    assert s.run_once() == 1
    clock.t += 3600
    assert s.run_once() == 0
    assert ids(receiver.requests) == globex
    assert store.outbox_backlog() == {"acme": 2}
    parked = [r.getMessage() for r in caplog.records if "event=webhook_parked" in r.getMessage()]
    assert len(parked) == 1 and "tenant=acme" in parked[0] and "backlog=2" in parked[0]
    # The webhook comes back: the kept rows go out, in order.
    assert sender(store, receiver, clock).run_once() == 2
    assert ids(receiver.requests, "acme") == acme


def test_run_loop_delivers_and_stops(store, receiver):
    """The tracker's thread: real time, the configured poll interval."""
    s = WebhookSender(store, tenant_set(tenant("acme", receiver.url)), SECRETS, SETTINGS)
    stop = threading.Event()
    thread = threading.Thread(target=s.run, args=(stop,))
    thread.start()
    try:
        [eid] = record(store, "acme", 1)
        for _ in range(200):
            if receiver.delivered():
                break
            stop.wait(0.02)
        assert ids(receiver.delivered()) == [eid]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert json.loads(receiver.requests[0].body)["meta"]["tenant"] == "acme"


# -- per-tenant isolation, pooled connections, Standard Webhooks -----------------------------


def wait_until(predicate, what: str, timeout: float = 60.0):
    """Poll ``predicate`` until it is true; fail with ``what`` after a generous timeout."""
    done = threading.Event()
    deadline = 0.0
    while deadline < timeout:
        value = predicate()
        if value:
            return value
        done.wait(0.02)
        deadline += 0.02
    pytest.fail(f"timed out waiting for {what}")


def test_a_hanging_receiver_holds_up_only_its_own_tenant(store):
    """The issue's slow/fast case: tenant slow's receiver hangs on its first request; tenant
    fast's 20 events, recorded after slow's 20, are all delivered while slow's first is
    still unanswered. Then slow's receiver answers and its events follow, in order."""
    with WebhookReceiver() as slow_rx, WebhookReceiver() as fast_rx:
        slow_rx.hold()
        slow = record(store, "slow", 20)
        fast = record(store, "fast", 20, start=100)
        # slow's timeout is longer than the test waits: its request hangs, it does not fail.
        tenants = tenant_set(tenant("slow", slow_rx.url, timeout=120), tenant("fast", fast_rx.url))
        secrets = {"slow": SECRETS["acme"], "fast": SECRETS["globex"]}
        s = WebhookSender(store, tenants, secrets, SETTINGS)
        stop = threading.Event()
        thread = threading.Thread(target=s.run, args=(stop,))
        thread.start()
        try:
            wait_until(lambda: len(fast_rx.delivered()) == 20, "fast's 20 deliveries")
            # Ordering, not timing: every fast event arrived before slow's second request.
            assert len(slow_rx.arrived) == 1 and slow_rx.requests == []
            assert ids(fast_rx.delivered()) == fast
            # Pooled keep-alive connections: 20 POSTs, not 20 connections.
            assert len({r.peer for r in fast_rx.requests}) <= 2
            wait_until(lambda: store.outbox_backlog() == {"slow": 20}, "fast's last delivery committed")
            assert len(slow_rx.arrived) == 1
            slow_rx.release()
            wait_until(lambda: len(slow_rx.delivered()) == 20, "slow's 20 deliveries")
            assert ids(slow_rx.delivered()) == slow
            assert [r.event_id for r in slow_rx.arrived] == slow  # each sent once, in order
        finally:
            slow_rx.release()
            stop.set()
            thread.join(30)
    assert not thread.is_alive()
    assert store.outbox_backlog() == {}


def test_standard_webhooks_headers_verify_with_the_reference_library(store, receiver):
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from relay_milter.tracking.webhooks import standard_secret

    record(store, "acme", 2)
    clock = Clock(time.time())  # the library checks the timestamp against its own clock
    s = sender(store, receiver, clock)
    receiver.respond(500)
    assert s.run_once() == 0  # the first attempt fails: its retry must carry the same webhook-id
    clock.t += 30  # the retry is due
    assert s.run_once() == 2
    secret = SECRETS["acme"].webhook_secret
    verifier = Webhook(standard_secret(secret))
    first, retry, second = receiver.requests
    for req in (retry, second):
        assert verifier.verify(req.body, req.headers) == req.json
        assert verify_signature(secret, req.headers["X-Relay-Signature"], req.body, now=int(req.headers["webhook-timestamp"]))
    assert first.headers["webhook-id"] == retry.headers["webhook-id"] != second.headers["webhook-id"]
    with pytest.raises(WebhookVerificationError):
        verifier.verify(second.body + b" ", second.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret("another-secret-456789")).verify(second.body, second.headers)
