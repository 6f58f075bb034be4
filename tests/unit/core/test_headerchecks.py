"""Sender/Resent-* policy and the envelope bound to the signed To/Cc."""

from __future__ import annotations

import pytest

from relay_milter.core.headerchecks import mailboxes, recipient_binding, sender_fields, unbound_recipients
from support.factories import tenant

ACME = tenant("acme")
STRICT = tenant("strict", allowed_senders=["news@strict.example"])
BCC = tenant("bcc", allow_bcc=True)
SIGNED = frozenset({"from", "to", "cc", "subject"})


@pytest.mark.parametrize(
    "value, out",
    [
        (" a@Example.ORG", ["a@example.org"]),
        (" A <a@x.example>, b@y.example.", ["a@x.example", "b@y.example"]),
        (" undisclosed-recipients:;", []),
        (" Team: a@x.example, b@x.example;, c@y.example", ["a@x.example", "b@x.example", "c@y.example"]),
        (" not an address", None),
        (" a@x.example\x00", None),
        (" a@[192.0.2.1]", None),
    ],
)
def test_mailboxes(value, out):
    assert mailboxes(value) == out


@pytest.mark.parametrize(
    "headers, t, who, pattern",
    [
        ([("Sender", " desk@acme.example")], ACME, "this tenant", None),
        ([("Resent-From", " a@acme.example, b@acme.example"), ("Resent-Sender", " c@acme.example")], ACME, "this tenant", None),
        ([("Sender", " news@globex.example")], ACME, "this tenant", "5.7.1 Sender address news@globex.example is not allowed for this tenant"),
        ([("Resent-From", " a@acme.example, x@globex.example")], ACME, "user app1", "5.7.1 Resent-From address x@globex.example is not allowed for user app1"),
        ([("resent-sender", " other@strict.example")], STRICT, "this tenant", "5.7.1 resent-sender address other@strict.example is not allowed"),
        ([("Sender", " ;;;")], ACME, "this tenant", "5.6.0 Sender header field must hold valid mailboxes"),
        ([("Reply-To", " x@globex.example")], ACME, "this tenant", None),  # not an author field
    ],
)
def test_sender_fields(headers, t, who, pattern):
    r = sender_fields(headers, t, who)
    if pattern is None:
        assert r is None
    else:
        assert r is not None and f"{r.dsn} {r.reason}".startswith(pattern), r


def test_recipients_must_be_in_the_signed_to_or_cc():
    headers = [("To", " Alice <alice=example.org@acme.relay.test>"), ("Cc", " BOB@example.NET")]
    assert unbound_recipients(headers, ["alice@example.org", "bob@example.net"], SIGNED, "acme.relay.test") == []
    assert unbound_recipients(headers, ["alice@example.org", "eve@example.net"], SIGNED, "acme.relay.test") == ["eve@example.net"]
    # a Cc the signature does not cover names nobody
    assert unbound_recipients(headers, ["bob@example.net"], frozenset({"from", "to"}), "acme.relay.test") == ["bob@example.net"]


def test_binding_refusal_and_opt_out():
    headers = [("To", " undisclosed-recipients:;")]
    r = recipient_binding(headers, ["a@x.example", "b@x.example", "c@x.example", "d@x.example"], SIGNED, ACME)
    assert r is not None and (r.code, r.dsn) == ("550", "5.7.1")
    assert r.reason.startswith("recipient(s) a@x.example, b@x.example, c@x.example and 1 more not in the signed To/Cc")
    assert recipient_binding(headers, ["a@x.example"], SIGNED, BCC) is None
