"""Bounce tracking (issue 15 A), driven directly: VERP tokens, report parsing, the policy's
bounce-domain decisions and the tenant option's validation. Real HMACs, no MTA."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from support.factories import tenant_doc, to_message, write_tenants

from relay_milter import defaults
from relay_milter.config import ConfigError, Settings, load_tenants
from relay_milter.core import bounces
from relay_milter.core.policy import Action, Policy, Transaction
from relay_milter.lab import make_message, rsa_key, sign

K1, K2 = bytes(range(32)), bytes(range(1, 33))
QID = "4jf7q00MrMz2GWKy"


# -- tokens --------------------------------------------------------------------------------


def split(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


def test_a_recipient_bound_token_verifies_and_names_only_its_recipient():
    rp = bounces.return_path(K1, "acme", "Bounces.Acme.Test", QID, ["Alice@example.org"])
    local, domain = split(rp)
    assert domain == "bounces.acme.test" and local.startswith(f"rb1.{QID}.") and len(local) <= 64
    token = bounces.verify(local, domain, "acme", (K1,))
    assert token is not None and token.queue_id == QID and not token.per_message
    assert token.names("acme", "alice@example.org") and token.names("acme", "ALICE@example.org")
    assert not token.names("acme", "bob@example.org")


def test_a_message_with_several_recipients_gets_one_per_message_token():
    rp = bounces.return_path(K1, "acme", "bounces.acme.test", QID, ["a@example.org", "b@example.org"])
    local, domain = split(rp)
    assert local.split(".")[2] == "m"
    token = bounces.verify(local, domain, "acme", (K1,))
    assert token.per_message and token.names("acme", "anyone@example.org")


@pytest.mark.parametrize(
    "change",
    [
        lambda l, d: (l.replace(QID, "4jf7q00MrMz2GWKz"), d),  # another message
        lambda l, d: (l[:-1] + ("b" if l[-1] != "b" else "c"), d),  # a MAC character changed
        lambda l, d: (".".join(l.split(".")[:2] + ["m"] + l.split(".")[3:]), d),  # recipient tag -> per message
        lambda l, d: (l, "bounces.globex.test"),  # another bounce domain
        lambda l, d: (l.replace("rb1.", "rb2."), d),  # another format
        lambda l, d: (l.lower(), d),  # queue ids are case-sensitive: a lower-cased token is refused
        lambda l, d: ("postmaster", d),
    ],
)
def test_a_changed_token_is_refused(change):
    local, domain = change(*split(bounces.return_path(K1, "acme", "bounces.acme.test", QID, ["alice@example.org"])))
    assert bounces.verify(local, domain, "acme", (K1,)) is None


def test_a_token_is_bound_to_its_tenant_and_key():
    local, domain = split(bounces.return_path(K1, "acme", "bounces.acme.test", QID, ["alice@example.org"]))
    assert bounces.verify(local, domain, "globex", (K1,)) is None
    assert bounces.verify(local, domain, "acme", (K2,)) is None


def test_rotation_the_new_key_signs_and_the_previous_key_still_verifies():
    old = split(bounces.return_path(K1, "acme", "b.acme.test", QID, ["alice@example.org"]))
    keys = bounces.parse_keys(f"{K2.hex()}\n{K1.hex()}\n")
    assert keys == (K2, K1)
    token = bounces.verify(*old, "acme", keys)
    assert token is not None and token.key == K1 and token.names("acme", "alice@example.org")
    new = split(bounces.return_path(keys[0], "acme", "b.acme.test", QID, ["alice@example.org"]))
    assert bounces.verify(*new, "acme", keys).key == K2
    assert bounces.verify(*new, "acme", (K1,)) is None


@settings(max_examples=200, deadline=None)
@given(
    tenant=st.from_regex(r"[a-z0-9][a-z0-9_]{0,30}", fullmatch=True),
    qid=st.from_regex(r"[0-9A-Za-z]{10,20}", fullmatch=True),
    rcpt=st.emails(),
)
def test_every_token_fits_a_local_part_and_round_trips(tenant, qid, rcpt):
    local, domain = split(bounces.return_path(K1, tenant, "bounces.example.net", qid, [rcpt]))
    assert len(local) <= 64 and all(c.isalnum() or c == "." for c in local)
    token = bounces.verify(local, domain, tenant, (K1,))
    assert token is not None and token.queue_id == qid and token.names(tenant, rcpt)


def test_keys_file_bad_lines_give_no_keys_and_a_change_is_picked_up(tmp_path):
    assert bounces.parse_keys("nothex\n") == () and bounces.parse_keys("abcd\n") == ()
    assert bounces.load_keys(tmp_path) == ()
    path = tmp_path / defaults.VERP_KEY_FILE
    path.parent.mkdir(parents=True)
    path.write_text(K1.hex() + "\n")
    assert bounces.load_keys(tmp_path) == (K1,)
    path.write_text(f"{K2.hex()}\n{K1.hex()}\n")
    os.utime(path, (1, 1))  # a different mtime, as any rewrite has
    assert bounces.load_keys(tmp_path) == (K2, K1)
    assert len(bounces.parse_keys(bounces.new_key_file())) == 1


# -- reports -------------------------------------------------------------------------------

POSTFIX_DSN = b"""\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r
Subject: Undelivered Mail Returned to Sender\r
To: rb1.x@bounces.acme.test\r
Message-Id: <20261201175557.4CA22EBE16A@mx.example.org>\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status;\r
\tboundary="4CA22EBE16A.1796147757/mx.example.org"\r
\r
This is a MIME-encapsulated message.\r
\r
--4CA22EBE16A.1796147757/mx.example.org\r
Content-Description: Notification\r
Content-Type: text/plain; charset=us-ascii\r
\r
I'm sorry to have to inform you that your message could not be delivered.\r
\r
--4CA22EBE16A.1796147757/mx.example.org\r
Content-Description: Delivery report\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.example.org\r
X-Postfix-Queue-ID: 4CA22EBE16A\r
Arrival-Date: Tue,  1 Dec 2026 17:55:57 +0000 (UTC)\r
\r
Final-Recipient: rfc822; Alice@example.org\r
Original-Recipient: rfc822;alice@example.org\r
Action: failed\r
Status: 5.1.1\r
Remote-MTA: dns; 127.0.0.1\r
Diagnostic-Code: smtp; 550 5.1.1 <alice@example.org>: Recipient address\r
    rejected: User unknown\r
\r
Final-Recipient: rfc822; bob@example.org\r
Action: delayed\r
Status: 4.4.1\r
Diagnostic-Code: X-Postfix; connect to mx.example.org: Connection refused\r
\r
Final-Recipient: rfc822; carol@example.org\r
Action: delivered\r
Status: 2.0.0\r
\r
--4CA22EBE16A.1796147757/mx.example.org\r
Content-Description: Undelivered Message Headers\r
Content-Type: text/rfc822-headers\r
\r
From: news@acme.example\r
Message-ID: <orig.1@platform.test>\r
\r
--4CA22EBE16A.1796147757/mx.example.org--\r
"""


def test_a_postfix_dsn_gives_one_report_per_failed_or_delayed_recipient():
    parsed = bounces.parse_report(POSTFIX_DSN)
    assert parsed.kind == "rfc3464" and parsed.message_id == "<orig.1@platform.test>"
    failed, delayed = parsed.reports
    assert (failed.kind, failed.recipient, failed.status, failed.code) == ("BOUNCED", "alice@example.org", "5.1.1", "550")
    assert failed.diagnostic == "550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown"
    assert (failed.remote_mta, failed.reporting_mta, failed.action) == ("127.0.0.1", "mx.example.org", "failed")
    assert (delayed.kind, delayed.recipient, delayed.status, delayed.code) == ("DELAYED", "bob@example.org", "4.4.1", None)


ARF = b"""\
From: fbl@isp.test\r
To: rb1.x@bounces.acme.test\r
Subject: FW: complaint\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r
\r
--b\r
Content-Type: text/plain\r
\r
This is an email abuse report.\r
--b\r
Content-Type: message/feedback-report\r
\r
Feedback-Type: abuse\r
User-Agent: ISP-FBL/1.0\r
Version: 1\r
Original-Rcpt-To: <Erin@example.org>\r
Reporting-MTA: dns; fbl.isp.test\r
\r
--b\r
Content-Type: message/rfc822\r
\r
From: news@acme.example\r
Message-ID: <orig.2@platform.test>\r
\r
hello\r
--b--\r
"""


def test_an_arf_report_is_a_complaint_about_its_recipient():
    parsed = bounces.parse_report(ARF)
    assert parsed.kind == "arf" and parsed.message_id == "<orig.2@platform.test>"
    [r] = parsed.reports
    assert (r.kind, r.recipient, r.action, r.reporting_mta, r.source) == ("COMPLAINED", "erin@example.org", "abuse", "fbl.isp.test", "arf")
    assert r.diagnostic == "This is an email abuse report."
    # Without Original-Rcpt-To the recipient is unknown here (the token says whose it is).
    [r] = bounces.parse_report(ARF.replace(b"Original-Rcpt-To: <Erin@example.org>\r\n", b"")).reports
    assert r.recipient is None


QMAIL = b"""\
From: MAILER-DAEMON@mail.example.org\r
To: rb1.x@bounces.acme.test\r
Subject: failure notice\r
\r
Hi. This is the qmail-send program at mail.example.org.\r
I'm afraid I wasn't able to deliver your message to the following addresses.\r
This is a permanent error; I've given up. Sorry it didn't work out.\r
\r
<dave@example.org>:\r
Sorry, no mailbox here by that name. (#5.1.1)\r
\r
--- Below this line is a copy of the message.\r
"""


def test_a_non_standard_bounce_falls_back_to_flufl_bounce():
    parsed = bounces.parse_report(QMAIL)
    assert parsed.kind == "heuristic"
    assert [(r.kind, r.recipient, r.source) for r in parsed.reports] == [("BOUNCED", "dave@example.org", "heuristic")]


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe garbage", b"Subject: hello\r\n\r\njust a reply, thanks\r\n",
                                 b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n"])
def test_anything_else_reports_nothing(raw):
    parsed = bounces.parse_report(raw)
    assert parsed.reports == [] and parsed.kind == "none"


# -- the policy at the bounce domain -----------------------------------------------------


@pytest.fixture(scope="module")
def key():
    return rsa_key(1024)


def bounce_policy(tmp_path, key, forward_to=None, with_key=True) -> Policy:
    bt = {"domain": "bounces.acme.test"} | ({"forward_to": forward_to} if forward_to else {})
    d = write_tenants(tmp_path / "tenants", [tenant_doc("acme", key, bounce_tracking=bt), tenant_doc("globex", key)])
    config = tmp_path / "config"
    if with_key:
        (config / defaults.VERP_KEY_FILE).parent.mkdir(parents=True)
        (config / defaults.VERP_KEY_FILE).write_text(K1.hex() + "\n")
    return Policy(load_tenants(d), Settings(myhostname="relay.test", config_directory=config))


def verp(rcpts=("alice@example.org",)) -> str:
    return bounces.return_path(K1, "acme", "bounces.acme.test", QID, list(rcpts))


def test_an_accepted_message_of_a_tenant_with_bounce_tracking_gets_its_verp_return_path(tmp_path, key):
    policy = bounce_policy(tmp_path, key)
    raw = sign(make_message("news@acme.example", "alice=example.org@acme.relay.test"), key, "hop.acme.test", "s1")
    tx = Transaction(client_ip="127.0.0.1", queue_id=QID)
    assert policy.on_mail(tx, "<news@acme.example>").ok and policy.on_rcpt(tx, "<alice=example.org@acme.relay.test>").ok
    d = policy.on_eom(tx, to_message(raw))
    assert d.verdict.action is Action.ACCEPT and d.new_sender == f"<{verp()}>"
    # A tenant without the option keeps its envelope sender.
    raw = sign(make_message("news@globex.example", "alice=example.org@globex.relay.test"), key, "hop.globex.test", "s1")
    tx = Transaction(client_ip="127.0.0.1", queue_id=QID)
    assert policy.on_mail(tx, "<news@globex.example>").ok and policy.on_rcpt(tx, "<alice=example.org@globex.relay.test>").ok
    assert policy.on_eom(tx, to_message(raw)).new_sender is None


def test_without_its_key_the_relay_tempfails_instead_of_sending_without_tracking(tmp_path, key):
    policy = bounce_policy(tmp_path, key, with_key=False)
    raw = sign(make_message("news@acme.example", "alice=example.org@acme.relay.test"), key, "hop.acme.test", "s1")
    tx = Transaction(client_ip="127.0.0.1", queue_id=QID)
    assert policy.on_mail(tx, "<news@acme.example>").ok and policy.on_rcpt(tx, "<alice=example.org@acme.relay.test>").ok
    v = policy.on_eom(tx, to_message(raw)).verdict
    assert (v.action, v.code) == (Action.TEMPFAIL, "451")
    tx = Transaction(client_ip="192.0.2.9")
    policy.on_mail(tx, "<>")
    assert policy.on_rcpt(tx, f"<{verp()}>").code == "451"


def test_the_bounce_domain_takes_only_valid_tokens_and_no_relay_recipients(tmp_path, key):
    policy = bounce_policy(tmp_path, key)
    tx = Transaction(client_ip="192.0.2.9")
    assert policy.on_mail(tx, "<>").ok
    local, domain = split(verp())
    for bad in ("<postmaster@bounces.acme.test>", f"<{local[:-20]}{'a' * 20}@{domain}>"):
        v = policy.on_rcpt(tx, bad)
        assert (v.action, v.code, v.dsn) == (Action.REJECT, "550", "5.1.1") and "no such bounce address" in v.reason
    assert policy.on_rcpt(tx, f"<{verp()}>").ok
    v = policy.on_rcpt(tx, "<alice=example.org@acme.relay.test>")  # no relaying in a report transaction
    assert (v.action, v.code) == (Action.TEMPFAIL, "452")
    tx = Transaction(client_ip="192.0.2.9")
    policy.on_mail(tx, "<news@acme.example>")
    assert policy.on_rcpt(tx, "<alice=example.org@acme.relay.test>").ok
    assert policy.on_rcpt(tx, f"<{verp()}>").code == "452"  # nor a report in a relay transaction


def report_eom(policy, rcpt_token: str, raw: bytes):
    tx = Transaction(client_ip="192.0.2.9", queue_id="4jf7q12b7zz2GWL1")
    policy.on_mail(tx, "<>")
    assert policy.on_rcpt(tx, f"<{rcpt_token}>").ok
    return policy.on_eom(tx, to_message(raw))


def test_a_report_without_forward_to_is_logged_and_discarded(tmp_path, key):
    d = report_eom(bounce_policy(tmp_path, key), verp(), POSTFIX_DSN)
    assert d.verdict.action is Action.ACCEPT and d.report_kind == "rfc3464" and d.bounce_discard
    # The token is bound to alice: bob's delay line is not hers to report.
    assert [(t.queue_id, r.recipient) for t, r in d.reports] == [(QID, "alice@example.org")]
    assert d.dropped_reports == 1 and d.recipient_changes == () and d.header_edits == ()


def test_a_report_with_forward_to_goes_to_the_tenants_smarthost(tmp_path, key):
    forged_route = b"X-Relay-Route: globex\r\nX-Relay-Route-Seal: globex.0000\r\n" + POSTFIX_DSN
    d = report_eom(bounce_policy(tmp_path, key, forward_to="dsn@acme.example"), verp(["a@x.example", "b@x.example"]), forged_route)
    assert not d.bounce_discard and len(d.reports) == 2  # a per-message token: every recipient
    assert d.recipient_changes == ((f"<{verp(['a@x.example', 'b@x.example'])}>", "<dsn@acme.example>"),)
    # The sender's route marker and seal go; ours is added (the adapter adds the seal).
    assert [(e.op.value, e.name, e.value) for e in d.header_edits] == [
        ("delete", "X-Relay-Route", ""), ("delete", "X-Relay-Route-Seal", ""), ("add", defaults.ROUTE_HEADER, "acme")]


# -- the tenant option ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "acme_bt, globex_extra, error",
    [
        ({"domain": "globex.relay.test"}, {}, "is the relay domain of tenant globex"),
        ({"domain": "globex.example"}, {}, "is the sender domain of tenant globex"),
        ({"domain": "b.example.net"}, {"bounce_tracking": {"domain": "b.example.net"}}, "b.example.net is already used by tenant acme"),
        ({"domain": "acme.relay.test"}, {}, "must be a domain of its own"),
        ({"domain": "b.example.net", "forward_to": "x@b.example.net"}, {}, "would loop back into the relay"),
        ({"domain": "b.example.net", "extra": 1}, {}, "unknown field"),
    ],
)
def test_bounce_tracking_is_validated(tmp_path, acme_bt, globex_extra, error):
    d = write_tenants(tmp_path, [tenant_doc("acme", bounce_tracking=acme_bt), tenant_doc("globex", **globex_extra)])
    with pytest.raises(ConfigError) as exc:
        load_tenants(d)
    assert error in str(exc.value) and "bounce_tracking" in str(exc.value)


def test_bounce_tracking_is_off_by_default_and_indexed_when_on(tmp_path):
    d = write_tenants(tmp_path, [tenant_doc("acme", bounce_tracking={"domain": "Bounces.Acme.Test."}), tenant_doc("globex")])
    ts = load_tenants(d)
    assert ts.by_id("globex").bounce_tracking is None
    assert ts.by_bounce_domain("bounces.acme.test").id == "acme" and ts.bounce_domains == ("bounces.acme.test",)
