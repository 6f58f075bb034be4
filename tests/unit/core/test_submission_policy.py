"""The decision core for authenticated submission: login -> tenant -> verdict. No MTA."""

from __future__ import annotations

import re

import pytest
import yaml

from relay_milter.config import Settings, load_tenants
from relay_milter.lab import make_message
from relay_milter.core.policy import Action, Policy, Transaction

from support.factories import tenant_doc, to_message


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    docs = [
        tenant_doc(
            "acme",
            None,
            submission_users=["app1", "crm.worker"],
            allowed_client_ips=["10.0.0.0/8", "2001:db8:1::/48"],
            headers={"strip": ["X-App-Trace"], "reply_to": "replies@acme.example", "envelope_sender": "bounces@acme.example"},
        ),
        tenant_doc("globex", None, submission_users=["app2"], allowed_senders=["news@globex.example"]),
    ]
    for doc in docs:
        (d / f"{doc['id']}.yaml").write_text(yaml.safe_dump(doc))
    return Policy(load_tenants(d), Settings(myhostname="relay.test"))


MAIL_CASES = [
    # name, login ({auth_authen}), client ip, envelope sender, action, code, dsn, reason pattern
    ("login in our realm", "app1@relay.test", "10.1.2.3", "news@acme.example", Action.CONTINUE, "", "", ""),
    ("bare login", "app1", "10.1.2.3", "news@acme.example", Action.CONTINUE, "", "", ""),
    ("ipv6 client in the list", "crm.worker@relay.test", "2001:db8:1::25", "x@acme.example", Action.CONTINUE, "", "", ""),
    ("ipv4-mapped ipv6 client", "app1@relay.test", "::ffff:10.9.9.9", "news@acme.example", Action.CONTINUE, "", "", ""),
    ("login in another realm", "app1@evil.test", "10.1.2.3", "news@acme.example", Action.REJECT, "550", "5.7.1", "not a submission user"),
    ("login of no tenant", "ghost@relay.test", "10.1.2.3", "news@acme.example", Action.REJECT, "550", "5.7.1", "not a submission user"),
    ("client outside the allowlist", "app1@relay.test", "192.0.2.1", "news@acme.example", Action.REJECT, "550", "5.7.1", "192.0.2.1 is not allowed to submit"),
    ("ipv6 client outside the allowlist", "app1@relay.test", "2001:db8:2::1", "news@acme.example", Action.REJECT, "550", "5.7.1", "not allowed to submit"),
    ("another tenant's sender domain", "app1@relay.test", "10.1.2.3", "news@globex.example", Action.REJECT, "550", "5.7.1", "envelope sender news@globex.example is not allowed for user app1"),
    ("sender not in allowed_senders", "app2@relay.test", "192.0.2.1", "ceo@globex.example", Action.REJECT, "550", "5.7.1", "not allowed"),
    ("null sender", "app1@relay.test", "10.1.2.3", "", Action.REJECT, "550", "5.7.1", "null sender"),
]


@pytest.mark.parametrize("name, login, ip, sender, action, code, dsn, pattern", MAIL_CASES, ids=[c[0] for c in MAIL_CASES])
def test_mail_from_table(policy, name, login, ip, sender, action, code, dsn, pattern):
    tx = Transaction(client_ip=ip, auth_user=login)
    v = policy.on_mail(tx, f"<{sender}>")
    assert v.action is action, v
    if action is Action.CONTINUE:
        assert tx.tenant is not None and tx.tenant.id in ("acme", "globex")
    else:
        assert (v.code, v.dsn) == (code, dsn)
        assert re.search(pattern, v.reason), v.reason
        assert tx.tenant is None


RCPT_CASES = [
    # name, recipient, action, code, dsn, pattern
    ("plain recipient", "<bob@example.org>", Action.CONTINUE, "", "", ""),
    ("encoded address of our own relay domain", "<bob=example.org@acme.relay.test>", Action.REJECT, "550", "5.7.1", "relay-domain recipients"),
    ("another tenant's relay domain", "<bob=example.org@globex.relay.test>", Action.REJECT, "550", "5.7.1", "relay-domain recipients"),
    ("subdomain of a relay domain", "<x@sub.globex.relay.test>", Action.REJECT, "550", "5.7.1", "relay-domain recipients"),
    ("percent hack", "<bob%evil.example@example.org>", Action.REJECT, "550", "5.1.3", "forbidden character"),
    ("bang path", "<evil.example!bob@example.org>", Action.REJECT, "550", "5.1.3", "forbidden character"),
    ("two @", "<bob@evil.example@example.org>", Action.REJECT, "550", "5.1.3", "exactly one '@'"),
    ("quoted local part", '<"bob smith"@example.org>', Action.REJECT, "550", "5.1.3", "forbidden character|whitespace"),
    ("ip literal", "<bob@[192.0.2.1]>", Action.REJECT, "550", "5.1.3", "forbidden character"),
    ("numeric domain", "<bob@192.0.2.1>", Action.REJECT, "550", "5.1.3", "looks like an IP address"),
    ("leading dot", "<.bob@example.org>", Action.REJECT, "550", "5.1.3", "invalid local part"),
]


@pytest.mark.parametrize("name, rcpt, action, code, dsn, pattern", RCPT_CASES, ids=[c[0] for c in RCPT_CASES])
def test_rcpt_table(policy, name, rcpt, action, code, dsn, pattern):
    tx = Transaction(client_ip="10.1.2.3", auth_user="app1@relay.test")
    assert policy.on_mail(tx, "<news@acme.example>").ok
    v = policy.on_rcpt(tx, rcpt)
    assert v.action is action, v
    if action is Action.CONTINUE:
        assert [d.address for _, d in tx.recipients] == ["bob@example.org"]
    else:
        assert (v.code, v.dsn) == (code, dsn)
        assert re.search(pattern, v.reason), v.reason
        assert tx.recipients == []


def submit(policy, raw: bytes, sender="news@acme.example", login="app1@relay.test"):
    tx = Transaction(client_ip="10.1.2.3", auth_user=login)
    assert policy.on_mail(tx, f"<{sender}>").ok
    assert policy.on_rcpt(tx, "<bob@example.org>").ok
    return policy.on_eom(tx, to_message(raw))


def test_accepted_submission_is_routed_and_labelled(policy):
    raw = make_message("news@acme.example", "bob@example.org", extra_headers=(("X-App-Trace", "1"), ("X-Relay-Route", "globex")))
    d = submit(policy, raw)
    assert d.verdict.action is Action.ACCEPT, d.verdict
    assert d.tenant.id == "acme" and d.dkim is None
    ops = [(e.op.value, e.name.lower(), e.value.strip()) for e in d.header_edits]
    assert ("delete", "x-app-trace", "") in ops
    assert ("delete", "x-relay-route", "") in ops  # a client's route marker never survives
    assert ("add", "reply-to", "replies@acme.example") in ops
    assert ops[-1] == ("add", "x-relay-route", "acme")
    [ar] = [e.value.strip() for e in d.header_edits if e.name == "Authentication-Results"]
    assert ar == "relay.test; auth=pass smtp.auth=app1@relay.test"
    assert d.recipient_changes == ()  # submission recipients are delivered as given
    assert d.new_sender == "<bounces@acme.example>"


def test_submission_needs_no_dkim_but_checks_the_from_header(policy):
    d = submit(policy, make_message("news@globex.example", "bob@example.org"))
    assert (d.verdict.action, d.verdict.code, d.verdict.dsn) == (Action.REJECT, "550", "5.7.1")
    assert "From address news@globex.example is not allowed for user app1" in d.verdict.reason
    assert d.header_edits == ()


@pytest.mark.parametrize("field", ["Sender", "Resent-From", "Resent-Sender"])
def test_submission_holds_sender_and_resent_fields_to_the_sender_policy(policy, field):
    d = submit(policy, make_message("news@acme.example", "bob@example.org", extra_headers=((field, "news@globex.example"),)))
    assert (d.verdict.action, d.verdict.code, d.verdict.dsn) == (Action.REJECT, "550", "5.7.1")
    assert f"{field} address news@globex.example is not allowed for user app1" in d.verdict.reason
    ok = submit(policy, make_message("news@acme.example", "bob@example.org", extra_headers=((field, "desk@acme.example"),)))
    assert ok.verdict.action is Action.ACCEPT, ok.verdict


def test_submission_recipients_are_not_bound_to_to_and_cc(policy):
    # A login is no replay: Bcc-style recipients are fine on submission (allow_bcc is for signed ingress).
    tx = Transaction(client_ip="10.1.2.3", auth_user="app1")
    assert policy.on_mail(tx, "<news@acme.example>").ok
    for r in ("<bob@example.org>", "<hidden@example.net>"):
        assert policy.on_rcpt(tx, r).ok
    d = policy.on_eom(tx, to_message(make_message("news@acme.example", "bob@example.org")))
    assert d.verdict.action is Action.ACCEPT, d.verdict


def test_submission_refuses_duplicate_from(policy):
    raw = b"From: ceo@globex.example\r\n" + make_message("news@acme.example", "bob@example.org")
    d = submit(policy, raw)
    assert (d.verdict.code, d.verdict.dsn) == ("550", "5.6.0")


def test_rcpt_before_mail_is_refused(policy):
    tx = Transaction(client_ip="10.1.2.3", auth_user="app1")
    v = policy.on_rcpt(tx, "<bob@example.org>")
    assert (v.action, v.code, v.dsn) == (Action.REJECT, "503", "5.5.1")


def test_a_refused_login_leaves_no_tenant_for_later_recipients(policy):
    tx = Transaction(client_ip="10.1.2.3", auth_user="ghost")
    assert not policy.on_mail(tx, "<news@acme.example>").ok
    v = policy.on_rcpt(tx, "<bob@example.org>")
    assert v.action is Action.REJECT and v.dsn == "5.5.1"
