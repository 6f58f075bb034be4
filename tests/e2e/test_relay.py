"""End to end through a real Postfix with the real milter, real DKIM and loopback sinks.

What must be refused (bad signatures, open-relay probes, malformed input) is one table
in test_hostile.py; this module is about mail that must get through, and failures of
the parts around it."""

from __future__ import annotations

import signal
import time

import pytest

from relay_milter.lab import wait_for

pytestmark = pytest.mark.e2e


def subjects(lab) -> list[str]:
    return sorted(s for sink in lab.sinks.values() for m in list(sink.messages) for s in m.header("Subject"))


def deliver_marker(m, lab, subject: str) -> None:
    """Send a good message the same way and wait until it has arrived and the queue is empty.
    A message sent before it that was wrongly accepted would by then be at a sink or in the queue."""
    code, text, _ = m.send(m.signed(subject=subject))
    assert code == 250, text
    wait_for(lambda: subject in subjects(lab), 60, what=f"marker {subject!r} at a sink")
    wait_for(lambda: lab.queue() == [], 30, what="empty queue")


def test_signed_message_reaches_its_tenants_smarthost_only(acme, lab):
    raw = acme.signed(
        to="Alice <" + acme.rcpt("alice@example.org") + ">",
        extra_headers=(("X-Platform-Trace", "hop-123"), ("Reply-To", "noreply@platform.example")),
    )
    code, text, _ = acme.send(raw, to="alice@example.org", mail_from="news@acme.example")
    assert code == 250, text

    [got] = lab.sinks["acme"].wait(1)
    assert lab.sinks["globex"].messages == []
    # Envelope: decoded recipient, tenant's envelope sender.
    assert got.rcpt_tos == ["alice@example.org"]
    assert got.mail_from == "bounces@acme.example"
    # Headers: hop signature and hop-only headers gone, Reply-To replaced, To decoded,
    # Authentication-Results added, route marker not leaked.
    assert got.header("DKIM-Signature") == []
    assert got.header("X-Platform-Trace") == []
    assert got.header("X-Relay-Route") == []
    assert got.header("Reply-To") == ["replies@acme.example"]
    assert got.header("To") == ["Alice <alice@example.org>"]
    [ar] = got.header("Authentication-Results")
    assert ar.startswith("relay.lab.test;")
    assert "dkim=pass" in ar and "header.d=hop.acme.test" in ar and "header.s=r2026" in ar
    assert b"Hello from the platform." in got.content


def test_key_from_dns_tenant_is_routed_to_its_own_sink(globex, lab):
    code, text, _ = globex.send(globex.signed(to="bob@example.org"), to="bob@example.org")
    assert code == 250, text
    [got] = lab.sinks["globex"].wait(1)
    assert got.rcpt_tos == ["bob@example.org"]
    assert got.mail_from == "news@globex.example"  # globex keeps the envelope sender
    assert lab.sinks["acme"].messages == []
    [ar] = got.header("Authentication-Results")
    assert "dkim=pass" in ar and "header.d=hop.globex.test" in ar


def test_multiple_recipients_are_all_decoded(acme, lab):
    rcpts = [acme.rcpt("a@example.org"), acme.rcpt("b.c+tag@sub.example.net"), acme.rcpt("x=y@example.com")]
    code, text, _ = acme.lab.send(acme.signed(), "news@acme.example", rcpts)
    assert code == 250, text
    [got] = lab.sinks["acme"].wait(1)
    assert sorted(got.rcpt_tos) == ["a@example.org", "b.c+tag@sub.example.net", "x=y@example.com"]


def test_recipients_of_two_tenants_in_one_transaction_are_split(acme, globex, lab):
    code, text, refused = acme.lab.send(acme.signed(), "news@acme.example", [acme.rcpt("a@example.org"), globex.rcpt("b@example.org")])
    assert code == 250, text  # the acme recipient is accepted...
    assert list(refused.values())[0][0] == 452  # ...the globex one is deferred to its own transaction
    [got] = lab.sinks["acme"].wait(1)
    assert got.rcpt_tos == ["a@example.org"]
    assert lab.sinks["globex"].messages == []


def test_milter_down_means_tempfail_and_no_delivery(acme, lab):
    lab.stop_milter()
    try:
        code, text, _ = acme.send(acme.signed(subject="while the milter is down"))
        assert 400 <= code < 500, (code, text)
    finally:
        lab.start_milter()
    deliver_marker(acme, lab, "after the milter is back")
    assert subjects(lab) == ["after the milter is back"]


def test_milter_hung_past_timeout_means_tempfail(acme, lab):
    lab.signal_milter(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code, text, _ = acme.send(acme.signed(subject="while the milter hangs"))
        assert 400 <= code < 500, (code, text)
        assert time.monotonic() - t0 < 60
    finally:
        lab.signal_milter(signal.SIGCONT)
    deliver_marker(acme, lab, "after the milter resumed")
    assert subjects(lab) == ["after the milter resumed"]


def test_smarthost_down_defers_then_delivers_after_flush(acme, lab):
    sink = lab.sinks["acme"]
    sink.stop()
    try:
        code, text, _ = acme.send(acme.signed(subject="while down"))
        assert code == 250, text
        queued = wait_for(
            lambda: [m for m in lab.queue() if any("deferred" == m.get("queue_name") for _ in [0])], 30, what="deferred message"
        )
        [entry] = queued
        assert entry["recipients"][0]["address"] == "alice@example.org"
        assert "delay_reason" in entry["recipients"][0]
    finally:
        sink.start()
    lab.flush()
    [got] = sink.wait(1, timeout=30)
    assert got.header("Subject") == ["while down"]
    wait_for(lambda: lab.queue() == [], 15, what="empty queue")
