"""The pymilter adapter under Milter.testctx.TestCtx: callbacks in libmilter order, no MTA."""

from __future__ import annotations

import dataclasses
import io
import logging

import Milter
import pytest
from support.milterctx import MilterCtx

from relay_milter.milter.adapter import RelayMilter
from relay_milter.config import Settings, load_tenants
from relay_milter.lab import make_message, rsa_key, sign
from relay_milter.core.policy import HeaderEdit, Policy
from support.factories import tenant_doc, write_tenants

RCPT = "alice=example.org@acme.relay.test"


@pytest.fixture(scope="module")
def key():
    return rsa_key(2048)


@pytest.fixture
def policy(tmp_path, key):
    doc = tenant_doc(
        "acme",
        key,
        smarthost={"host": "127.0.0.1", "port": 2525},
        headers={"strip": ["X-Platform-Trace"], "envelope_sender": "bounces@acme.example", "reply_to": "replies@acme.example"},
        submission_users=["app1"],
    )
    write_tenants(tmp_path, [doc])
    return Policy(load_tenants(tmp_path), Settings(myhostname="relay.test"))


@pytest.fixture
def ctx(policy):
    RelayMilter.source = policy
    Milter.factory = RelayMilter
    ctx = MilterCtx()
    ctx._setsymval("i", "4XyZ1Qd2")
    assert ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1") == Milter.CONTINUE
    return ctx


def signed(key, **kw):
    msg = make_message("news@acme.example", "alice@example.org", extra_headers=(("X-Platform-Trace", "hop-1"),), **kw)
    return sign(msg, key, "hop.acme.test", "s1")


def test_good_message_is_rewritten_and_routed(ctx, key, caplog):
    caplog.set_level(logging.INFO, logger="relay.milter")
    rc = ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT)
    assert rc == Milter.CONTINUE
    assert ctx._reply is None
    assert ctx._delrcpt == [f"<{RCPT}>"]
    assert ctx._addrcpt == [("<alice@example.org>", "ORCPT=rfc822;alice@example.org")]
    assert ctx._envfromchanged and ctx._sender == "<bounces@acme.example>"
    msg = ctx._msg
    assert msg.get_all("DKIM-Signature") is None
    assert msg.get_all("X-Platform-Trace") is None
    assert msg["X-Relay-Route"].strip() == "acme"
    assert msg["Reply-To"].strip() == "replies@acme.example"
    assert "dkim=pass" in msg["Authentication-Results"]
    assert "4XyZ1Qd2: event=accepted tenant=acme smarthost=[127.0.0.1]:2525" in caplog.text


def test_bad_recipient_is_rejected_at_rcpt_with_a_precise_reply(ctx, key, caplog):
    rc = ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", "alice@acme.relay.test")
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.1.3")
    assert "not encoded" in ctx._reply[2]
    assert "4XyZ1Qd2: event=reject stage=rcpt code=550 dsn=5.1.3" in caplog.text


def test_altered_body_is_rejected_at_end_of_message(ctx, key):
    raw = signed(key).replace(b"Hello from the platform.", b"Hello from a forger!!!!")
    rc = ctx._feedFile(io.BytesIO(raw), "news@acme.example", RCPT)
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.7.20")
    assert ctx._addrcpt == [] and ctx._delrcpt == []  # nothing was changed on a rejected message


def test_reply_text_cannot_break_the_protocol(ctx, key):
    # A '%' or a CR/LF in client-derived text must not reach smfi_setreply raw.
    rc = ctx._feedFile(io.BytesIO(signed(key)), "x%s\r\n@evil.example", RCPT)
    assert rc == Milter.REJECT
    assert "\r" not in ctx._reply[2] and "\n" not in ctx._reply[2]
    assert "%" not in ctx._reply[2].replace("%%", "")


def test_policy_crash_tempfails_never_accepts(ctx, key, policy, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("simulated defect")

    monkeypatch.setattr(policy, "on_eom", boom)
    rc = ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.3.0")
    assert ctx._addrcpt == []
    assert "event=error stage=eom" in caplog.text


def test_unknown_header_edit_tempfails_and_changes_nothing(ctx, key, policy, monkeypatch, caplog):
    real = policy.on_eom

    def with_unknown_edit(tx, message):
        d = real(tx, message)
        assert d.verdict.ok and d.header_edits  # a good message: edits that would be applied
        return dataclasses.replace(d, header_edits=(*d.header_edits, HeaderEdit("append", "X-Injected", " yes")))

    monkeypatch.setattr(policy, "on_eom", with_unknown_edit)
    rc = ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.3.0")
    assert ctx._msg.get_all("X-Injected") is None and ctx._msg.get_all("X-Relay-Route") is None
    assert ctx._msg.get_all("X-Platform-Trace") is not None  # not even the known edits before it were applied
    assert ctx._addrcpt == [] and ctx._delrcpt == []
    assert "event=error stage=eom" in caplog.text and "unknown header edit 'append' for X-Injected" in caplog.text


def test_authenticated_submission_takes_the_login_from_auth_authen(ctx, caplog):
    caplog.set_level(logging.INFO, logger="relay.milter")
    ctx._setsymval("{auth_authen}", "app1@relay.test")
    raw = make_message("news@acme.example", "bob@example.org")  # no DKIM: the login vouches
    rc = ctx._feedFile(io.BytesIO(raw), "news@acme.example", "bob@example.org")
    assert rc == Milter.CONTINUE, ctx._reply
    assert ctx._delrcpt == [] and ctx._addrcpt == []  # plain recipients are delivered as given
    assert ctx._msg["X-Relay-Route"].strip() == "acme"
    assert ctx._msg["Authentication-Results"].strip() == "relay.test; auth=pass smtp.auth=app1@relay.test"
    assert "event=accepted tenant=acme" in caplog.text and "auth=app1@relay.test" in caplog.text
    assert "rcpts=<bob@example.org>" in caplog.text


def test_unsigned_mail_without_a_login_is_still_refused(ctx):
    raw = make_message("news@acme.example", "alice@example.org")
    assert ctx._feedFile(io.BytesIO(raw), "news@acme.example", RCPT) == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.7.20")


def test_a_login_of_no_tenant_is_refused_at_mail_from(ctx):
    ctx._setsymval("{auth_authen}", "intruder@relay.test")
    rc = ctx._feedFile(io.BytesIO(make_message("news@acme.example", "bob@example.org")), "news@acme.example", "bob@example.org")
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.7.1") and "not a submission user" in ctx._reply[2]


def test_mta_gone_mid_edit_tempfails_with_one_log_line_and_no_traceback(ctx, key, monkeypatch, caplog):
    """Postfix stopped while the milter was applying its edits: libmilter refuses the
    edit (milter.error). The message is tempfailed, logged as one structured line."""
    import milter

    def gone(*a, **k):
        raise milter.error("cannot change header")

    monkeypatch.setattr(ctx._priv.__class__, "chgheader", gone)
    caplog.set_level(logging.INFO, logger="relay.milter")
    rc = ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.3.0")
    assert "4XyZ1Qd2: event=error stage=eom reason=mta_gone" in caplog.text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_stopping_worker_can_wait_for_transactions_in_progress(ctx, key):
    """RelayMilter.drain: a transaction counts from an accepted MAIL to its end of message
    (or abort, or the session's close); what a stopping worker waits for. (Earlier tests'
    contexts, never closed, may still count: the count is per process.)"""
    base = RelayMilter.drain(0)
    assert ctx._envfrom("<news@acme.example>") == Milter.CONTINUE
    assert RelayMilter.drain(0.01) == base + 1
    ctx._abort()  # (the test context closes the session too)
    assert RelayMilter.drain(0) == base
    assert ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1") == Milter.CONTINUE
    assert ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT) == Milter.CONTINUE
    assert RelayMilter.drain(0) == base  # counted at MAIL, done at end of message
    assert ctx._envfrom("<news@acme.example>") == Milter.CONTINUE
    ctx._close()
    assert RelayMilter.drain(0) == base


def test_fewer_round_trips_are_negotiated(ctx):
    """Postfix sends no DATA, end-of-headers or unknown command and waits for no header reply;
    everything that can refuse (MAIL, RCPT, the body, end of message) still gets a reply."""
    p = ctx._protocol
    assert p & Milter.P_NR_HDR and p & Milter.P_NODATA and p & Milter.P_NOEOH and p & Milter.P_NOUNKNOWN
    assert not p & (Milter.P_NOHDRS | Milter.P_NOBODY | Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_BODY)
    assert ctx._priv.header("Subject", " x") == Milter.NOREPLY


def test_a_header_that_cannot_be_taken_in_tempfails_the_message(ctx, key, caplog):
    class Full(list):
        def append(self, item):
            raise MemoryError("simulated")

    assert ctx._envfrom("<news@acme.example>") == Milter.CONTINUE
    assert ctx._envrcpt(f"<{RCPT}>") == Milter.CONTINUE
    ctx._priv._headers = Full()
    assert ctx._priv.header("Subject", " x") == Milter.NOREPLY  # no reply to send: remembered
    rc = ctx._eom()
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.3.0")
    assert ctx._addrcpt == [] and ctx._delrcpt == []
    assert "event=error stage=header" in caplog.text and "MemoryError in header" in caplog.text


# -- engagement tracking (opt-in, issue 15 part B) ---------------------------------------------


def _html_message(key) -> bytes:
    body = '<html><body><p><a href="https://news.example.org/a">read</a></p></body></html>\r\n'  # hygiene: not a path (HTML)
    msg = make_message("news@acme.example", "alice@example.org", body=body).replace(
        b"Content-Type: text/plain; charset=utf-8", b"Content-Type: text/html; charset=utf-8")
    return sign(msg, key, "hop.acme.test", "s1")


@pytest.fixture
def engaged_ctx(tmp_path, key):
    doc = tenant_doc("acme", key, smarthost={"host": "127.0.0.1", "port": 2525},
                     engagement_tracking={"base_url": "https://t.example.net"})
    write_tenants(tmp_path / "tenants", [doc])
    settings = Settings(myhostname="relay.test", engagement={"key_file": str(tmp_path / "engagement.key")})
    RelayMilter.source = Policy(load_tenants(tmp_path / "tenants"), settings)
    Milter.factory = RelayMilter
    ctx = MilterCtx()
    ctx._setsymval("i", "4XyZ1Qd2")
    assert ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1") == Milter.CONTINUE
    return ctx, tmp_path / "engagement.key"


def test_engaged_tenant_gets_its_html_rewritten_after_verification(engaged_ctx, key, caplog, monkeypatch):
    from relay_milter.core import engagement

    ctx, key_file = engaged_ctx
    key_file.write_text(engagement.new_key_text(bytes(range(32))))
    monkeypatch.setattr(RelayMilter, "engagement_key", None)
    caplog.set_level(logging.INFO, logger="relay.milter")
    assert ctx._feedFile(io.BytesIO(_html_message(key)), "news@acme.example", RCPT) == Milter.CONTINUE
    assert ctx._bodyreplaced
    out = ctx._body.getvalue()
    token = out.split(b"https://t.example.net/c/")[1].split(b'"')[0].decode()
    got = engagement.read_token(bytes(range(32)), token, kind=engagement.CLICK)
    assert (got.tenant, got.queue_id, got.url) == ("acme", "4XyZ1Qd2", "https://news.example.org/a")
    assert got.rcpt_id == engagement.recipient_id(bytes(range(32)), "acme", "alice@example.org")
    assert b"https://t.example.net/o/" in out and b"news.example.org" not in out
    assert "event=engagement tenant=acme links=1 pixel=1" in caplog.text


def test_engaged_tenant_without_a_key_is_relayed_untouched_with_a_log_line(engaged_ctx, key, caplog, monkeypatch):
    ctx, _ = engaged_ctx
    monkeypatch.setattr(RelayMilter, "engagement_key", None)
    caplog.set_level(logging.INFO, logger="relay.milter")
    assert ctx._feedFile(io.BytesIO(_html_message(key)), "news@acme.example", RCPT) == Milter.CONTINUE
    assert not ctx._bodyreplaced and ctx._reply is None
    assert "event=engagement_skipped" in caplog.text and 'reason="no engagement key"' in caplog.text


def test_tenant_without_engagement_tracking_is_never_rewritten(ctx, key, caplog, monkeypatch):
    monkeypatch.setattr(RelayMilter, "engagement_key", bytes(32))
    caplog.set_level(logging.INFO, logger="relay.milter")
    assert ctx._feedFile(io.BytesIO(_html_message(key)), "news@acme.example", RCPT) == Milter.CONTINUE
    assert not ctx._bodyreplaced and "event=engagement" not in caplog.text


# -- bounce tracking (issue 15 A) ------------------------------------------------------------

DSN = (
    "From: MAILER-DAEMON@mx.example.org\r\nTo: x\r\nSubject: Undelivered\r\nMessage-ID: <dsn.1@mx.example.org>\r\n"
    "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
    "--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
    "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
    "Final-Recipient: rfc822; alice@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n--b--\r\n"
)


def feed_raw(ctx, raw: bytes, sender: str, rcpt: str) -> int:
    """The callbacks with the bytes as they are: TestCtx._feedFile re-generates the message,
    which turns a message/delivery-status part into a multipart (Postfix passes it unchanged)."""
    for step in (lambda: ctx._envfrom(f"<{sender}>"), lambda: ctx._envrcpt(f"<{rcpt}>"), ctx._data):
        if (rc := step()) != Milter.CONTINUE:
            return rc
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(":")
        if (rc := ctx._header(name, value.lstrip())) != Milter.CONTINUE:
            return rc
    if (rc := ctx._eoh()) != Milter.CONTINUE:
        return rc
    if (rc := ctx._feed_body(io.BytesIO(body))) != Milter.CONTINUE:
        return rc
    return ctx._eom()


@pytest.fixture(params=[None, "dsn@acme.example"], ids=["discard", "forward"])
def bounce_ctx(request, tmp_path, key):
    from relay_milter import defaults

    bt = {"domain": "bounces.acme.test"} | ({"forward_to": request.param} if request.param else {})
    write_tenants(tmp_path / "t", [tenant_doc("acme", key, bounce_tracking=bt)])
    (tmp_path / "c" / defaults.VERP_KEY_FILE).parent.mkdir(parents=True)
    (tmp_path / "c" / defaults.VERP_KEY_FILE).write_text("ab" * 32 + "\n")
    RelayMilter.source = Policy(load_tenants(tmp_path / "t"), Settings(myhostname="relay.test", config_directory=tmp_path / "c"))
    Milter.factory = RelayMilter
    ctx = MilterCtx()
    ctx._setsymval("i", "4jf7q12b7zz2GWL1")
    assert ctx._connect(host="mx.example.org", helo="mx.example.org", ip="192.0.2.9") == Milter.CONTINUE
    ctx.forward_to = request.param
    return ctx


def test_a_signed_message_gets_the_verp_return_path_and_a_dsn_to_it_is_logged(bounce_ctx, key, caplog):
    from relay_milter.core import bounces

    caplog.set_level(logging.INFO, logger="relay.milter")
    bounce_ctx._setsymval("i", "4jf7q00MrMz2GWKy")
    assert bounce_ctx._feedFile(io.BytesIO(signed(key)), "news@acme.example", RCPT) == Milter.CONTINUE
    verp = bounces.return_path(bytes.fromhex("ab" * 32), "acme", "bounces.acme.test", "4jf7q00MrMz2GWKy", ["alice@example.org"])
    assert bounce_ctx._envfromchanged and bounce_ctx._sender == f"<{verp}>"

    bounce_ctx._setsymval("i", "4jf7q12b7zz2GWL1")
    rc = feed_raw(bounce_ctx, DSN.encode(), "", verp)
    log = caplog.text
    assert ("4jf7q12b7zz2GWL1: event=bounce_report tenant=acme orig_queue_id=4jf7q00MrMz2GWKy kind=BOUNCED "
            "rcpt=alice@example.org status=5.1.1 action=failed code=550 diagnostic=\"550 5.1.1 user unknown\"") in log
    if bounce_ctx.forward_to is None:
        assert rc == Milter.DISCARD  # 250 to the sender, nothing queued
        assert "event=bounce_accepted tenant=acme report=rfc3464 reports=1" in log
    else:
        assert rc == Milter.CONTINUE
        assert bounce_ctx._delrcpt[-1] == f"<{verp}>" and bounce_ctx._addrcpt[-1][0] == "<dsn@acme.example>"
        assert bounce_ctx._msg["X-Relay-Route"] == "acme" and bounce_ctx._msg["X-Relay-Route-Seal"].startswith("acme.")
        assert "forward_to=dsn@acme.example" in log


def test_a_forged_return_path_is_refused_at_rcpt(bounce_ctx, caplog):
    rc = bounce_ctx._feedFile(io.BytesIO(DSN.encode()), "", f"rb1.4jf7q00MrMz2GWKy.m.{'a' * 20}@bounces.acme.test")
    assert rc == Milter.REJECT and bounce_ctx._reply[:2] == ("550", "5.1.1")
    assert "event=reject stage=rcpt code=550 dsn=5.1.1" in caplog.text and "bounce_report" not in caplog.text
