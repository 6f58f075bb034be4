"""Hostile signatures and headers (issue 11, findings 2 to 7) against the running relay:
real Postfix, the real milter, real DKIM signatures made with dkimpy.

Every refusal is checked the same way: the SMTP code and enhanced status, the milter's
``event=reject`` line with the reason, nothing queued and nothing at any sink, the milter
still running. Every acceptance: the message arrives once, at the right sink, and what
the relay wrote into it is checked byte for byte where it matters.
"""

from __future__ import annotations

import base64
import os
import re
import time
from unittest import mock

import pytest

from conftest import Mailer
from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, TenantSpec, make_message, rsa_key, sign, wait_for
from support.labtenants import live_tenants

pytestmark = pytest.mark.e2e

# A tenant with the product defaults (recipient binding on), with a submission login, and
# one that opts out of the binding. The lab's own tenants allow Bcc-style sending
# (lab/harness.py TenantSpec.allow_bcc) for the older tests.
BOUND = dict(id="bound", relay_domain="bound.relay.test", signing_domain="hop.bound.test", selector="b1", sender_domains=["bound.example"])
BCCOK = dict(id="bccok", relay_domain="bccok.relay.test", signing_domain="hop.bccok.test", selector="c1", sender_domains=["bccok.example"])
PASSWORD = base64.b64encode(os.urandom(12)).decode()


@pytest.fixture(scope="module")
def tenants(lab):
    keys = {"bound": rsa_key(2048), "bccok": rsa_key(2048)}
    specs = (
        TenantSpec(**BOUND, key=keys["bound"], allow_bcc=None, extra={"submission_users": ["bound-app"]}),
        TenantSpec(**BCCOK, key=keys["bccok"], allow_bcc=True),
    )
    with live_tenants(lab, *specs):
        lab.add_user("bound-app", PASSWORD)
        yield keys


@pytest.fixture
def bound(acme, tenants):
    return Mailer(acme.lab, BOUND, tenants["bound"])


@pytest.fixture
def bccok(acme, tenants):
    return Mailer(acme.lab, BCCOK, tenants["bccok"])


# -- helpers ----------------------------------------------------------------------


def refused(lab: Lab, attempt, code: int, dsn: str, reason: str) -> None:
    """``attempt()`` -> (code, text, ...) must be refused with code/dsn, the milter must log
    the reason, and nothing may be queued or delivered."""
    before = len(lab.milter_log_text())
    got_code, text, *_ = attempt()
    assert (got_code, text.split(" ", 1)[0]) == (code, dsn), text
    pattern = rf"event=reject stage=eom code={code} dsn={re.escape(dsn)} reason=.*{reason}"
    wait_for(lambda: re.search(pattern, lab.milter_log_text()[before:]), 10, what=pattern)
    assert lab.queue() == []
    assert all(not s.messages for s in lab.sinks.values())
    assert lab.milter_proc.poll() is None


def delivered(lab: Lab, sink: str, rcpts: list[str]):
    [got] = lab.sinks[sink].wait(1)
    assert sorted(got.rcpt_tos) == sorted(rcpts)
    assert all(not s.messages for name, s in lab.sinks.items() if name != sink)
    return got


def head(content: bytes) -> list[tuple[str, str]]:
    """Header fields of a delivered message, unfolded, in order."""
    block = content.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", block)
    return [(n, v.strip()) for n, _, v in (line.partition(":") for line in unfolded.split("\r\n"))]


def values(content: bytes, name: str) -> list[str]:
    return [v for n, v in head(content) if n.lower() == name.lower()]


def prepend(raw: bytes, *fields: str) -> bytes:
    return "".join(f + "\r\n" for f in fields).encode() + raw


def sign_for(m: Mailer, message: bytes, **kw) -> bytes:
    return sign(message, m.key, m.t["signing_domain"], m.t["selector"], **kw)


def forged_signatures(signed: bytes, count: int) -> bytes:
    """``count`` DKIM-Signature fields with the tenant's public d=/s=, a random bh= and
    a bogus b= (no key needed), above the message's real signature."""
    sig = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.S).group(1)
    tags = dict(t.strip().split(b"=", 1) for t in re.sub(rb"\s+", b"", sig).split(b";") if b"=" in t)
    out = []
    for _ in range(count):
        t = tags | {
            b"bh": base64.b64encode(os.urandom(32)),
            b"b": base64.b64encode(os.urandom(12)),
            b"h": b"from:to:subject:message-id:mime-version:content-type",
        }
        out.append(b"DKIM-Signature: " + b"; ".join(k + b"=" + v for k, v in t.items()) + b"\r\n")
    return b"".join(out) + signed


# -- finding 2: CPU amplification by many candidate signatures ----------------------------


def test_250_signatures_with_bogus_bh_are_refused_before_any_is_verified(acme, lab):
    raw = forged_signatures(acme.signed(body="x" * 200_000 + "\r\n"), 250)
    refused(lab, lambda: acme.send(raw), 550, "5.7.21", r"message has 251 signatures by d=hop.acme.test s=r2026, more than the 3 examined \(max_hop_signatures\)")


def test_a_few_bogus_signatures_above_the_real_one_still_pass(acme, lab):
    # Within the cap every candidate is examined; the body is hashed once for all of them.
    raw = forged_signatures(acme.signed(subject="two decoys"), 2)
    code, text, _ = acme.send(raw)
    assert code == 250, text
    got = delivered(lab, "acme", ["alice@example.org"])
    assert values(got.content, "Subject") == ["two decoys"]
    assert values(got.content, "DKIM-Signature") == []  # every hop signature (real and decoys) is gone


# -- finding 3: forged Authentication-Results in other spellings --------------------------

FORGED_AR = [
    "relay.lab.test; dkim=pass header.d=bank.example",
    "RELAY.LAB.TEST; dkim=pass header.d=bank.example",
    "(trusted) relay.lab.test; dkim=pass header.d=bank.example",
    "relay.lab.test(x); dkim=pass header.d=bank.example",
    '"relay.lab.test"; dkim=pass header.d=bank.example',
    "relay.lab.test.; dkim=pass header.d=bank.example",
    '(a (nested) comment) "Relay.Lab.\\Test." ; dkim=pass header.d=bank.example',
]


@pytest.mark.parametrize("forged", FORGED_AR)
def test_forged_authentication_results_claiming_our_id_are_removed(acme, lab, forged):
    raw = prepend(acme.signed(), f"Authentication-Results: {forged}", "Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=acme.example")
    code, text, _ = acme.send(raw)
    assert code == 250, text
    got = delivered(lab, "acme", ["alice@example.org"])
    ars = values(got.content, "Authentication-Results")
    assert [a for a in ars if "bank.example" in a] == []
    assert len(ars) == 2
    assert ars[0].startswith("relay.lab.test; dkim=pass header.d=hop.acme.test ")  # ours, at the top
    assert ars[1] == "mx.other.example; spf=pass smtp.mailfrom=acme.example"  # someone else's stays


# -- finding 4: signature text copied into our Authentication-Results ----------------------


def test_identity_with_spaces_is_quoted_in_our_authentication_results(acme, lab):
    identity = "x dkim=pass header.d=bank.example reason=ok@hop.acme.test"
    raw = sign_for(acme, acme.message(), identity=identity.encode())
    assert b"i=x dkim=pass header.d=bank.example" in raw  # the signature really carries it
    code, text, _ = acme.send(raw)
    assert code == 250, text
    got = delivered(lab, "acme", ["alice@example.org"])
    [ar] = values(got.content, "Authentication-Results")
    b = re.search(r"header\.b=(\S+)$", ar).group(1)
    assert ar == (
        'relay.lab.test; dkim=pass header.d=hop.acme.test '
        'header.i="x dkim=pass header.d=bank.example reason=ok@hop.acme.test" '
        f"header.a=rsa-sha256 header.s=r2026 header.b={b}"
    )
    # One result, one header.d: the copied text is inside a quoted-string, not new results.
    assert re.findall(r"(?:^|\s)(\w+)=(?:pass|fail)", ar.replace(f'"{identity}"', '""')) == ["dkim"]
    assert re.fullmatch(r'[A-Za-z0-9+]{8}|"[A-Za-z0-9+/=]{8}"', b)


# -- finding 5: Sender and Resent-* ---------------------------------------------------------


@pytest.mark.parametrize("field", ["Sender", "Resent-From", "Resent-Sender"])
def test_signed_sender_headers_of_another_tenant_are_refused(acme, lab, field):
    raw = acme.signed(extra_headers=((field, "Globex News <news@globex.example>"),))
    refused(lab, lambda: acme.send(raw), 550, "5.7.1", f"{field} address news@globex.example is not allowed for this tenant")


@pytest.mark.parametrize("field", ["Sender", "Resent-From", "Resent-Sender"])
def test_submitted_sender_headers_of_another_tenant_are_refused(bound, lab, field):
    raw = make_message("app@bound.example", "bob@example.org", extra_headers=((field, "news@globex.example"),))
    refused(
        lab, lambda: lab.submit(raw, "app@bound.example", ["bob@example.org"], "bound-app", PASSWORD),
        550, "5.7.1", f"{field} address news@globex.example is not allowed for user bound-app",
    )


def test_sender_headers_within_the_tenant_are_delivered(acme, lab):
    raw = acme.signed(extra_headers=(("Sender", "desk@acme.example"), ("Resent-From", "a@acme.example, b@acme.example")))
    code, text, _ = acme.send(raw)
    assert code == 250, text
    got = delivered(lab, "acme", ["alice@example.org"])
    assert values(got.content, "Sender") == ["desk@acme.example"]


# -- finding 6: headers that change meaning after signing; signature age --------------------

WITHOUT_REPLY_TO = ("from", "to", "subject", "date", "message-id", "mime-version", "content-type")


def test_reply_to_added_to_a_signature_that_does_not_cover_it_is_refused(acme, lab):
    raw = prepend(sign_for(acme, acme.message(), headers=WITHOUT_REPLY_TO), "Reply-To: pay@evil.example")
    refused(lab, lambda: acme.send(raw), 550, "5.7.21", r"signature does not cover required header\(s\): reply-to")


def test_reply_to_added_after_an_oversigned_signature_breaks_it(acme, lab):
    signed = acme.signed()
    h = re.search(rb"\bh=([^;]+);", re.sub(rb"\s+", b"", signed)).group(1).lower().split(b":")
    assert h.count(b"reply-to") == 2 and b"Reply-To" not in signed  # the lab oversigns: signed as absent
    raw = prepend(signed, "Reply-To: pay@evil.example")
    refused(lab, lambda: acme.send(raw), 550, "5.7.20", "signed headers changed")


def multipart(m: Mailer, boundary: str) -> bytes:
    msg = m.message(subject="statement")
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nYour statement.\r\n"
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nPay to account 1.\r\n--{boundary}--\r\n"
    )
    h, _ = msg.split(b"\r\n\r\n", 1)
    h = h.replace(b"Content-Type: text/plain; charset=utf-8", f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode())
    return h + b"\r\n\r\n" + body.encode()


def test_changed_content_type_boundary_is_refused(acme, lab):
    raw = sign_for(acme, multipart(acme, "b1"))
    raw = raw.replace(b'boundary="b1"', b'boundary="b2"')
    refused(lab, lambda: acme.send(raw), 550, "5.7.20", "signed headers changed")


def test_signature_that_does_not_cover_content_type_is_refused(acme, lab):
    raw = sign_for(acme, multipart(acme, "b1"), headers=("from", "to", "subject", "date", "message-id", "mime-version"))
    refused(lab, lambda: acme.send(raw), 550, "5.7.21", r"does not cover required header\(s\): content-type")


def test_second_content_type_above_a_once_signed_one_is_refused(acme, lab):
    raw = prepend(sign_for(acme, multipart(acme, "b1"), headers=WITHOUT_REPLY_TO), 'Content-Type: multipart/mixed; boundary="b2"')
    refused(lab, lambda: acme.send(raw), 550, "5.7.21", r"does not cover every instance of: content-type \(2 present, 1 signed\)")


def test_signature_older_than_the_default_age_limit_is_refused(acme, lab):
    with mock.patch("dkim.time.time", return_value=time.time() - 2 * 86400):
        raw = acme.signed()
    refused(lab, lambda: acme.send(raw), 550, "5.7.21", r"signature is older than 86400s \(t=, max_signature_age\)")


def test_oversigned_signature_is_accepted(acme, lab):
    raw = sign_for(acme, acme.message(subject="oversigned"), headers=("from", "from", "to", "to", "subject", "subject", "date", "message-id", "message-id", "mime-version", "content-type", "content-type", "reply-to", "cc"))
    code, text, _ = acme.send(raw)
    assert code == 250, text
    assert values(delivered(lab, "acme", ["alice@example.org"]).content, "Subject") == ["oversigned"]


# -- finding 7: replay to new recipients ----------------------------------------------------


def test_captured_message_replayed_to_a_new_recipient_is_refused(bound, lab):
    raw = bound.signed(to="alice@example.org")
    code, text, _ = bound.send(raw, to="alice@example.org")
    assert code == 250, text
    delivered(lab, "bound", ["alice@example.org"])
    wait_for(lambda: lab.queue() == [], 30, what="empty queue")
    with lab.sinks["bound"].lock:
        lab.sinks["bound"].messages.clear()
    # The same bytes, replayed with an extra recipient, then with only a new one.
    rcpts = [bound.rcpt("alice@example.org"), bound.rcpt("mallory@example.net")]
    refused(lab, lambda: bound.send(raw, rcpts=rcpts), 550, "5.7.1", r"recipient\(s\) mallory@example.net not in the signed To/Cc .*allow_bcc")
    refused(lab, lambda: bound.send(raw, rcpts=[bound.rcpt("mallory@example.net")]), 550, "5.7.1", "mallory@example.net not in the signed To/Cc")


def test_recipients_in_signed_to_and_cc_are_delivered(bound, lab):
    to = f"Alice <{encode_recipient('alice@example.org', BOUND['relay_domain'])}>"  # encoded in To: decoded before comparing
    raw = bound.signed(to=to, extra_headers=(("Cc", "Bob <BOB@Example.NET>, carol@example.org"),))
    rcpts = ["alice@example.org", "bob@example.net", "carol@example.org"]
    code, text, _ = bound.send(raw, rcpts=[bound.rcpt(r) for r in rcpts])
    assert code == 250, text
    got = delivered(lab, "bound", rcpts)
    assert values(got.content, "To") == ["Alice <alice@example.org>"]


def test_tenant_with_allow_bcc_accepts_recipients_outside_to_and_cc(bccok, lab):
    raw = bccok.signed(to="alice@example.org")
    code, text, _ = bccok.send(raw, rcpts=[bccok.rcpt("alice@example.org"), bccok.rcpt("hidden@example.net")])
    assert code == 250, text
    delivered(lab, "bccok", ["alice@example.org", "hidden@example.net"])


def test_submission_is_not_bound_to_to_and_cc(bound, lab):
    # An authenticated login is no replay: Bcc works on submission whatever allow_bcc says.
    raw = make_message("app@bound.example", "bob@example.org")
    code, text, _ = lab.submit(raw, "app@bound.example", ["bob@example.org", "hidden@example.net"], "bound-app", PASSWORD)
    assert code == 250, text
    delivered(lab, "bound", ["bob@example.org", "hidden@example.net"])


def test_relay_still_relays(acme, lab):
    milter = lab.milter_proc
    code, text, _ = acme.send(acme.signed(subject="after the signatures"))
    assert code == 250, text
    assert values(delivered(lab, "acme", ["alice@example.org"]).content, "Subject") == ["after the signatures"]
    assert lab.milter_proc is milter and milter.poll() is None
