"""Route seals, DSN parameters, and the RCPT edge cases of issue 11 (the pure core)."""

from __future__ import annotations

import pytest

from relay_milter.config import Settings
from relay_milter.core import route
from relay_milter.core.addresses import dsn_params, rewrite_address_header, xtext
from relay_milter.core.policy import Action, Policy, Transaction
from relay_milter.lab import make_message, rsa_key, sign
from support.factories import tenant, tenant_set, to_message

KEY = bytes(range(32))


def test_seal_is_per_tenant_and_per_key_and_hex():
    acme = route.tenant_seal(KEY, "acme")
    assert acme == route.tenant_seal(KEY, "acme")
    tid, _, mac = acme.partition(".")
    assert tid == "acme" and len(mac) == 40 and int(mac, 16) >= 0
    assert route.tenant_seal(KEY, "globex").partition(".")[2] != mac
    assert route.tenant_seal(b"\xff" * 32, "acme") != acme


def test_route_key_file_format():
    text = route.new_route_key()
    assert text.endswith("\n") and len(text.strip()) == 64
    assert route.parse_route_key(text) == bytes.fromhex(text.strip())
    assert route.parse_route_key("not hex") is None
    assert route.parse_route_key("ab" * 16) is None  # 128 bits: too short


@pytest.mark.parametrize(
    "args, want",
    [
        ((), "ORCPT=rfc822;alice@example.org"),
        (("NOTIFY=SUCCESS,FAILURE",), "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.org"),
        (("notify=never", "ORCPT=rfc822;alice=example.org@acme.relay.test"), "NOTIFY=NEVER ORCPT=rfc822;alice@example.org"),
        (("NOTIFY=SUCCESS,BOGUS",), "ORCPT=rfc822;alice@example.org"),  # invalid: not carried
        (("NOTIFY=SUCCESS ORCPT=x",), "ORCPT=rfc822;alice@example.org"),  # no smuggled second parameter
    ],
)
def test_dsn_params_carry_notify_and_set_orcpt_to_the_decoded_address(args, want):
    assert dsn_params(args, "alice@example.org") == want


def test_xtext_encodes_plus_equals_and_controls():
    assert xtext("a+b=c@example.org") == "a+2Bb+3Dc@example.org"
    assert xtext("a b") == "a+20b"


def test_trailing_dot_relay_address_in_to_is_decoded():
    assert rewrite_address_header(" Alice <alice=example.org@acme.relay.test.>", "acme.relay.test") == "Alice <alice@example.org>"
    assert rewrite_address_header(" alice=example.org@ACME.relay.test.", "acme.relay.test") == "alice@example.org"


@pytest.fixture(scope="module")
def key():
    return rsa_key(2048)


@pytest.fixture(scope="module")
def policy(key):
    return Policy(
        tenant_set(tenant("acme", key), tenant("tlsco", key, require_tls=True)),
        Settings(myhostname="relay.test"),
    )


def rcpt(policy, rcpt, tls=None):
    tx = Transaction(client_ip="127.0.0.1", tls_version=tls)
    assert policy.on_mail(tx, "<news@tlsco.example>").ok
    return policy.on_rcpt(tx, rcpt)


def test_require_tls_refuses_plaintext_with_530(policy):
    v = rcpt(policy, "<alice=example.org@tlsco.relay.test>")
    assert (v.action, v.code, v.dsn) == (Action.REJECT, "530", "5.7.0")
    assert "STARTTLS" in v.reason
    assert rcpt(policy, "<alice=example.org@tlsco.relay.test>", tls="TLSv1.3").ok


def test_subdomain_of_a_relay_domain_is_a_permanent_refusal(policy):
    v = rcpt(policy, "<alice=example.org@x.tlsco.relay.test>")
    assert (v.action, v.code, v.dsn) == (Action.REJECT, "550", "5.1.2")
    v = rcpt(policy, "<alice=example.org@unknown.relay.test>")
    assert (v.action, v.code, v.dsn) == (Action.TEMPFAIL, "451", "4.3.5")  # a tenant being added


def test_client_seals_and_markers_are_deleted(policy, key):
    raw = make_message("news@acme.example", "alice@example.org", extra_headers=(("X-Relay-Route-Seal", route.tenant_seal(KEY, "tlsco")), ("x-relay-route", "tlsco")))
    raw = sign(raw, key, "hop.acme.test", "s1")
    tx = Transaction(client_ip="127.0.0.1")
    assert policy.on_mail(tx, "<news@acme.example>").ok
    assert policy.on_rcpt(tx, "<alice=example.org@acme.relay.test>").ok
    d = policy.on_eom(tx, to_message(raw))
    assert d.verdict.ok, d.verdict
    deleted = {(e.name.lower(), e.index) for e in d.header_edits if getattr(e.op, "value", e.op) == "delete"}  # str here, EditOp on main
    assert {("x-relay-route-seal", 1), ("x-relay-route", 1)} <= deleted
    last = d.header_edits[-1]
    assert (getattr(last.op, "value", last.op), last.name, last.value) == ("add", "X-Relay-Route", "acme")


@pytest.mark.parametrize(
    "addr, want",
    [
        ("alice=example.org@acme.relay.test", "alice@example.org"),
        ("alice=example.org@ACME.relay.test.", "alice@example.org"),
        ("alice=example.org@x.acme.relay.test", None),
        ("alice@example.org", None),
        ("alice=exa_mple.org@acme.relay.test", None),
    ],
)
def test_decode_header_address(addr, want):
    from relay_milter.core.addresses import decode_header_address

    assert decode_header_address(addr, "acme.relay.test") == want
