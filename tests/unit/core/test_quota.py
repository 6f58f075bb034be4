"""Per-tenant ingress limits and backpressure (core/quota.py), alone and through the policy."""

from __future__ import annotations

import json

import pytest

from relay_milter.config import Settings
from relay_milter.core.policy import Action, Policy, Transaction
from relay_milter.core.quota import IngressGate, TenantQueue
from relay_milter.core.quota import freshness, parse_summary, summary_document
from relay_milter.milter.backpressure import QueueWatcher
from relay_milter.postfix import queue as ops
from relay_milter.tracking.queuesummary import write_summary
from support.factories import tenant, tenant_set


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_minute_and_day_windows_count_accepted_messages():
    clock = Clock(86400 * 20000 + 30)
    gate = IngressGate(clock=clock)
    t = tenant("acme", limits={"messages_per_minute": 2, "messages_per_day": 3})
    for _ in range(2):
        assert gate.rate(t) is None
        gate.accepted(t)
    code, dsn, reason = gate.rate(t)
    assert (code, dsn) == ("452", "4.7.0") and "limit messages_per_minute (2)" in reason
    clock.now += 60  # the next minute: one more fits the day
    assert gate.rate(t) is None
    gate.accepted(t)
    assert "limit messages_per_day (3)" in gate.rate(t)[2]
    clock.now += 86400
    assert gate.rate(t) is None and gate.counts("acme") == (0, 0)


def test_other_tenants_and_unlimited_tenants_are_not_counted():
    gate = IngressGate(clock=Clock())
    a, b = tenant("acme", limits={"messages_per_minute": 1}), tenant("globex")
    gate.accepted(a)
    gate.accepted(b)
    assert gate.rate(a) is not None and gate.rate(b) is None and gate.counts("globex") == (0, 0)


def test_backpressure_by_count_and_age():
    clock = Clock()
    gate = IngressGate(clock=clock)
    t = tenant("acme", limits={"max_queued": 3, "max_queue_age": 600})
    gate.set_queues({"acme": TenantQueue(2, clock.now - 100)})
    assert gate.backpressure(t) is None
    gate.set_queues({"acme": TenantQueue(3, clock.now - 100)})
    code, dsn, reason = gate.backpressure(t)
    assert (code, dsn) == ("452", "4.3.1") and "3 messages queued (limit max_queued 3)" in reason
    gate.set_queues({"acme": TenantQueue(1, clock.now - 100)})
    clock.now += 500  # the summary holds an arrival time, so age grows between refreshes
    assert "limit max_queue_age 600s" in gate.backpressure(t)[2]
    assert gate.backpressure(tenant("globex")) is None


def test_tracker_summary_attributes_by_sender_domain_and_skips_hold():
    """What the tracker writes for the milter: held messages do not count, unattributed ones
    are left out, the oldest deferred arrival is kept."""
    ts = tenant_set(tenant("acme", headers={"envelope_sender": "bounces@mail.acme.example"}), tenant("globex"))
    lines = [
        json.dumps({"queue_id": "A1", "queue_name": "deferred", "sender": "news@acme.example", "arrival_time": 200}),
        json.dumps({"queue_id": "A2", "queue_name": "deferred", "sender": "bounces@mail.acme.example", "arrival_time": 100}),
        json.dumps({"queue_id": "B1", "queue_name": "active", "sender": "x@hop.globex.test", "arrival_time": 300}),
        json.dumps({"queue_id": "B2", "queue_name": "hold", "sender": "news@globex.example", "arrival_time": 50}),
        json.dumps({"queue_id": "X1", "queue_name": "deferred", "sender": "x@elsewhere.example", "arrival_time": 10}),
    ]
    messages = ops.attribute(list(ops.parse_postqueue_json(lines)), ts)
    queues = ops.backpressure_queues(ops.queue_summary(messages, 1000.0), 1000.0)
    assert queues == {"acme": TenantQueue(2, 100.0), "globex": TenantQueue(1, None)}
    doc = json.loads(json.dumps(summary_document(queues, 1000.0, "relay1", 5.0)))
    assert parse_summary(doc) == (1000.0, queues)


@pytest.mark.parametrize("doc", [[], {"version": 2}, {"version": 1, "written": "x", "tenants": {}},
                                 {"version": 1, "written": 1.0, "tenants": {"acme": {}}}, {"version": 1, "written": 1.0, "tenants": []}])
def test_a_malformed_summary_is_refused(doc):
    with pytest.raises(ValueError):
        parse_summary(doc)


def test_freshness_of_the_summary():
    assert freshness(100.0, 115.0, 5.0, 120.0) == "fresh"  # within 3 x 5 s
    assert freshness(100.0, 116.0, 5.0, 120.0) == "stale"
    assert freshness(100.0, 221.0, 5.0, 120.0) == "expired"
    assert freshness(100.0, 101.5, 0.2, 120.0) == "stale"  # 3 x 0.2 s, but at least 1 s


class Source:
    """What the watcher asks for the policy in force (the ReloadingPolicy's interface)."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def test_milter_reads_the_summary_file_and_fails_open_when_it_is_missing_or_too_old(tmp_path, caplog):
    clock = Clock()
    summary = tmp_path / "summary.json"
    settings = Settings(reputation={"queue_refresh": 5, "queue_summary_file": str(summary), "queue_summary_max_age": 60,
                                    "milter_metrics_file": str(tmp_path / "milter.prom")})
    acme = tenant("acme", limits={"max_queued": 2})
    policy = Policy(tenant_set(acme, tenant("globex")), settings, gate=IngressGate(clock=clock))
    watcher = QueueWatcher(Source(policy), settings, clock=clock)

    def write(queued: int, written: float) -> None:
        write_summary(summary, summary_document({"acme": TenantQueue(queued, None)}, written, "relay1", 5.0))

    caplog.set_level("INFO", logger="relay.milter")
    watcher.refresh()  # no file yet: nothing to hold anyone back with
    assert watcher.status == "fail_open" and policy.gate.backpressure(acme) is None
    assert "event=queue_summary_unavailable" in caplog.text and "reason=missing" in caplog.text
    assert "relay_backpressure_fail_open 1" in (tmp_path / "milter.prom").read_text()

    write(2, clock.now)
    watcher.refresh()
    assert watcher.status == "fresh" and policy.gate.backpressure(acme)[1] == "4.3.1"
    assert "event=backpressure tenant=acme state=on queued=2" in caplog.text
    prom = (tmp_path / "milter.prom").read_text()
    assert "relay_backpressure_fail_open 0" in prom and 'relay_backpressure_active{tenant="acme"} 1' in prom

    clock.now += 30  # the tracker missed a few rounds: keep the last summary, and say so
    summary.unlink()
    watcher.refresh()
    assert watcher.status == "stale" and policy.gate.backpressure(acme) is not None
    assert "event=queue_summary_stale" in caplog.text

    clock.now += 31  # older than queue_summary_max_age: fail open, for backpressure only
    watcher.refresh()
    assert watcher.status == "fail_open" and policy.gate.backpressure(acme) is None
    assert "event=backpressure tenant=acme state=off" in caplog.text

    write(1, clock.now)  # the tracker is back
    watcher.refresh()
    assert watcher.status == "fresh" and policy.gate.backpressure(acme) is None
    assert "event=queue_summary_ok" in caplog.text

    write(2, clock.now - 61)  # a file the tracker wrote long ago (and then stopped) is no better
    watcher.refresh()
    assert watcher.status == "fail_open" and policy.gate.backpressure(acme) is None
    assert 'reason="too old" age=61s' in caplog.text
    assert oct(summary.stat().st_mode & 0o777) == "0o640"


def test_policy_asks_the_gate_when_the_tenant_is_known():
    gate = IngressGate(clock=Clock())
    acme = tenant("acme", limits={"recipients_per_message": 2, "max_queued": 5})
    p = Policy(tenant_set(acme, tenant("globex")), Settings(), gate=gate)
    tx = Transaction(client_ip="127.0.0.1")
    assert p.on_mail(tx, "<news@acme.example>").ok
    rcpt = lambda n: f"<u{n}=example.org@acme.relay.test>"  # noqa: E731
    assert p.on_rcpt(tx, rcpt(1)).ok and p.on_rcpt(tx, rcpt(2)).ok
    v = p.on_rcpt(tx, rcpt(3))
    assert (v.action, v.code, v.dsn) == (Action.TEMPFAIL, "452", "4.7.0") and "recipients_per_message (2)" in v.reason
    gate.set_queues({"acme": TenantQueue(5, None)})
    tx = Transaction(client_ip="127.0.0.1")
    p.on_mail(tx, "<news@acme.example>")
    v = p.on_rcpt(tx, rcpt(1))
    assert (v.code, v.dsn) == ("452", "4.3.1") and "max_queued 5" in v.reason
    tx = Transaction(client_ip="127.0.0.1")
    p.on_mail(tx, "<news@globex.example>")
    assert p.on_rcpt(tx, "<bob=example.org@globex.relay.test>").ok  # other tenants flow


def test_summary_max_age_must_outlast_two_refreshes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"queue_summary_max_age \(8\) must be at least twice queue_refresh \(5\)"):
        Settings(reputation={"queue_refresh": 5, "queue_summary_max_age": 8})
    assert Settings(reputation={"queue_refresh": 5, "queue_summary_max_age": 10}).reputation.queue_summary_max_age == 10
