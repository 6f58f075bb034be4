"""Hostile routing and SMTP edge cases against a real relay (issue 11, findings 1 and 8).

Its own lab: acme and globex, and tlsco, a tenant that requires TLS on the signed hop.
Every test sends real signed mail through the private Postfix and the real milter and
checks where it arrived (or that it was refused, with which reply), then, where nothing
must happen, sends a later marker message and waits for it before asserting that nothing
else arrived.

- A route marker hidden in a MIME part, a nested part or an attached message never routes,
  not even after ``postsuper -r`` (cleanup runs again): the mail goes to the sending
  tenant's smarthost. A marker injected without the milter's seal routes nowhere.
- ``<LF>.<LF>`` does not end the data (no SMTP smuggling); tlsco's mail needs STARTTLS;
  NOTIFY=/ORCPT= reach the decoded recipient; refusals of another tenant's recipients
  do not end the session; a subdomain of a relay domain gets a permanent 5xx; a
  relay-domain address in To: with a trailing dot is decoded; a 19 MiB message passes.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess

import pytest

from relay_milter.core import route
from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for

pytestmark = pytest.mark.e2e

ACME = dict(id="acme", relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="a1", sender_domains=["acme.example"])
GLOBEX = dict(id="globex", relay_domain="globex.relay.test", signing_domain="hop.globex.test", selector="g1", sender_domains=["globex.example"])
TLSCO = dict(id="tlsco", relay_domain="tlsco.relay.test", signing_domain="hop.tlsco.test", selector="t1", sender_domains=["tlsco.example"])
SPECS = {t["id"]: t for t in (ACME, GLOBEX, TLSCO)}
SIGNED = ("from", "to", "subject", "date", "message-id", "mime-version", "content-type")


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    lab.keys = {tid: rsa_key(2048) for tid in SPECS}
    for tid, spec in SPECS.items():
        extra = {"require_tls": True} if tid == "tlsco" else {}
        lab.add_tenant(TenantSpec(**spec, key=lab.keys[tid], extra=extra), Sink(tid))
    try:
        lab.start()
        yield lab
    finally:
        if os.environ.get("RELAY_KEEP_LAB"):
            print(f"\nlab kept at {lab.base}")
            lab.stop()
        else:
            lab.destroy()


@pytest.fixture
def rlab(lab):
    """The lab with empty sinks that answer 250 and an empty queue."""
    for sink in lab.sinks.values():
        with sink.lock:
            sink.messages.clear()
        sink.reply = "250 2.0.0 Ok: queued"
    yield lab
    for sink in lab.sinks.values():
        sink.reply = "250 2.0.0 Ok: queued"
    leftovers = [q["queue_id"] for q in lab.queue()]
    if leftovers:
        subprocess.run(["postsuper", "-c", str(lab.config_dir), "-d", "-"], input="\n".join(leftovers) + "\n", text=True, capture_output=True, timeout=30)


# -- helpers -----------------------------------------------------------------------


def sender_of(tid: str) -> str:
    return f"news@{SPECS[tid]['sender_domains'][0]}"


def rcpt(tid: str, address: str = "alice@example.org") -> str:
    return encode_recipient(address, SPECS[tid]["relay_domain"])


def signed(lab: Lab, tid: str, raw: bytes) -> bytes:
    spec = SPECS[tid]
    return sign(raw, lab.keys[tid], spec["signing_domain"], spec["selector"], headers=SIGNED)


def message_id(raw: bytes) -> str:
    return re.search(rb"^Message-ID: (<[^>]+>)", raw, re.M | re.I).group(1).decode()


def send(lab: Lab, raw: bytes, mail_from: str, rcpts: list[str], rcpt_options=(), starttls=False) -> tuple[int, str, list[tuple[int, str]]]:
    """One transaction: (code, text) of the DATA reply (or of the first refusal if all were
    refused) and the replies to every RCPT."""
    with smtplib.SMTP("127.0.0.1", lab.smtp_port, local_hostname="platform.lab.test", timeout=120) as smtp:
        smtp.ehlo()
        if starttls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            smtp.starttls(context=ctx)
            smtp.ehlo()
        code, text = smtp.mail(mail_from)
        assert code == 250, text
        replies = [(c, t.decode()) for c, t in (smtp.rcpt(r, list(rcpt_options)) for r in rcpts)]
        if all(c != 250 for c, _ in replies):
            return replies[0][0], replies[0][1], replies
        code, text = smtp.data(raw)
        return code, text.decode(), replies


def queue_id(reply_text: str) -> str:
    return re.search(r"queued as (\w+)", reply_text).group(1)


def arrived(lab: Lab, tid: str, mid: str):
    return [m for m in lab.sinks[tid].messages if mid in " ".join(m.header("Message-ID"))]


def marker_delivered(lab: Lab, tid: str = "acme") -> None:
    """Send a plain good message and wait for it: what was sent before it has been handled."""
    raw = signed(lab, tid, make_message(sender_of(tid), "marker@example.org", subject="marker"))
    code, text, _ = send(lab, raw, sender_of(tid), [rcpt(tid, "marker@example.org")])
    assert code == 250, text
    wait_for(lambda: arrived(lab, tid, message_id(raw)), 60, what=f"marker at {tid}")


def maillog_after(lab: Lab, mark: int) -> str:
    return lab.maillog_text()[mark:]


def requeue_all(lab: Lab) -> None:
    """What an operator does: postsuper -r ALL (then wake pickup instead of waiting 60 s)."""
    subprocess.run(["postsuper", "-c", str(lab.config_dir), "-r", "ALL"], check=True, capture_output=True, timeout=30)
    subprocess.run(["postkick", "-c", str(lab.config_dir), "public", "pickup", "W"], check=True, capture_output=True, timeout=30)


# -- finding 1: route markers hidden in the body, and requeue --------------------------


def globex_seal(lab: Lab) -> str:
    """globex's real seal, as if it had leaked: computed from the lab relay's own key."""
    key = route.parse_route_key((lab.config_dir / "relay" / "requeue" / "route.key").read_text())
    return route.tenant_seal(key, "globex")


def hidden_fields(lab: Lab) -> bytes:
    """globex's marker and real seal spelled exactly as the route tables' keys are
    (no space after the colon: the tables are exact-match, docs/scale.md)."""
    return f"X-Relay-Route:globex\r\nX-Relay-Route-Seal:{globex_seal(lab)}\r\n".encode()


def multipart(sender: str, to: str, body: bytes, subject: str, extra: bytes = b"") -> bytes:
    head = make_message(sender, to, subject=subject).split(b"\r\n\r\n", 1)[0]
    head = head.replace(b"Content-Type: text/plain; charset=utf-8", b'Content-Type: multipart/mixed; boundary="outer"')
    return head + b"\r\n" + extra + b"\r\n" + body


def hidden(where: str, inner: bytes) -> tuple[bytes, bytes]:
    """(extra top-level header fields, body) with the globex marker and seal ``where``."""
    if where == "top-level":
        return inner, b"--outer\r\nContent-Type: text/plain\r\n\r\nhello\r\n--outer--\r\n"
    if where == "mime-part":
        return b"", b"--outer\r\nContent-Type: text/plain\r\n" + inner + b"\r\nhello\r\n--outer--\r\n"
    if where == "nested-mime-part":
        return b"", (
            b'--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
            b"--inner\r\nContent-Type: text/plain\r\n" + inner + b"\r\nhello\r\n--inner--\r\n--outer--\r\n"
        )
    assert where == "attached-message"
    return b"", (
        b"--outer\r\nContent-Type: text/plain\r\n\r\nsee the attachment\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: boss@globex.example\r\nTo: bob@example.org\r\nSubject: inner\r\n" + inner + b"\r\ninner body\r\n--outer--\r\n"
    )


@pytest.mark.parametrize("where", ["mime-part", "nested-mime-part", "attached-message", "top-level"])
def test_hidden_route_marker_never_routes_even_after_postsuper_requeue(rlab, where):
    """acme's message carries globex's marker and globex's real seal (leaked, say) in a MIME
    part, a nested part, an attached message, or at the top level. acme's smarthost defers
    it (451), an operator runs postsuper -r ALL, and it goes through cleanup again: it is
    delivered to acme's smarthost, never globex's."""
    lab = rlab
    inner = hidden_fields(lab)
    extra, body = hidden(where, inner)
    raw = signed(lab, "acme", multipart(sender_of("acme"), "alice@example.org", body, f"hidden marker: {where}", extra))
    mid = message_id(raw)
    lab.sinks["acme"].reply = "451 4.3.0 try later"
    mark = len(lab.maillog_text())
    code, text, _ = send(lab, raw, sender_of("acme"), [rcpt("acme")])
    assert code == 250, text
    qid = queue_id(text)
    # Accepted for acme and deferred by acme's smarthost (451): the hidden marker did nothing.
    wait_for(lambda: re.search(rf"{qid}: to=<alice@example.org>, relay=127.0.0.1\[127.0.0.1\]:{lab.sinks['acme'].port}, .*status=deferred", maillog_after(lab, mark)), 60, what="deferral by acme's smarthost")
    queued = postcat_headers(lab, qid)
    assert re.findall(r"^X-Relay-Route(?:-Seal)?:.*$", queued, re.M) == ["X-Relay-Route:acme", f"X-Relay-Route-Seal:{route.tenant_seal(route.parse_route_key((lab.config_dir / 'relay' / 'requeue' / 'route.key').read_text()), 'acme')}"]
    lab.sinks["acme"].reply = "250 2.0.0 Ok: queued"
    requeue_all(lab)
    [got] = wait_for(lambda: arrived(lab, "acme", mid), 60, what="requeued message at acme")
    # postsuper -r sent it through pickup and cleanup again, where the seal routed it.
    new = wait_for(lambda: re.search(rf"(\w+): .*orig_id={qid}", maillog_after(lab, mark)), 10, what="pickup's orig_id line")
    routed = wait_for(lambda: re.findall(rf"{new.group(1)}: filter: header X-Relay-Route-Seal:(\w+)\.[0-9a-f]{{40}} from \S+; .*: (rc_\w+:\S+)$", maillog_after(lab, mark), re.M), 10, what="cleanup's filter line")
    acme_route = re.search(r"^X-Relay-Route:acme\tFILTER (\S+)$", (lab.config_dir / "relay" / "route").read_text(), re.M).group(1)
    assert routed == [("acme", acme_route)]
    assert got.rcpt_tos == ["alice@example.org"]
    assert got.header("X-Relay-Route") == [] and got.header("X-Relay-Route-Seal") == []
    marker_delivered(lab, "globex")
    assert arrived(lab, "globex", mid) == []


def postcat_headers(lab: Lab, qid: str) -> str:
    return subprocess.run(["postcat", "-c", str(lab.config_dir), "-hq", qid], capture_output=True, text=True, check=True, timeout=30).stdout


def sendmail(lab: Lab, raw: bytes, mail_from: str, to: str) -> None:
    """Root's sendmail(1): the only other way into pickup, and the path postsuper -r takes."""
    subprocess.run(["/usr/sbin/sendmail", "-C", str(lab.config_dir), "-f", mail_from, to], input=raw, check=True, capture_output=True, timeout=30)


def test_marker_without_the_seal_routes_nowhere(rlab):
    """Mail that reaches cleanup_requeue without a seal made with the relay's key has no
    route: it waits on the deferred "unrouted" transport. Before the seal, a top-level
    "X-Relay-Route: globex" was enough there."""
    lab = rlab
    mark = len(lab.maillog_text())
    other_key_seal = route.tenant_seal(b"k" * 32, "globex")
    # Both spellings: with a space after the colon, and exactly as the table keys are.
    forged = {
        "marker alone": b"X-Relay-Route: globex\r\n",
        "marker alone, table spelling": b"X-Relay-Route:globex\r\n",
        "seal made with another key": f"X-Relay-Route: globex\r\nX-Relay-Route-Seal: {other_key_seal}\r\n".encode(),
        "seal made with another key, table spelling": f"X-Relay-Route:globex\r\nX-Relay-Route-Seal:{other_key_seal}\r\n".encode(),
    }
    for subject, fields in forged.items():
        sendmail(lab, fields + make_message(sender_of("acme"), "carol@example.org", subject=subject), sender_of("acme"), "carol@example.org")

    def unrouted():
        waiting = [q for q in lab.queue() if q["recipients"][0]["address"] == "carol@example.org"]
        return len(waiting) == len(forged) and all("deferred transport" in q["recipients"][0].get("delay_reason", "") for q in waiting) and waiting

    waiting = wait_for(unrouted, 60, what=f"{len(forged)} messages waiting on the unrouted transport")
    lab.flush()
    marker_delivered(lab, "globex")  # a later message, delivered: the log is written up to it
    assert not any(m.rcpt_tos == ["carol@example.org"] for s in lab.sinks.values() for m in s.messages)
    for q in waiting:
        assert re.search(rf"{q['queue_id']}: to=<carol@example.org>, .*status=deferred \(deferred transport\)", maillog_after(lab, mark))
        assert not re.search(rf"{q['queue_id']}: (milter-header-)?filter:", maillog_after(lab, mark))


# -- finding 8: SMTP edge cases ----------------------------------------------------


def test_bare_lf_dot_lf_does_not_end_the_data(rlab):
    """SMTP smuggling: <LF>.<LF> inside the data followed by a second transaction. With
    smtpd_forbid_bare_newline the server waits for <CR><LF>.<CR><LF>: the smuggled
    commands are message content, never a second message."""
    lab = rlab
    outer = signed(lab, "acme", make_message(sender_of("acme"), "alice@example.org", subject="outer"))
    smuggled = signed(lab, "acme", make_message(sender_of("acme"), "smuggled@example.org", subject="smuggled"))
    payload = (
        outer
        + b"\n.\nMAIL FROM:<" + sender_of("acme").encode() + b">\nRCPT TO:<" + rcpt("acme", "smuggled@example.org").encode()
        + b">\nDATA\n" + smuggled.replace(b"\r\n", b"\n") + b"\n.\n"
    )
    with socket.create_connection(("127.0.0.1", lab.smtp_port), timeout=60) as s, s.makefile("rb") as f:
        def reply() -> bytes:
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return b"".join(lines)

        reply()
        for cmd in (b"EHLO platform.lab.test", b"MAIL FROM:<" + sender_of("acme").encode() + b">", b"RCPT TO:<" + rcpt("acme").encode() + b">", b"DATA"):
            s.sendall(cmd + b"\r\n")
            assert reply()[:1] in (b"2", b"3")
        s.sendall(payload + b"\r\n.\r\n")
        final = reply()
        s.sendall(b"QUIT\r\n")
        assert reply().startswith(b"221"), "exactly one reply to the data: nothing was read as commands"
    # The smuggled text became part of the outer body, which then failed its signature.
    assert final.startswith(b"550 5.7.20"), final
    marker_delivered(lab)
    assert not any("smuggled@example.org" in m.rcpt_tos for s in lab.sinks.values() for m in s.messages)
    assert not any(m.rcpt_tos == ["alice@example.org"] for s in lab.sinks.values() for m in s.messages)


def test_require_tls_tenant_refuses_plaintext_and_accepts_starttls(rlab):
    lab = rlab
    raw = signed(lab, "tlsco", make_message(sender_of("tlsco"), "alice@example.org", subject="needs tls"))
    milter_mark = len(lab.milter_log_text())
    code, text, _ = send(lab, raw, sender_of("tlsco"), [rcpt("tlsco")])
    assert (code, text.split(" ", 1)[0]) == (530, "5.7.0"), text
    assert "Must issue a STARTTLS command first" in text
    wait_for(lambda: re.search(r"event=reject stage=rcpt code=530 dsn=5.7.0 .*rcpt=<alice=example.org@tlsco.relay.test>", lab.milter_log_text()[milter_mark:]), 10, what="the milter's reject line")
    code, text, _ = send(lab, raw, sender_of("tlsco"), [rcpt("tlsco")], starttls=True)
    assert code == 250, text
    [got] = wait_for(lambda: arrived(lab, "tlsco", message_id(raw)), 60, what="tlsco delivery over TLS")
    assert got.rcpt_tos == ["alice@example.org"]
    # Other tenants are not affected: acme still accepts plaintext.
    marker_delivered(lab, "acme")
    assert len(lab.sinks["tlsco"].messages) == 1


def test_notify_and_orcpt_reach_the_decoded_recipient(rlab):
    """NOTIFY=SUCCESS asks for a delivery report. The smarthost does not speak DSN, so
    Postfix reports "relayed" to the envelope sender (through the tenant's own smarthost,
    transport_maps) and names the original recipient: the decoded address."""
    lab = rlab
    raw = signed(lab, "acme", make_message(sender_of("acme"), "alice@example.org", subject="dsn please"))
    encoded = rcpt("acme")
    code, text, _ = send(lab, raw, sender_of("acme"), [encoded], rcpt_options=("NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{encoded}"))
    assert code == 250, text
    sink = lab.sinks["acme"]
    wait_for(lambda: arrived(lab, "acme", message_id(raw)), 60, what="delivery")
    report = wait_for(lambda: [m for m in sink.messages if m.rcpt_tos == [sender_of("acme")]], 60, what="success DSN to the sender")[0]
    content = report.content.decode(errors="replace")
    assert re.search(r"^Action: relayed", content, re.M), content
    assert re.search(r"^Original-Recipient: rfc822; ?alice@example.org", content, re.M | re.I), content
    assert re.search(r"^Final-Recipient: rfc822; ?alice@example.org", content, re.M | re.I), content


def test_refusals_for_another_tenant_do_not_end_the_session(rlab):
    """60 recipients alternating between acme and globex: the 30 of globex get 452 (one
    tenant per transaction); the transaction goes on and acme's 30 are delivered."""
    lab = rlab
    addresses = [f"user{i}@example.org" for i in range(60)]
    rcpts = [rcpt("acme" if i % 2 == 0 else "globex", a) for i, a in enumerate(addresses)]
    # To names acme's recipients, as a platform's message would (and signature-to-recipient
    # binding, where the tenant does not allow Bcc-style sending, asks for).
    raw = signed(lab, "acme", make_message(sender_of("acme"), ", ".join(addresses[::2]), subject="mixed tenants"))
    code, text, replies = send(lab, raw, sender_of("acme"), rcpts)
    assert code == 250, text
    assert [c for c, _ in replies[::2]] == [250] * 30
    assert {(c, t.split(" ", 1)[0]) for c, t in replies[1::2]} == {(452, "4.5.3")}
    [got] = wait_for(lambda: arrived(lab, "acme", message_id(raw)), 60, what="delivery")
    assert sorted(got.rcpt_tos) == sorted(addresses[::2])
    assert lab.sinks["globex"].messages == []


def test_subdomain_of_a_relay_domain_is_refused_permanently(rlab):
    lab = rlab
    raw = signed(lab, "acme", make_message(sender_of("acme"), "alice@example.org", subject="subdomain"))
    mark = len(lab.maillog_text())
    code, text, _ = send(lab, raw, sender_of("acme"), ["alice=example.org@x.acme.relay.test"])
    assert (code, text.split(" ", 1)[0]) == (554, "5.7.1"), text
    # postlogd writes the log asynchronously: wait for the line.
    wait_for(lambda: re.search(r"NOQUEUE: reject: RCPT from \S+: 554 5.7.1 <alice=example.org@x.acme.relay.test>: Relay access denied", maillog_after(lab, mark)), 10, what="Postfix's reject line")
    marker_delivered(lab)
    assert not any(m.rcpt_tos == ["alice@example.org"] for s in lab.sinks.values() for m in s.messages)


def test_trailing_dot_relay_address_in_to_is_decoded(rlab):
    lab = rlab
    raw = signed(lab, "acme", make_message(sender_of("acme"), "Alice <alice=example.org@acme.relay.test.>", subject="trailing dot"))
    code, text, _ = send(lab, raw, sender_of("acme"), [rcpt("acme")])
    assert code == 250, text
    [got] = wait_for(lambda: arrived(lab, "acme", message_id(raw)), 60, what="delivery")
    assert got.header("To") == ["Alice <alice@example.org>"]


def test_a_19_mib_message_passes_intact(rlab):
    """The milter spools a large body to a temporary file as it arrives; the message is
    verified and delivered byte for byte."""
    lab = rlab
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-" * 13 + b"\r\n"
    body = line * (19 * 1024 * 1024 // len(line))
    raw = signed(lab, "acme", make_message(sender_of("acme"), "alice@example.org", subject="big", body=body.decode()))
    code, text, _ = send(lab, raw, sender_of("acme"), [rcpt("acme")])
    assert code == 250, text
    [got] = wait_for(lambda: arrived(lab, "acme", message_id(raw)), 120, what="delivery")
    assert got.content.replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))
