"""Per-tenant ingress limits and backpressure (core/quota.py), alone and through the policy."""

from __future__ import annotations

import json

from relay_milter.config import Settings
from relay_milter.core.policy import Action, Policy, Transaction
from relay_milter.core.quota import IngressGate, TenantQueue
from relay_milter.milter.backpressure import summarise
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


def test_summary_attributes_by_sender_domain_and_skips_hold():
    ts = tenant_set(tenant("acme", headers={"envelope_sender": "bounces@mail.acme.example"}), tenant("globex"))
    lines = [
        json.dumps({"queue_name": "deferred", "sender": "news@acme.example", "arrival_time": 200}),
        json.dumps({"queue_name": "deferred", "sender": "bounces@mail.acme.example", "arrival_time": 100}),
        json.dumps({"queue_name": "active", "sender": "x@hop.globex.test", "arrival_time": 300}),
        json.dumps({"queue_name": "hold", "sender": "news@globex.example", "arrival_time": 50}),
        json.dumps({"queue_name": "deferred", "sender": "MAILER-DAEMON", "arrival_time": 10}),
    ]
    assert summarise(lines, ts) == {"acme": TenantQueue(2, 100.0), "globex": TenantQueue(1, None)}


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
