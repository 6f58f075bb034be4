"""Bounce tracking end to end (issue 15 A): VERP return paths, real DSNs from a second
Postfix, forged reports, ARF complaints.

One lab: tenant acme with ``bounce_tracking`` (forward_to an address at acme's own domain,
so the forwarded report reaches acme's smarthost sink), the real milter, ``relayctl track``
and a webhook receiver. A second private Postfix (support/remote_mta.py) plays the mail
server past the customer's smarthost: it takes the message as the smarthost received it,
fails to deliver it to a sink that refuses, and its bounce daemon sends a real RFC 3464 DSN
to the VERP return path, i.e. to the relay's port 25.
"""

from __future__ import annotations

import collections
import os
import secrets
import smtplib
import time

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import verify_signature
from support.remote_mta import RemoteMta
from support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

BOUNCE_DOMAIN = "bounces.acme.test"
FORWARD_TO = "dsn@acme.example"


@pytest.fixture(scope="module")
def blab():
    receiver = WebhookReceiver().up()
    lab = Lab()
    lab.receiver = receiver
    lab.webhook_secret = secrets.token_urlsafe(24)
    lab.add_tenant(
        TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", rsa_key(2048), ["acme.example"],
                   extra={"webhook": {"url": f"http://127.0.0.1:{receiver.port}/hooks/acme", "timeout": 5},
                          "bounce_tracking": {"domain": BOUNCE_DOMAIN, "forward_to": FORWARD_TO}}),
        Sink("acme"), tls="none",
    )
    lab.secrets = {"acme": {"webhook_secret": lab.webhook_secret}}
    # The final recipient's server: refuses every message after DATA.
    lab.mx = Sink("mx")
    lab.mx.reply = "550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown in virtual mailbox table"
    remote = None
    try:
        lab.start()
        lab.mx.start()
        remote = RemoteMta(lab, {"example.org": lab.mx.port, BOUNCE_DOMAIN: lab.smtp_port}).start()
        lab.remote = remote
        lab.start_tracker()
        yield lab
    finally:
        if remote is not None:
            remote.destroy()
        lab.mx.stop()
        if os.environ.get("RELAY_KEEP_LAB"):
            print(f"\nlab kept at {lab.base}")
            lab.stop()
        else:
            lab.destroy()
        receiver.down()


def send(lab: Lab, rcpts: list[str], subject: str) -> str:
    spec = lab.tenants["acme"]
    mid = f"<{subject.replace(' ', '-')}.{time.time_ns()}@platform.test>"
    encoded = [encode_recipient(r, spec.relay_domain) for r in rcpts]
    msg = make_message("news@acme.example", ", ".join(encoded), subject=subject, message_id=mid)
    code, text, _ = lab.send(sign(msg, spec.key, spec.signing_domain, spec.selector), "news@acme.example", encoded)
    assert code == 250, text
    return mid


def delivered(lab: Lab, mid: str):
    def find():
        return next((m for m in lab.sinks["acme"].messages if mid in " ".join(m.header("Message-ID"))), None)

    return wait_for(find, 30, interval=0.2, what=f"{mid} at the acme sink")


def events_of(lab: Lab, key: str) -> list:
    store = open_store(lab.events_dsn)
    try:
        return store.trace(key)
    finally:
        store.close()


def wait_events(lab: Lab, mid: str, kinds: list[Kind], timeout: float = 40) -> list:
    def enough():
        evs = events_of(lab, mid)
        have = collections.Counter(e.kind for e in evs)
        return evs if all(have[k] >= n for k, n in collections.Counter(kinds).items()) else None

    return wait_for(enough, timeout, interval=0.3, what=f"{[k.value for k in kinds]} for {mid}")


def hooks_of(lab: Lab, mid: str, kind: str, timeout: float = 40) -> list:
    def found():
        got = [r for r in lab.receiver.requests
               if r.json["notifications"][0]["meta"]["mail"]["id"] == mid
               and r.json["notifications"][0]["meta"]["event"]["type"] == kind]
        return got or None

    return wait_for(found, timeout, interval=0.3, what=f"{kind} webhook for {mid}")


def smtp_to_relay(lab: Lab, mail_from: str, rcpt: str, raw: bytes) -> tuple[int, bytes]:
    """One transaction to the relay's port 25 listener; (code, text) of RCPT, or of DATA."""
    with smtplib.SMTP("127.0.0.1", lab.smtp_port, local_hostname="mx.isp.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(mail_from)
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            return code, text
        return smtp.data(raw)


def test_a_real_dsn_from_a_remote_postfix_becomes_bounced_async_and_is_forwarded(blab):
    mid = send(blab, ["alice@example.org"], "async bounce")
    got = delivered(blab, mid)
    # The envelope sender is the message's VERP return path under the bounce domain.
    local, _, domain = got.mail_from.rpartition("@")
    assert domain == BOUNCE_DOMAIN and local.startswith("rb1."), got.mail_from
    [received] = [e for e in wait_events(blab, mid, [Kind.RECEIVED, Kind.RELAYED]) if e.kind is Kind.RECEIVED]
    assert local.split(".")[1] == received.queue_id

    # Past the smarthost: the next server takes the message as the smarthost got it and
    # refuses it; Postfix's bounce daemon sends the DSN to the return path (the relay).
    blab.remote.send(got.content, got.mail_from, got.rcpt_tos)
    evs = wait_events(blab, mid, [Kind.RECEIVED, Kind.RELAYED, Kind.BOUNCED])
    [bounced] = [e for e in evs if e.kind is Kind.BOUNCED]
    assert bounced.detail["async"] is True and bounced.detail["source"] == "rfc3464"
    assert bounced.detail["reportingMta"] == "mx.example.org"
    assert bounced.recipient == "alice@example.org"
    assert bounced.original_recipient == "alice=example.org@acme.relay.test"
    assert (bounced.tenant, bounced.queue_id, bounced.message_id) == ("acme", received.queue_id, mid)
    assert (bounced.response_code, bounced.dsn) == ("550", "5.1.1")
    assert "User unknown in virtual mailbox table" in bounced.reason
    assert bounced.relay == "127.0.0.1"  # Remote-MTA: the server that refused (the mx sink)

    # relayctl trace shows the whole life of the message.
    out = blab.relayctl("trace", mid).stdout
    assert [ln.split()[3:5] for ln in out.splitlines()[1:]][-1] == ["BOUNCED", "async"], out
    assert "RELAYED" in out

    [hook] = hooks_of(blab, mid, "BOUNCED")
    assert verify_signature(blab.webhook_secret, hook.headers["X-Relay-Signature"], hook.body)
    note = hook.json["notifications"][0]
    assert note["meta"]["event"]["async"] is True
    assert note["meta"]["mail"]["email"] == "alice@example.org"
    assert note["content"]["smtp"]["dsn"] == "5.1.1"
    assert note["content"]["report"]["reportingMta"] == "mx.example.org"

    # Forwarded to forward_to through acme's own smarthost, as the DSN it is.
    def forwarded():
        return next((m for m in blab.sinks["acme"].messages if m.rcpt_tos == [FORWARD_TO] and mid.encode() in m.content), None)

    fwd = wait_for(forwarded, 30, interval=0.2, what="the forwarded DSN")
    assert fwd.mail_from in ("", "<>")
    assert b"multipart/report" in fwd.content and b"report-type=delivery-status" in fwd.content
    assert b"X-Relay-Route" not in fwd.content  # the route marker and seal stay on the relay


def report(kind: str, headers: dict[str, str], text: str, fields: str, original: str = "") -> bytes:
    """A multipart/report message as an MTA or a feedback loop writes it (CRLF)."""
    boundary = f"=_report_{time.time_ns()}"
    head = "".join(f"{k}: {v}\n" for k, v in headers.items())
    body = (
        f"{head}Message-ID: <report.{time.time_ns()}@mx.isp.test>\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={kind}; boundary="{boundary}"\n\n'
        f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n{text}\n"
        f"--{boundary}\nContent-Type: message/{kind}\n\n{fields}\n"
    )
    if original:
        body += f"--{boundary}\nContent-Type: text/rfc822-headers\n\n{original}\n"
    body += f"--{boundary}--\n"
    return body.replace("\n", "\r\n").encode()


def dsn(return_path: str, rcpt: str, action: str, status: str, diagnostic: str) -> bytes:
    """A DSN (RFC 3464), for the delayed case and the forged ones."""
    return report(
        "delivery-status",
        {"From": "MAILER-DAEMON@mx.isp.test", "To": return_path, "Subject": "Delivery Status Notification"},
        "This is the mail system at host mx.isp.test.",
        "Reporting-MTA: dns; mx.isp.test\n\n"
        f"Final-Recipient: rfc822; {rcpt}\nAction: {action}\nStatus: {status}\n"
        f"Remote-MTA: dns; mail.example.org\nDiagnostic-Code: smtp; {diagnostic}\n",
    )


def test_forged_reports_are_refused_and_change_nothing(blab):
    mid = send(blab, ["bob@example.org"], "forged bounce")
    got = delivered(blab, mid)
    wait_events(blab, mid, [Kind.RECEIVED, Kind.RELAYED])
    qid = got.mail_from.split(".")[1]
    # A token with a made-up MAC for this very message, and a local part that is no token.
    forged = f"rb1.{qid}.m.{'a' * 20}@{BOUNCE_DOMAIN}"
    for rcpt in (forged, f"postmaster@{BOUNCE_DOMAIN}"):
        code, text = smtp_to_relay(blab, "", rcpt, dsn(rcpt, "bob@example.org", "failed", "5.1.1", "550 5.1.1 no such user"))
        assert (code, text[:5]) == (550, b"5.1.1"), (code, text)
        assert f"<{rcpt}>: no such bounce address".encode() in text
    # A token for bob, sent to another relay domain's subdomain: Postfix refuses it too.
    code, _ = smtp_to_relay(blab, "", f"x@sub.{BOUNCE_DOMAIN}", b"Subject: x\r\n\r\nx\r\n")
    assert code == 554

    # A later real report (a delay notice, to the true return path) is the marker: once its
    # DELAYED event is in, the forged reports would have been recorded too.
    code, text = smtp_to_relay(blab, "", got.mail_from, dsn(got.mail_from, "bob@example.org", "delayed", "4.2.2", "452 4.2.2 mailbox full"))
    assert code == 250, text
    evs = wait_events(blab, mid, [Kind.RECEIVED, Kind.RELAYED, Kind.DELAYED])
    assert [e.kind.value for e in evs] == ["RECEIVED", "RELAYED", "DELAYED"]
    delayed = evs[-1]
    assert (delayed.recipient, delayed.dsn, delayed.response_code) == ("bob@example.org", "4.2.2", "452")
    assert delayed.detail["async"] is True and delayed.kind.state == "RETRYING"
    log = blab.milter_log_text()
    assert f"rcpt=<{forged}>" in log and f"rcpt=<postmaster@{BOUNCE_DOMAIN}>" in log
    # A DSN naming another recipient than the one the recipient-bound token was made for
    # counts for nothing (the recipient tag does not match).
    code, _ = smtp_to_relay(blab, "", got.mail_from, dsn(got.mail_from, "carol@example.org", "failed", "5.1.1", "550 5.1.1 gone"))
    assert code == 250
    wait_for(lambda: "dropped=1" in blab.milter_log_text(), 20, what="the report for carol dropped")
    hooks_of(blab, mid, "DELAYED")
    assert [e.kind.value for e in events_of(blab, mid)] == ["RECEIVED", "RELAYED", "DELAYED"]


def arf(return_path: str, original: bytes, rcpt: str) -> bytes:
    """An RFC 5965 feedback report, as a mailbox provider's feedback loop sends it."""
    return report(
        "feedback-report",
        {"From": "fbl@isp.test", "To": return_path, "Subject": "FW: complaint"},
        "This is an email abuse report for an email message received from IP 192.0.2.1.",
        "Feedback-Type: abuse\nUser-Agent: ISP-FBL/1.0\nVersion: 1\n"
        f"Original-Mail-From: <{return_path}>\nOriginal-Rcpt-To: <{rcpt}>\nReporting-MTA: dns; fbl.isp.test\n",
        original.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n", "\n"),
    )


def test_an_arf_report_gives_complained(blab):
    mid = send(blab, ["dave@example.org", "erin@example.org"], "complaint")
    got = delivered(blab, mid)
    wait_events(blab, mid, [Kind.RECEIVED, Kind.RECEIVED, Kind.RELAYED, Kind.RELAYED])
    assert ".m." in got.mail_from  # two recipients: one per-message return path
    code, text = smtp_to_relay(blab, "fbl@isp.test", got.mail_from, arf(got.mail_from, got.content, "erin@example.org"))
    assert code == 250, text
    evs = wait_events(blab, mid, [Kind.COMPLAINED])
    [complained] = [e for e in evs if e.kind is Kind.COMPLAINED]
    assert complained.recipient == "erin@example.org" and complained.tenant == "acme"
    assert complained.detail["source"] == "arf" and complained.detail["action"] == "abuse"
    [hook] = hooks_of(blab, mid, "COMPLAINED")
    assert hook.json["notifications"][0]["meta"]["mail"]["email"] == "erin@example.org"


def test_the_relays_own_notice_for_a_verp_message_is_discarded_not_left_unrouted(blab):
    """The smarthost refuses with 5xx: the relay records its (synchronous) BOUNCED, and the
    non-delivery notice it would send to the VERP return path goes to discard:, never to the
    deferred unrouted transport."""
    sink = blab.sinks["acme"]
    sink.reply = "554 5.7.1 refused by the smarthost"
    try:
        mid = send(blab, ["frank@example.org"], "smarthost refuses")
        evs = wait_events(blab, mid, [Kind.RECEIVED, Kind.BOUNCED])
    finally:
        sink.reply = "250 2.0.0 Ok: queued"
    [bounced] = [e for e in evs if e.kind is Kind.BOUNCED]
    assert bounced.detail is None and bounced.response_code == "554"
    wait_for(lambda: "status=sent (recorded-by-bounce-tracking)" in blab.maillog_text(), 30, what="the notice discarded")
    wait_for(lambda: not blab.queue(), 30, what="an empty queue")
