"""Ingress and egress security against a real Postfix: SMTP AUTH submission (Cyrus
sasldb) under STARTTLS, client IP allowlists, the relay's own certificate, per-tenant
outbound TLS policies against TLS sinks with a test CA, and SASL to a smarthost.

Its own lab (module scope): four tenants whose sinks differ in TLS and AUTH.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import smtplib
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import Mailer
from relay_milter.postfix.certs import make_ca, make_cert
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, wait_for
from support.classes import class_of

pytestmark = pytest.mark.e2e

SMARTHOST_USER = "relay@acme.example"


def spec(tid: str, **extra) -> TenantSpec:
    return TenantSpec(
        id=tid,
        relay_domain=f"{tid}.relay.test",
        signing_domain=f"hop.{tid}.test",
        selector="s1",
        key=rsa_key(2048),
        sender_domains=[f"{tid}.example"],
        extra=extra,
    )


@pytest.fixture(scope="module")
def sec():
    lab = Lab()
    lab.passwords = {u: secrets.token_urlsafe(18) for u in ("app1", "app2", "app3", "app4", "app5")}
    lab.smarthost_password = secrets.token_urlsafe(18)
    # acme: verified TLS against the lab CA, and a login at its smarthost.
    lab.add_tenant(
        spec("acme", submission_users=["app1"]),
        Sink("acme", tls=lab.smarthost_cert("mx.acme.test"), auth=(SMARTHOST_USER, lab.smarthost_password)),
        tls="verify", ca_file=str(lab.ca_file), tls_match="mx.acme.test", auth={"username": SMARTHOST_USER},
    )
    # globex: encrypt (no verification) to a self-signed smarthost.
    lab.add_tenant(spec("globex", submission_users=["app2", "app9"]), Sink("globex", tls=make_cert(["mx.globex.test"])), tls="encrypt")
    # initech: verify, but its smarthost shows a certificate from another CA.
    lab.add_tenant(
        spec("initech", submission_users=["app3"]),
        Sink("initech", tls=make_cert(["mx.initech.test"], make_ca("Not The Lab CA"))),
        tls="verify", ca_file=str(lab.ca_file), tls_match="mx.initech.test",
    )
    # umbrella: only clients from 192.0.2.0/24 or 2001:db8::/32 may send; the lab is 127.0.0.1.
    lab.add_tenant(
        spec("umbrella", submission_users=["app4"], allowed_client_ips=["192.0.2.0/24", "2001:db8::/32"]),
        Sink("umbrella"), tls="none",
    )
    # hooli: only ::1 may send, so the lab listens on IPv6 loopback too.
    lab.add_tenant(spec("hooli", submission_users=["app5"], allowed_client_ips=["::1/128"]), Sink("hooli"), tls="none")
    lab.overrides = {
        "inet_protocols": "all",
        "inet_interfaces": "127.0.0.1, [::1]",
        "smtpd_listen": [f"127.0.0.1:{lab.smtp_port}", f"[::1]:{lab.smtp_port}"],
        "submission_listen": [f"127.0.0.1:{lab.submission_port}", f"[::1]:{lab.submission_port}"],
    }
    lab.secrets = {"acme": {"smarthost_password": lab.smarthost_password}}
    try:
        lab.start()
        for user, password in lab.passwords.items():
            lab.add_user(user, password)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def lab(sec):
    for sink in sec.sinks.values():
        with sink.lock:
            sink.messages.clear()
    return sec


def submit(lab, user, sender=None, to="bob@example.org", rcpts=None, header_from=None, password=None, **kw):
    sender = sender or f"news@{lab.tenants[tenant_of(user)].sender_domains[0]}"
    msg = make_message(header_from or sender, to, **kw)
    return lab.submit(msg, sender, rcpts or [to], user, password or lab.passwords[user])


def tenant_of(user: str) -> str:
    return {"app1": "acme", "app2": "globex", "app3": "initech", "app4": "umbrella", "app5": "hooli"}[user]


def no_delivery(lab) -> bool:
    return all(not s.messages for s in lab.sinks.values())


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def milter_reject(lab, dsn: str, pattern: str) -> str:
    return wait_for(
        lambda: next((ln for ln in lab.milter_log_text().splitlines() if "event=reject" in ln and f"dsn={dsn}" in ln and re.search(pattern, ln)), None),
        10, what=f"milter reject line {dsn} {pattern}",
    )


# -- submission ------------------------------------------------------------------


def test_submission_is_delivered_over_verified_tls_with_the_smarthost_login(lab):
    code, text, _ = submit(lab, "app1", subject="via 587")
    assert code == 250, text
    [m] = lab.sinks["acme"].wait(1)
    assert m.rcpt_tos == ["bob@example.org"] and m.mail_from == "news@acme.example"
    assert m.login == SMARTHOST_USER  # the relay logged in with the tenant's credentials
    assert m.tls and m.tls[1] in ("TLSv1.2", "TLSv1.3")
    assert m.header("Authentication-Results") == ["relay.lab.test; auth=pass smtp.auth=app1@relay.lab.test"]
    assert m.header("X-Relay-Route") == []
    port = lab.sinks["acme"].port
    assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{port}" in lab.maillog_text()
    assert re.search(r"postfix/submission/smtpd\[\d+\]: \w+: client=localhost\[127.0.0.1\], sasl_method=PLAIN, sasl_username=app1@relay.lab.test", lab.maillog_text())


def test_auth_needs_starttls_first_and_port_25_never_offers_it(lab):
    fake = base64.b64encode(b"\0app1\0not-the-password").decode()
    with smtplib.SMTP("127.0.0.1", lab.submission_port, timeout=30) as s:
        s.ehlo("app.lab.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.docmd("AUTH", f"PLAIN {fake}")[0] == 530  # 5.7.0 Must issue a STARTTLS command first
        code, text = s.docmd("MAIL", "FROM:<news@acme.example>")
        assert code == 530 and b"5.7.0" in text
        s.starttls(context=client_tls())
        s.ehlo("app.lab.test")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
    with smtplib.SMTP("127.0.0.1", lab.smtp_port, timeout=30) as s:
        s.starttls(context=client_tls())
        s.ehlo("platform.lab.test")
        assert not s.has_extn("auth")
        code, text = s.docmd("AUTH", f"PLAIN {fake}")
        assert (code, text[:5]) == (503, b"5.5.1")
    assert no_delivery(lab)


def test_wrong_password_is_refused_and_no_password_reaches_a_log(lab):
    code, text, _ = submit(lab, "app1", password="wrong-" + lab.passwords["app1"])
    assert code == 535 and text.startswith("5.7.8")
    assert "SASL PLAIN authentication failed" in lab.maillog_text() or "SASL LOGIN authentication failed" in lab.maillog_text()
    logs = lab.maillog_text() + lab.milter_log_text()
    for secret in [*lab.passwords.values(), lab.smarthost_password]:
        assert secret not in logs
    assert no_delivery(lab)


def test_unauthenticated_mail_on_the_submission_port_is_refused(lab):
    with smtplib.SMTP("127.0.0.1", lab.submission_port, timeout=30) as s:
        s.starttls(context=client_tls())
        s.ehlo("app.lab.test")
        assert s.mail("news@acme.example")[0] == 250
        code, text = s.rcpt("bob@example.org")
    assert code == 554 and text.startswith(b"5.7.1") and b"Access denied" in text
    assert "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1" in lab.maillog_text()
    assert no_delivery(lab)


def test_removed_user_cannot_log_in_and_comes_back_when_re_added(lab):
    lab.relayctl("user", "remove", "app2")
    code, text, _ = submit(lab, "app2")
    assert code == 535, text
    lab.add_user("app2", lab.passwords["app2"])
    assert submit(lab, "app2")[0] == 250
    lab.sinks["globex"].wait(1)


def test_user_list_and_add_refuse_what_no_tenant_declares(lab):
    rows = {r["user"]: r for r in json.loads(lab.relayctl("user", "list", "--json").stdout)}
    assert rows["app1"] == {"user": "app1", "tenant": "acme", "state": "active"}
    assert rows["app9"]["state"] == "no-password"  # declared by globex, no password yet
    r = lab.relayctl("user", "add", "stranger", "--generate", check=False)
    assert r.returncode == 3 and "stranger is in no tenant's submission_users" in r.stderr
    r = lab.relayctl("user", "remove", "app9", check=False)
    assert r.returncode == 1 and "has no password" in r.stderr
    db = lab.sasl_db
    assert db.stat().st_mode & 0o777 == 0o640 and db.stat().st_uid == 0  # root:postfix, nobody else


# -- cross-tenant spoofing and allowlists, both ways in --------------------------

def signed_ingress(lab, tid: str, key_of: str | None = None):
    """Signed mail to tenant ``tid``'s relay domain, signed as tenant ``key_of`` (default: itself)."""
    t, signer = lab.tenants[tid], lab.tenants[key_of or tid]
    m = Mailer(lab, {"relay_domain": t.relay_domain, "signing_domain": signer.signing_domain, "selector": "s1", "sender_domains": t.sender_domains}, signer.key)
    return m.send(m.signed())


SPOOF_CASES = [
    # name, send(lab) -> (code, text), code, dsn, milter-log pattern
    ("submission: envelope sender of another tenant",
     lambda lab: submit(lab, "app1", sender="news@globex.example"), 550, "5.7.1", r"stage=mail .*envelope sender news@globex.example"),
    ("submission: From header of another tenant",
     lambda lab: submit(lab, "app1", header_from="news@globex.example"), 550, "5.7.1", r"stage=eom .*From address news@globex.example"),
    ("submission: encoded recipient of another tenant's relay domain",
     lambda lab: submit(lab, "app1", to="bob=example.org@globex.relay.test"), 550, "5.7.1", r"stage=rcpt .*relay-domain recipients"),
    ("submission: client outside the tenant's allowlist",
     lambda lab: submit(lab, "app4"), 550, "5.7.1", r"stage=mail .*client 127.0.0.1 is not allowed to submit"),
    ("signed ingress: client outside the tenant's allowlist",
     lambda lab: signed_ingress(lab, "umbrella"), 550, "5.7.1", r"stage=rcpt .*client 127.0.0.1 is not allowed to relay"),
    ("signed ingress: valid signature of one tenant for another's relay domain",
     lambda lab: signed_ingress(lab, "globex", key_of="acme"), 550, "5.7.21", r"stage=eom .*which belongs to another tenant"),
]


@pytest.mark.parametrize("name, send, code, dsn, pattern", SPOOF_CASES, ids=[c[0] for c in SPOOF_CASES])
def test_cross_tenant_and_allowlist_table(lab, name, send, code, dsn, pattern):
    got, text, _ = send(lab)
    assert (got, text.split(" ", 1)[0]) == (code, dsn), text
    milter_reject(lab, dsn, pattern)
    assert no_delivery(lab)
    assert lab.milter_proc.poll() is None


def test_ipv6_allowlist_both_ways_in(lab):
    """hooli allows only ::1: from [::1] both ingress modes relay, from 127.0.0.1 neither does."""
    t = lab.tenants["hooli"]
    m = Mailer(lab, {"relay_domain": t.relay_domain, "signing_domain": t.signing_domain, "selector": "s1", "sender_domains": t.sender_domains}, t.key)
    with smtplib.SMTP("::1", lab.smtp_port, local_hostname="platform.lab.test", timeout=30) as s:
        assert s.sendmail("news@hooli.example", [m.rcpt("v6@example.org")], m.signed("v6@example.org")) == {}
    with smtplib.SMTP("::1", lab.submission_port, local_hostname="app.lab.test", timeout=30) as s:
        s.starttls(context=client_tls())
        s.login("app5", lab.passwords["app5"])
        s.sendmail("news@hooli.example", ["v6-sub@example.org"], make_message("news@hooli.example", "v6-sub@example.org"))
    got = sorted(r for msg in lab.sinks["hooli"].wait(2) for r in msg.rcpt_tos)
    assert got == ["v6-sub@example.org", "v6@example.org"]
    code, text, _ = m.send(m.signed("v4@example.org"), to="v4@example.org")
    assert (code, text.split(" ", 1)[0]) == (550, "5.7.1")
    milter_reject(lab, "5.7.1", r"client 127.0.0.1 is not allowed to relay.*rcpt=<v4=example.org@hooli.relay.test>")
    code, text, _ = submit(lab, "app5")
    assert (code, text.split(" ", 1)[0]) == (550, "5.7.1")
    assert len(lab.sinks["hooli"].messages) == 2


@pytest.mark.parametrize(
    "extra, code, dsn",
    [
        (tuple(("X-Flood", str(i)) for i in range(1500)), 552, "5.3.4"),
        ((("X-Note", "caf\u00e9"),), 550, "5.6.0"),
    ],
    ids=["1500 header fields", "raw 8-bit header"],
)
def test_submission_gets_the_same_structural_limits(lab, extra, code, dsn):
    got, text, _ = submit(lab, "app1", extra_headers=extra)
    assert (got, text.split(" ", 1)[0]) == (code, dsn), text
    milter_reject(lab, dsn, r"stage=eom .*tenant=acme")
    assert no_delivery(lab)


# -- inbound TLS --------------------------------------------------------------------


@pytest.mark.parametrize("port_name", ["smtp_port", "submission_port"])
def test_starttls_presents_the_configured_certificate(lab, port_name):
    want = x509.load_pem_x509_certificate(lab.relay_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    with smtplib.SMTP("127.0.0.1", getattr(lab, port_name), timeout=30) as s:
        s.starttls(context=client_tls())
        assert s.sock.getpeercert(binary_form=True) == want
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert re.search(r"TLS connection established from localhost\[127.0.0.1\]: TLSv1\.[23] with cipher", lab.maillog_text())


def test_old_tls_versions_are_refused(lab):
    import warnings

    ctx = client_tls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that it is the server, not our own OpenSSL, saying no
    before = lab.maillog_text().count("SSL_accept error from")
    with smtplib.SMTP("127.0.0.1", lab.submission_port, timeout=30) as s:
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionResetError)):
            s.starttls(context=ctx)
    wait_for(lambda: lab.maillog_text().count("SSL_accept error from") > before, 10, what="Postfix refusing TLS 1.1")


# -- outbound TLS per tenant -------------------------------------------------------


def test_encrypt_delivers_over_tls_to_an_unverifiable_smarthost(lab):
    assert submit(lab, "app2")[0] == 250
    [m] = lab.sinks["globex"].wait(1)
    assert m.tls and m.tls[1] in ("TLSv1.2", "TLSv1.3")
    port = lab.sinks["globex"].port
    assert f"Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:{port}" in lab.maillog_text()


def test_verify_with_the_wrong_certificate_defers_and_never_sends_in_clear(lab):
    code, text, _ = submit(lab, "app3", subject="must stay queued")
    assert code == 250, text
    qid = re.findall(r"(\w+): event=accepted tenant=initech", lab.milter_log_text())[-1]

    def deferred():
        return next((q for q in lab.queue() if q["queue_id"] == qid and q["recipients"][0].get("delay_reason")), None)

    entry = wait_for(deferred, 30, what="deferral of the initech message")
    reason = entry["recipients"][0]["delay_reason"]
    assert "certificate" in reason.lower(), reason
    assert re.search(rf"{qid}: to=<bob@example.org>, relay=127.0.0.1\[127.0.0.1\]:{lab.sinks['initech'].port}.*status=deferred", lab.maillog_text()) or \
        re.search(rf"{qid}: to=<bob@example.org>, relay=none.*status=deferred", lab.maillog_text())
    attempts = re.compile(rf"{qid}: to=<bob@example.org>, relay=.*status=deferred")
    tried = len(attempts.findall(lab.maillog_text()))
    lab.flush()  # retrying changes nothing: still queued, still nothing delivered
    wait_for(lambda: len(attempts.findall(lab.maillog_text())) > tried, 30, what=f"another delivery attempt for {qid}")
    assert deferred() is not None
    assert lab.sinks["initech"].messages == []
    assert "Server certificate not verified" in lab.maillog_text() or "certificate verification failed" in lab.maillog_text()
    # Leave the shared lab's queue as we found it.
    subprocess.run(["postsuper", "-c", str(lab.config_dir), "-d", qid], capture_output=True, check=True, timeout=30)
    wait_for(lambda: deferred() is None, 10, what=f"{qid} removed")


def test_local_users_cannot_inject_mail_with_sendmail(lab, tmp_path):
    """sendmail(1) mail skips smtpd and so the milter: only root may submit it
    (authorized_submit_users). Postfix lets a non-root user name a private config directory
    only if the default main.cf lists it, so a private mount namespace supplies that
    main.cf; the system's /etc/postfix is not touched."""
    etc = tmp_path / "etc-postfix"
    etc.mkdir()
    (etc / "main.cf").write_text(f"alternate_config_directories = {lab.config_dir}\ncompatibility_level = 3.6\n")
    os.chmod(tmp_path, 0o755)
    script = (
        f"mount --bind {etc} /etc/postfix && "
        f"exec runuser -u nobody -- /usr/sbin/sendmail -C {lab.config_dir} -f news@acme.example bob@example.org"
    )
    msg = make_message("news@acme.example", "bob@example.org", extra_headers=(("X-Relay-Route", "acme"),))
    before = {q["queue_id"] for q in lab.queue()}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], input=msg, capture_output=True, timeout=30)
    assert r.returncode != 0
    assert b"is not allowed to submit mail" in r.stderr or b"not authorized" in r.stderr, r.stderr
    assert {q["queue_id"] for q in lab.queue()} <= before and no_delivery(lab)


# -- secrets on disk ---------------------------------------------------------------


def test_smarthost_password_is_only_in_a_root_only_table(lab):
    # acme's transport class's table (postfix/classes.py), and postmap's .db of it.
    table = lab.config_dir / "relay" / "smtp_auth" / class_of((lab.config_dir / "relay" / "route").read_text(), "acme")
    db = table.with_name(table.name + ".db")
    for path in (table, db):
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), path
    assert table.parent.stat().st_mode & 0o777 == 0o700
    assert lab.smarthost_password in table.read_text()
    assert lab.smarthost_password.encode() in db.read_bytes()
    others = [p for p in lab.config_dir.rglob("*") if p.is_file() and p not in (table, db) and lab.smarthost_password.encode() in p.read_bytes()]
    assert others == []
    assert (lab.relay_key.stat().st_mode & 0o777) == 0o600
    assert os.stat(lab.secrets_file).st_mode & 0o777 == 0o600
