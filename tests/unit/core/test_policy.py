"""The decision core, driven directly: facts + tenant -> verdict. Real DKIM signatures, no MTA."""

from __future__ import annotations

import contextlib
import re
import time
from unittest import mock

import pytest
import yaml

from support.factories import to_message
from support.factories import tenant_doc

from relay_milter.config import DnsSettings, Settings, load_tenants
from relay_milter.core.dkimverify import KeyResolver
from relay_milter.lab import ed25519_key, free_port, make_message, rsa_key, sign
from relay_milter.core.policy import Action, EditOp, HeaderEdit, Message, Policy, Transaction

ACME_RCPT = "<alice=example.org@acme.relay.test>"
GLOBEX_RCPT = "<alice=example.org@globex.relay.test>"


@pytest.fixture(scope="module")
def keys():
    return {"acme": rsa_key(2048), "globex": ed25519_key(), "weak": rsa_key(512), "other": rsa_key(1024)}


@pytest.fixture(scope="module")
def policy(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("tenants")
    docs = [
        tenant_doc(
            "acme",
            keys["acme"],
            allowed_client_ips=["127.0.0.0/8", "2001:db8::/32"],
            headers={
                "strip": ["X-Platform-Trace"],
                "reply_to": "replies@acme.example",
                "envelope_sender": "bounces@acme.example",
            },
        ),
        tenant_doc("globex", keys["globex"]),
        tenant_doc("weak", keys["weak"]),
        tenant_doc("aged", keys["other"], max_signature_age=3600),
    ]
    for doc in docs:
        (d / f"{doc['id']}.yaml").write_text(yaml.safe_dump(doc))
    return Policy(load_tenants(d), Settings(myhostname="relay.test"))


def run(policy, raw, rcpts=(ACME_RCPT,), mail_from="news@acme.example", ip="127.0.0.1"):
    tx = Transaction(client_ip=ip)
    assert policy.on_mail(tx, f"<{mail_from}>").ok
    for r in rcpts:
        v = policy.on_rcpt(tx, r)
        assert v.ok, v
    return policy.on_eom(tx, to_message(raw))


SIGN_OPTIONS = ("canonicalize", "length", "identity")


def signed(keys, tenant="acme", sender=None, key=None, domain=None, selector="s1", headers=None, mutate=None, at=None, **kw):
    """A message signed with dkimpy. ``at`` signs with t= at that (past) time."""
    sign_kw = {k: kw.pop(k) for k in SIGN_OPTIONS if k in kw}
    msg = make_message(sender or f"news@{tenant}.example", "alice@example.org", **kw)
    if mutate:
        msg = mutate(msg)
    if headers:
        sign_kw["headers"] = headers
    with mock.patch("dkim.time.time", return_value=at) if at else contextlib.nullcontext():
        return sign(msg, key or keys[tenant], domain or f"hop.{tenant}.test", selector, **sign_kw)


NOT_REPLY_TO = ("from", "to", "subject", "date", "message-id", "mime-version", "content-type")


def decoys(raw: bytes, count: int) -> bytes:
    """``count`` DKIM-Signature fields with the tenant's d=/s=, a random bh= and b=, on top."""
    import base64
    import os

    sig = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", raw, re.S).group(1)
    tags = dict(t.strip().split(b"=", 1) for t in re.sub(rb"\s+", b"", sig).split(b";") if b"=" in t)
    fields = [
        b"DKIM-Signature: " + b"; ".join(k + b"=" + v for k, v in (tags | {b"bh": base64.b64encode(os.urandom(32)), b"b": b"AAAA"}).items()) + b"\r\n"
        for _ in range(count)
    ]
    return b"".join(fields) + raw


# -- end of message: a golden table -------------------------------------------------

EOM_CASES = [
    # name, build(keys) -> (raw, rcpts, mail_from), action, dsn, reason pattern
    ("good rsa", lambda k: (signed(k), [ACME_RCPT], "news@acme.example"), Action.ACCEPT, "", ""),
    ("good ed25519", lambda k: (signed(k, "globex"), [GLOBEX_RCPT], "news@globex.example"), Action.ACCEPT, "", ""),
    ("simple/simple canonicalization", lambda k: (signed(k, canonicalize=(b"simple", b"simple")), [ACME_RCPT], "news@acme.example"), Action.ACCEPT, "", ""),
    ("unsigned", lambda k: (make_message("news@acme.example", "a@b.example"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "no DKIM signature"),
    ("wrong selector", lambda k: (signed(k, selector="other"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", "selector s=other"),
    ("other tenant's valid signature", lambda k: (signed(k, "globex", sender="news@acme.example"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", "belongs to another tenant"),
    ("ed25519 signature, RSA key (a= must match k=)", lambda k: (signed(k, key=k["globex"]), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", "a=ed25519-sha256 does not match the key type k=rsa"),
    ("unrelated signer", lambda k: (signed(k, domain="evil.example"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", "no signature by d=hop.acme.test"),
    ("wrong key", lambda k: (signed(k, key=k["other"]), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "did not verify"),
    ("body changed", lambda k: (signed(k).replace(b"Hello", b"Jello"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "body hash mismatch"),
    ("subject changed", lambda k: (signed(k).replace(b"Subject: Test", b"Subject: Pwned"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "signed headers changed"),
    ("l= body length", lambda k: (signed(k, length=True), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"body length limit \(l=\)"),
    ("subject not signed", lambda k: (signed(k, headers=("from", "to", "date")), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", "required header.*subject"),
    ("signature older than max_signature_age", lambda k: (signed(k, "aged", key=k["other"], at=time.time() - 7200), ["<alice=example.org@aged.relay.test>"], "news@aged.example"), Action.REJECT, "5.7.21", r"older than 3600s"),
    ("duplicate From", lambda k: (b"From: ceo@evil.example\r\n" + signed(k), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.6.0", "2 from header fields"),
    ("duplicate Subject", lambda k: (b"Subject: second\r\n" + signed(k), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.6.0", "2 subject header fields"),
    ("From not allowed", lambda k: (signed(k, sender="ceo@evil.example"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.1", "From address ceo@evil.example is not allowed"),
    ("two From mailboxes", lambda k: (signed(k, mutate=lambda m: m.replace(b"From: Platform Sender <news@acme.example>", b"From: news@acme.example, ceo@acme.example")), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.6.0", "exactly one valid mailbox"),
    ("weak 512-bit key", lambda k: (signed(k, "weak"), ["<c=example.org@weak.relay.test>"], "news@weak.example"), Action.REJECT, "5.7.21", "key not acceptable.*too small"),
    ("signature age limit, fresh", lambda k: (signed(k, "aged", key=k["other"]), ["<alice=example.org@aged.relay.test>"], "news@aged.example"), Action.ACCEPT, "", ""),
    # issue 11: signed headers, signature age, candidate cap, author fields, recipient binding
    ("Reply-To present, not signed", lambda k: (signed(k, extra_headers=(("Reply-To", "pay@evil.example"),), headers=NOT_REPLY_TO), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"required header\(s\): reply-to"),
    ("Cc present, not signed", lambda k: (signed(k, extra_headers=(("Cc", "alice@example.org"),), headers=NOT_REPLY_TO), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"required header\(s\): cc"),
    ("Reply-To added above an oversigned signature", lambda k: (b"Reply-To: pay@evil.example\r\n" + signed(k), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "signed headers changed"),
    ("second Content-Type above a once-signed one", lambda k: (b"Content-Type: text/html\r\n" + signed(k, headers=NOT_REPLY_TO), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"every instance of: content-type \(2 present, 1 signed\)"),
    ("Content-Type changed after signing", lambda k: (signed(k).replace(b"charset=utf-8", b"charset=koi8-r"), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.20", "signed headers changed"),
    ("oversigned and no Reply-To: accepted", lambda k: (signed(k, headers=NOT_REPLY_TO + NOT_REPLY_TO + ("reply-to", "cc")), [ACME_RCPT], "news@acme.example"), Action.ACCEPT, "", ""),
    ("signature two days old (default max_signature_age)", lambda k: (signed(k, at=time.time() - 2 * 86400), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"older than 86400s"),
    ("4 candidate signatures (max_hop_signatures 3)", lambda k: (decoys(signed(k), 3), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.21", r"message has 4 signatures by d=hop.acme.test s=s1, more than the 3 examined"),
    ("2 decoys with bogus bh= above the real signature", lambda k: (decoys(signed(k), 2), [ACME_RCPT], "news@acme.example"), Action.ACCEPT, "", ""),
    ("Sender of another tenant", lambda k: (signed(k, extra_headers=(("Sender", "news@globex.example"),)), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.1", "Sender address news@globex.example is not allowed for this tenant"),
    ("Resent-From of another tenant", lambda k: (signed(k, extra_headers=(("Resent-From", "a@acme.example, news@globex.example"),)), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.7.1", "Resent-From address news@globex.example"),
    ("Resent-Sender not a mailbox", lambda k: (signed(k, extra_headers=(("Resent-Sender", "nobody"),)), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.6.0", "Resent-Sender header field must hold valid mailboxes"),
    ("Sender of the tenant", lambda k: (signed(k, extra_headers=(("Sender", "desk@acme.example"),)), [ACME_RCPT], "news@acme.example"), Action.ACCEPT, "", ""),
    ("recipient not in the signed To/Cc (replay)", lambda k: (signed(k), [ACME_RCPT, "<eve=example.net@acme.relay.test>"], "news@acme.example"), Action.REJECT, "5.7.1", r"recipient\(s\) eve@example.net not in the signed To/Cc"),
    ("recipient in the signed Cc", lambda k: (signed(k, extra_headers=(("Cc", "Eve <EVE@example.net>"),)), [ACME_RCPT, "<eve=example.net@acme.relay.test>"], "news@acme.example"), Action.ACCEPT, "", ""),
    ("8-bit garbage in an unsigned header (limits.py)", lambda k: (signed(k, mutate=lambda m: m.replace(b"MIME-Version", b"X-Junk: \xff\xfe\x80\r\nMIME-Version")), [ACME_RCPT], "news@acme.example"), Action.REJECT, "5.6.0", "X-Junk contains bytes that are not valid UTF-8"),
]


@pytest.mark.parametrize("name, build, action, dsn, pattern", EOM_CASES, ids=[c[0] for c in EOM_CASES])
def test_end_of_message_table(policy, keys, name, build, action, dsn, pattern):
    raw, rcpts, mail_from = build(keys)
    d = run(policy, raw, rcpts, mail_from)
    assert d.verdict.action is action, d.verdict
    if action is Action.REJECT:
        assert d.verdict.code == "550" and d.verdict.dsn == dsn
        assert re.search(pattern, d.verdict.reason), d.verdict.reason
        assert d.header_edits == () and d.recipient_changes == ()


def test_accept_carries_the_transformation(policy, keys):
    raw = signed(
        keys,
        extra_headers=(("X-Platform-Trace", "t1"), ("Reply-To", "x@platform.example"), ("X-Relay-Route", "globex")),
        mutate=lambda m: m.replace(b"To: alice@example.org", b"To: Alice <alice=example.org@acme.relay.test>"),
    )
    tx = Transaction(client_ip="127.0.0.1")
    policy.on_mail(tx, "<news@acme.example>")
    assert policy.on_rcpt(tx, ACME_RCPT).ok
    d = policy.on_eom(tx, to_message(raw))
    assert d.verdict.action is Action.ACCEPT, d.verdict
    ops = [(e.op.value, e.name.lower(), e.value.strip()) for e in d.header_edits]
    assert ("delete", "dkim-signature", "") in ops
    assert ("delete", "x-platform-trace", "") in ops
    assert ("delete", "x-relay-route", "") in ops  # a client-supplied route marker never survives
    assert ("change", "reply-to", "replies@acme.example") in ops
    assert ("change", "to", "Alice <alice@example.org>") in ops
    [ar] = [e for e in d.header_edits if e.name == "Authentication-Results"]
    assert ar.op is EditOp.INSERT and ar.index == 0
    assert ar.value.strip().startswith("relay.test; dkim=pass") and "header.d=hop.acme.test" in ar.value
    assert d.header_edits[-1] == HeaderEdit(EditOp.ADD, "X-Relay-Route", "acme")
    assert d.recipient_changes == ((ACME_RCPT, "<alice@example.org>"),)
    assert d.new_sender == "<bounces@acme.example>"


def test_forged_authentication_results_for_our_authserv_id_are_removed(policy, keys):
    raw = b"Authentication-Results: relay.test; dkim=pass header.d=hop.acme.test\r\n" + signed(keys)
    d = run(policy, raw)
    assert d.verdict.action is Action.ACCEPT
    assert any(e.op is EditOp.DELETE and e.name.lower() == "authentication-results" for e in d.header_edits)


def test_dns_failure_tempfails(tmp_path, keys):
    doc = tenant_doc("acme", None)
    (tmp_path / "acme.yaml").write_text(yaml.safe_dump(doc))
    dns = DnsSettings(nameservers=("127.0.0.1",), port=free_port(), timeout=0.5)
    p = Policy(load_tenants(tmp_path), Settings(dns=dns), KeyResolver(dns))
    d = run(p, signed(keys), mail_from="news@acme.example")
    assert d.verdict.action is Action.TEMPFAIL
    assert (d.verdict.code, d.verdict.dsn) == ("451", "4.7.5")
    assert "DNS lookup" in d.verdict.reason


# -- envelope stage -----------------------------------------------------------------

RCPT_CASES = [
    # name, mail_from, rcpts (all but last must pass), client ip, action, code, dsn, pattern
    ("good", "news@acme.example", [ACME_RCPT], "127.0.0.1", Action.CONTINUE, "", "", ""),
    ("bounce address in hop domain", "b-123@hop.acme.test", [ACME_RCPT], "127.0.0.1", Action.CONTINUE, "", "", ""),
    ("client ipv6 allowed", "news@acme.example", [ACME_RCPT], "2001:db8::5", Action.CONTINUE, "", "", ""),
    ("malformed", "news@acme.example", ["<alice@acme.relay.test>"], "127.0.0.1", Action.REJECT, "550", "5.1.3", "not encoded"),
    ("relay domain Postfix knows but the milter does not (yet)", "news@acme.example", ["<a=example.org@nobody.relay.test>"], "127.0.0.1", Action.TEMPFAIL, "451", "4.3.5", "not configured on this relay yet"),
    ("loop to a relay domain", "news@acme.example", ["<a=globex.relay.test@acme.relay.test>"], "127.0.0.1", Action.REJECT, "550", "5.1.3", "points back"),
    ("two tenants in one transaction", "news@acme.example", [ACME_RCPT, GLOBEX_RCPT], "127.0.0.1", Action.TEMPFAIL, "452", "4.5.3", "separate transaction"),
    ("client not allowed", "news@acme.example", [ACME_RCPT], "198.51.100.7", Action.REJECT, "550", "5.7.1", "not allowed to relay"),
    ("null sender", "", [ACME_RCPT], "127.0.0.1", Action.REJECT, "550", "5.7.1", "null sender"),
    ("envelope sender not allowed", "x@evil.example", [ACME_RCPT], "127.0.0.1", Action.REJECT, "550", "5.7.1", "envelope sender x@evil.example"),
    ("another tenant's sender domain", "news@globex.example", [ACME_RCPT], "127.0.0.1", Action.REJECT, "550", "5.7.1", "not allowed for this tenant"),
]


@pytest.mark.parametrize("name, mail_from, rcpts, ip, action, code, dsn, pattern", RCPT_CASES, ids=[c[0] for c in RCPT_CASES])
def test_envelope_table(policy, name, mail_from, rcpts, ip, action, code, dsn, pattern):
    tx = Transaction(client_ip=ip)
    assert policy.on_mail(tx, f"<{mail_from}>").ok
    for r in rcpts[:-1]:
        assert policy.on_rcpt(tx, r).ok
    v = policy.on_rcpt(tx, rcpts[-1])
    assert v.action is action, v
    if action is not Action.CONTINUE:
        assert (v.code, v.dsn) == (code, dsn)
        assert re.search(pattern, v.reason), v.reason
        assert len(tx.recipients) == len(rcpts) - 1  # the refused recipient is not recorded


def test_malformed_sender_is_refused(policy):
    v = policy.on_mail(Transaction(), "<a@b@c>")
    assert (v.action, v.code, v.dsn) == (Action.REJECT, "553", "5.1.7")


def test_eom_without_recipients_tempfails(policy, keys):
    d = policy.on_eom(Transaction(), to_message(signed(keys)))
    assert d.verdict.action is Action.TEMPFAIL


@pytest.mark.parametrize(
    "tags, pattern",
    [
        ({b"x": b"1000"}, r"expired \(x=\)"),
        ({b"t": str(int(time.time()) + 86400).encode()}, r"in the future"),
        ({b"t": b"soon"}, "non-numeric"),
        ({b"a": b"rsa-sha1"}, "a=rsa-sha1 is not accepted"),
        ({b"h": b"from:to"}, "required header.*subject"),
        ({b"l": b"10"}, "l="),
    ],
)
def test_signature_tag_policy(policy, tags, pattern):
    from relay_milter.core.dkimverify import check_tags

    sig = {b"a": b"rsa-sha256", b"h": b"from:to:subject", b"t": str(int(time.time())).encode()} | tags
    assert re.search(pattern, check_tags(sig, policy.tenants.by_id("acme"), time.time()))
    fresh = str(int(time.time())).encode()  # t= is needed: max_signature_age is on by default
    assert check_tags({b"a": b"ed25519-sha256", b"h": b"From : To : Subject", b"t": fresh}, policy.tenants.by_id("acme"), time.time()) is None


# -- Authentication-Results (issue 11, findings 3 and 4) -----------------------------


def _op(edit) -> str:
    return getattr(edit.op, "value", edit.op)  # a plain string or an Enum member


@pytest.mark.parametrize(
    "authserv", ["relay.test", "RELAY.TEST", "(trusted) relay.test", "relay.test(x)", '"relay.test"', "relay.test.", '"Relay.\\Test."']
)
def test_forged_authentication_results_in_every_spelling_are_removed(policy, keys, authserv):
    raw = (
        f"Authentication-Results: {authserv}; dkim=pass header.d=hop.acme.test\r\n"
        "Authentication-Results: mx.other.example; spf=pass\r\n"
    ).encode() + signed(keys)
    d = run(policy, raw)
    assert d.verdict.action is Action.ACCEPT
    deletes = [e for e in d.header_edits if _op(e) == "delete" and e.name.lower() == "authentication-results"]
    assert [e.index for e in deletes] == [1]  # ours (the first); mx.other.example's stays


def test_identity_from_the_signature_is_quoted_in_our_authentication_results(policy, keys):
    identity = "x dkim=pass header.d=bank.example reason=ok@hop.acme.test"
    d = run(policy, signed(keys, domain="hop.acme.test", identity=identity.encode()))
    assert d.verdict.action is Action.ACCEPT, d.verdict
    [ar] = [e.value.strip() for e in d.header_edits if e.name == "Authentication-Results"]
    assert ar.startswith(f'relay.test; dkim=pass header.d=hop.acme.test header.i="{identity}" header.a=rsa-sha256 header.s=s1 header.b=')
