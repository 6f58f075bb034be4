"""Hostile input against the running relay: real Postfix, real milter, real DKIM.

One table. Every row is an attack and the exact answer it must get: the SMTP
code, the enhanced status code, where it is stopped (Postfix smtpd, Postfix
cleanup, or the milter at RCPT / end of message) and the log line that says
so. After every row: nothing was queued or delivered (an accepted message is
in the queue or at a sink from the moment the client sees 250, so no waiting
is needed) and the milter process is still alive. The last test shows the
relay still relays a good message. docs/security.md "Hostile input" is this
table in prose.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable
from unittest import mock

import dkim
import pytest

from conftest import ACME, Mailer
from relay_milter.config import load_settings
from relay_milter.lab import Lab, TenantSpec, ed25519_key, rsa_key, sign, wait_for
from support.factories import nested, wide
from support.labtenants import live_tenants

pytestmark = pytest.mark.e2e

Reply = tuple[int, str]
EDCO = dict(id="edco", relay_domain="edco.relay.test", signing_domain="hop.edco.test", selector="ed1", sender_domains=["edco.example"])
WEAK = dict(id="weak", relay_domain="weak.relay.test", signing_domain="hop.weak.test", selector="w1", sender_domains=["weak.example"])


@dataclass
class Kit:
    lab: Lab
    acme: Mailer
    globex: Mailer
    edco: Mailer
    weak: Mailer


# -- talking to the relay ---------------------------------------------------------


def submit(m: Mailer, raw: bytes, rcpts: list[str] | None = None, mail_from: str | None = None, options: tuple[str, ...] = ()) -> Reply:
    """One transaction. Returns the first refusal, else the reply to the data."""
    rcpts = rcpts or [m.rcpt("alice@example.org")]
    with smtplib.SMTP("127.0.0.1", m.lab.smtp_port, local_hostname="platform.lab.test", timeout=60) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(mail_from or f"news@{m.t['sender_domains'][0]}", list(options))
        if code != 250:
            return code, text.decode()
        replies = [smtp.rcpt(r) for r in rcpts]
        refused = [(c, t.decode()) for c, t in replies if c != 250]
        if len(refused) == len(rcpts):
            return refused[0]
        code, text = smtp.data(raw)
        return refused[0] if refused else (code, text.decode())


def dialog(lab: Lab, *commands: bytes) -> list[Reply]:
    """Byte-exact SMTP, for what smtplib will not send (CR, LF or NUL inside a command).

    A command with n line breaks in it is n + 1 commands to the server: that many replies are read.
    """
    with socket.create_connection(("127.0.0.1", lab.smtp_port), timeout=30) as s, s.makefile("rb") as f:

        def reply() -> Reply:
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return int(lines[0][:3]), " ".join(line[4:].decode(errors="replace").strip() for line in lines)

        replies = [reply()]
        for cmd in (b"EHLO platform.lab.test", *commands):
            s.sendall(cmd + b"\r\n")
            replies += [reply() for _ in range(len(re.findall(rb"\r\n|\n", cmd)) + 1)]
        with contextlib.suppress(OSError):  # smtpd may have hung up already (221 after an injected line)
            s.sendall(b"QUIT\r\n")
        return replies[2:]  # the banner and EHLO went fine or the lab is broken


def rcpt_probe(rcpt: str) -> Callable[[Kit], Reply]:
    """RCPT TO exactly as given (smtplib would re-quote a source route or an IP literal)."""
    return lambda k: dialog(k.lab, b"MAIL FROM:<news@acme.example>", f"RCPT TO:<{rcpt}>".encode())[1]


# -- building hostile messages ----------------------------------------------------


def resign(m: Mailer, raw: bytes, key=None, **tags: bytes) -> bytes:
    """Sign ``raw`` for the tenant; ``tags`` override or add signature tags (x=, a=, t=) before b= is computed."""
    original = dkim.DKIM.gen_header

    def gen_header(self, fields, *args, **kwargs):
        fields = [(k, tags.pop(k.decode(), v)) for k, v in fields]
        fields[-1:-1] = [(k.encode(), v) for k, v in tags.items()]
        return original(self, fields, *args, **kwargs)

    with mock.patch.object(dkim.DKIM, "gen_header", gen_header):
        return sign(raw, key or m.key, m.t["signing_domain"], m.t["selector"])


def with_header(m: Mailer, name: str, value: bytes) -> bytes:
    """A signed message with one extra (unsigned) header field, bytes as given."""
    head, body = m.message().split(b"\r\n\r\n", 1)
    return resign(m, head + b"\r\n" + name.encode() + b": " + value + b"\r\n\r\n" + body)


def with_headers(m: Mailer, fields: list[tuple[str, str]]) -> bytes:
    return m.signed(extra_headers=tuple(fields))


def mime_bomb(m: Mailer, depth: int, kind: str) -> bytes:
    content_type, body = wide(depth) if kind == "wide" else nested(depth, kind)
    head = m.message().split(b"\r\n\r\n", 1)[0].replace(b" text/plain; charset=utf-8", content_type.encode())
    return resign(m, head + b"\r\n\r\n" + body)


def edit(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert old in raw
    return raw.replace(old, new, 1)


def size_limit(k: Kit) -> int:
    return load_settings(k.lab.settings_file).message_size_limit


def oversize(k: Kit) -> Reply:
    line = b"x" * 998 + b"\r\n"
    return submit(k.acme, k.acme.message() + line * (size_limit(k) // len(line) + 1))


def thousand_and_one(k: Kit) -> Reply:
    rcpts = [k.acme.rcpt(f"user{i}@example.org") for i in range(1001)]
    return submit(k.acme, k.acme.signed(), rcpts=rcpts)


# -- the table --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    attack: Callable[[Kit], Reply]
    code: int
    dsn: str
    # smtpd: a Postfix "reject:" line with the code and dsn; smtpd*: another Postfix smtpd
    # log line (a warning, or the connection's command counts); milter rcpt / milter eom: the
    # milter's event=reject line; accepted: the milter's event=accepted line.
    where: str
    log: str  # regex for the rest of the log line
    delivered: tuple[str, ...] = ()  # recipients that must arrive exactly once, all at one sink
    sink: str = "acme"

    def log_pattern(self) -> str:
        if self.where.startswith("milter"):
            return rf"event=reject stage={self.where.split()[1]} code={self.code} dsn={re.escape(self.dsn)} reason=.*{self.log}"
        if self.where == "smtpd":
            return rf"NOQUEUE: reject: \w+ from \S+: {self.code} {re.escape(self.dsn)} {self.log}"
        if self.where == "smtpd*":
            return rf"postfix/smtpd\[\d+\]: {self.log}"
        return rf"event=accepted {self.log}"


A = ACME["relay_domain"]
ILLEGAL = r"warning: Illegal address syntax from \S+ in RCPT command: "
NON_SMTP = r"warning: non-SMTP command from \S+: Bcc: x@evil.example"  # the injected line; smtpd hangs up (221)
MALFORMED = ["alice@", "alice=@", "=example.org@", "alice=exa_mple.org@", "alice=example.org=@", "a..b=example.org@"]
CASES = [
    # open-relay probes: Postfix's reject_unauth_destination, then the milter's decoder
    Case("unknown-relay-domain", rcpt_probe("alice=example.org@unknown.relay.test"), 554, "5.7.1", "smtpd", "<alice=example.org@unknown.relay.test>: Relay access denied"),
    Case("plain-foreign-address", rcpt_probe("alice@example.org"), 554, "5.7.1", "smtpd", "<alice@example.org>: Relay access denied"),
    Case("user@other@domain", rcpt_probe(f"user@other.example@{A}"), 554, "5.7.1", "smtpd", "<user@other.example@acme.relay.test>: Relay access denied; .* to=<\"user@other.example\"@acme"),
    Case("encoded-then-@", rcpt_probe(f"alice=example.org@other.example@{A}"), 554, "5.7.1", "smtpd", "<alice=example.org@other.example@acme.relay.test>: Relay access denied; .* to=<\"alice=example.org@other.example\"@acme"),
    Case("percent-hack", rcpt_probe(f"alice%example.org@{A}"), 554, "5.7.1", "smtpd", "<alice%example.org@acme.relay.test>: Relay access denied"),
    Case("percent-in-encoding", rcpt_probe(f"alice=example.org%other.example@{A}"), 554, "5.7.1", "smtpd", "<alice=example.org%other.example@acme"),
    Case("bang-path", rcpt_probe(f"example.org!alice@{A}"), 554, "5.7.1", "smtpd", "<example.org!alice@acme.relay.test>: Relay access denied"),
    Case("bang-path-via-relay", rcpt_probe(f"{A}!alice@example.org"), 554, "5.7.1", "smtpd", "<acme.relay.test!alice@example.org>: Relay access denied"),
    Case("source-route", rcpt_probe(f"@{A}:alice@example.org"), 554, "5.7.1", "smtpd", "<alice@example.org>: Relay access denied"),
    Case("quoted-local-with-@", rcpt_probe(f'"alice@example.org"@{A}'), 554, "5.7.1", "smtpd", "<alice@example.org@acme.relay.test>: Relay access denied"),
    Case("quoted-encoded-local", rcpt_probe(f'"alice=example.org"@{A}'), 550, "5.1.3", "milter rcpt", "bad recipient address syntax: recipient contains forbidden character"),
    Case("ip-literal-remote", rcpt_probe("alice@[192.0.2.1]"), 554, "5.7.1", "smtpd", r"<alice@\[192.0.2.1\]>: Relay access denied"),
    Case("ip-literal-self", rcpt_probe("alice@[127.0.0.1]"), 550, "5.1.1", "smtpd", r"<alice@\[127.0.0.1\]>: Recipient address rejected: local delivery is disabled"),
    Case("ip-literal-encoded", rcpt_probe(f"alice=[192.0.2.1]@{A}"), 501, "5.1.3", "smtpd*", ILLEGAL + r"<alice=\[192.0.2.1\]@acme"),
    Case("ip-address-encoded", rcpt_probe(f"alice=192.0.2.1@{A}"), 550, "5.1.3", "milter rcpt", "bad recipient address syntax: encoded recipient domain looks like an IP address"),
    Case("encoded-back-to-relay", rcpt_probe(f"alice=globex.relay.test@{A}"), 550, "5.1.3", "milter rcpt", "encoded recipient points back at a relay domain"),
    *(
        Case(f"malformed-encoding[{r}]", rcpt_probe(r + A), 550, "5.1.3", "milter rcpt", "bad recipient address syntax")
        for r in MALFORMED
    ),
    # header injection through the encoded recipient (smtplib refuses to send these)
    Case("rcpt-crlf-injection", rcpt_probe(f"crlf=example.org\r\nBcc: x@evil.example@{A}"), 501, "5.1.3", "smtpd*", NON_SMTP),
    Case("rcpt-bare-lf-injection", rcpt_probe(f"lf=example.org\nBcc: x@evil.example@{A}"), 501, "5.1.3", "smtpd*", NON_SMTP),
    Case("rcpt-bare-cr-injection", rcpt_probe(f"cr=example.org\rBcc: x@evil.example@{A}"), 501, "5.1.3", "smtpd*", ILLEGAL + r"<cr=example.org\?Bcc"),
    Case("rcpt-nul", rcpt_probe(f"nul=exam\x00ple.org@{A}"), 501, "5.1.3", "smtpd*", r"disconnect from \S+ ehlo=1 mail=1 rcpt=0/1 quit=1"),
    Case("rcpt-8bit", rcpt_probe(f"alicé=example.org@{A}"), 550, "5.1.3", "milter rcpt", "bad recipient address syntax: recipient contains whitespace, control or non-ASCII"),
    # header block: 8-bit, size, count
    Case("header-utf8-raw", lambda k: submit(k.acme, with_header(k.acme, "X-Note", "Café".encode())), 550, "5.6.0", "milter eom", "header field X-Note contains raw non-ASCII"),
    Case("header-utf8-raw-smtputf8", lambda k: submit(k.acme, with_header(k.acme, "X-Note", "Café".encode()), options=("SMTPUTF8",)), 550, "5.6.0", "milter eom", "header field X-Note contains raw non-ASCII"),
    Case("header-invalid-utf8", lambda k: submit(k.acme, with_header(k.acme, "X-Note", b"Caf\xe9 \xff\xfe")), 550, "5.6.0", "milter eom", "header field X-Note contains bytes that are not valid UTF-8"),
    Case("header-1MB-line", lambda k: submit(k.acme, with_header(k.acme, "X-Long", b"a" * 1_000_000)), 550, "5.6.0", "milter eom", r"header field X-Long has a line of \d+ octets, more than 998"),
    Case("header-1MB-folded", lambda k: submit(k.acme, with_header(k.acme, "X-Long", b"\r\n\t".join([b"a" * 900] * 1111))), 552, "5.3.4", "milter eom", r"header field X-Long has \d+ octets, more than 32768"),
    Case("header-block-over-64k", lambda k: submit(k.acme, with_headers(k.acme, [(f"X-H{i}", "a" * 900) for i in range(80)])), 552, "5.3.4", "milter eom", "message header is larger than 65536 octets"),
    Case("10000-headers", lambda k: submit(k.acme, with_headers(k.acme, [(f"X-H{i}", "v") for i in range(10_000)])), 552, "5.3.4", "milter eom", r"message has 100\d\d header fields, more than the 1000"),
    Case("mime-bomb-multipart-5000", lambda k: submit(k.acme, mime_bomb(k.acme, 5000, "multipart")), 550, "5.6.0", "milter eom", "MIME parts are nested more than 20 deep"),
    Case("mime-bomb-rfc822-200", lambda k: submit(k.acme, mime_bomb(k.acme, 200, "rfc822")), 550, "5.6.0", "milter eom", "MIME parts are nested more than 20 deep"),
    Case("mime-bomb-5000-parts", lambda k: submit(k.acme, mime_bomb(k.acme, 5000, "wide")), 552, "5.3.4", "milter eom", "message has more than 1000 MIME parts"),
    # size and recipient count
    Case("size-declared-over-limit", lambda k: dialog(k.lab, b"MAIL FROM:<news@acme.example> SIZE=%d" % (size_limit(k) + 1))[0], 552, "5.3.4", "smtpd", "Message size exceeds fixed limit"),
    Case("size-actual-over-limit", oversize, 552, "5.3.4", "smtpd*", r"warning: \w+: queue file size limit exceeded"),
    Case("1001-recipients", thousand_and_one, 452, "4.5.3", "accepted", "tenant=acme .* rcpts=<user0@example.org>,<user1@example.org>,", delivered=tuple(f"user{i}@example.org" for i in range(1000))),
    # DKIM
    Case("unsigned", lambda k: submit(k.acme, k.acme.message()), 550, "5.7.20", "milter eom", "DKIM verification failed: message has no DKIM signature"),
    Case("signed-with-wrong-key", lambda k: submit(k.acme, k.acme.signed(key=k.globex.key)), 550, "5.7.20", "milter eom", "DKIM verification failed: signature did not verify"),
    Case("body-altered", lambda k: submit(k.acme, edit(k.acme.signed(), b"Hello from the platform.", b"Hello from a forger!!!!")), 550, "5.7.20", "milter eom", "DKIM verification failed: signature did not verify: body hash mismatch"),
    Case("signed-to-replaced", lambda k: submit(k.acme, edit(k.acme.signed(), b"To: alice@", b"To: mallory@")), 550, "5.7.20", "milter eom", "DKIM verification failed: signature did not verify: signed headers changed"),
    Case("signed-subject-replaced", lambda k: submit(k.acme, edit(k.acme.signed(subject="Invoice"), b"Subject: Invoice", b"Subject: Wire money")), 550, "5.7.20", "milter eom", "signed headers changed"),
    Case("duplicate-from-displayed", lambda k: submit(k.acme, b"From: CEO <ceo@evil.example>\r\n" + k.acme.signed()), 550, "5.6.0", "milter eom", "message has 2 from header fields"),
    Case("l=-body-with-appended-text", lambda k: submit(k.acme, sign(k.acme.message(), k.acme.key, ACME["signing_domain"], ACME["selector"], length=True) + b"Appended: pay here\r\n"), 550, "5.7.21", "milter eom", r"signature has a body length limit \(l=\)"),
    Case("expired-x=", lambda k: submit(k.acme, resign(k.acme, k.acme.message(), t=b"1700000000", x=b"1700003600")), 550, "5.7.21", "milter eom", r"signature has expired \(x=\)"),
    Case("weak-rsa-512", lambda k: submit(k.weak, k.weak.signed()), 550, "5.7.21", "milter eom", "key not acceptable"),
    Case("a=rsa-sha1", lambda k: submit(k.acme, resign(k.acme, k.acme.message(), key=replace(k.acme.key, algorithm="rsa-sha1"))), 550, "5.7.21", "milter eom", "signature algorithm a=rsa-sha1 is not accepted"),
    Case("a=ed25519-on-rsa-signature", lambda k: submit(k.acme, resign(k.acme, k.acme.message(), a=b"ed25519-sha256")), 550, "5.7.21", "milter eom", "signature algorithm a=ed25519-sha256 does not match the key type k=rsa"),
    Case("ed25519-passes", lambda k: submit(k.edco, k.edco.signed(to="carol@example.org"), rcpts=[k.edco.rcpt("carol@example.org")]), 250, "2.0.0", "accepted", 'tenant=edco .* dkim="pass d=hop.edco.test s=ed1 a=ed25519-sha256', delivered=("carol@example.org",), sink="edco"),
    # cross-tenant spoofing with valid signatures
    Case("globex-signature-to-acme", lambda k: submit(k.acme, k.globex.signed(sender="news@acme.example")), 550, "5.7.21", "milter eom", "DKIM verification failed: no signature by d=hop.acme.test s=r2026 .*belongs to another tenant"),
    Case("acme-signature-to-globex", lambda k: submit(k.globex, k.acme.signed(sender="news@globex.example"), rcpts=[k.globex.rcpt("bob@example.org")]), 550, "5.7.21", "milter eom", "no signature by d=hop.globex.test s=g1 .*belongs to another tenant"),
    Case("acme-signed-globex-from", lambda k: submit(k.acme, k.acme.signed(sender="news@globex.example")), 550, "5.7.1", "milter eom", "From address news@globex.example is not allowed for this tenant"),
    Case("both-signatures-globex-from", lambda k: submit(k.acme, resign(k.acme, k.globex.signed(sender="news@globex.example"))), 550, "5.7.1", "milter eom", "From address news@globex.example is not allowed"),
    Case("foreign-from", lambda k: submit(k.acme, k.acme.signed(sender="ceo@evil.example")), 550, "5.7.1", "milter eom", "From address ceo@evil.example is not allowed"),
    Case("globex-envelope-sender-at-acme", lambda k: submit(k.acme, k.acme.signed(), mail_from="news@globex.example"), 550, "5.7.1", "milter rcpt", "envelope sender news@globex.example is not allowed for this tenant"),
]


# -- running it -------------------------------------------------------------------


@pytest.fixture(scope="module")
def extra_tenants(lab):
    """Two more tenants on the shared lab for the key cases: ed25519 (must pass) and a 512-bit RSA key."""
    keys = {"edco": ed25519_key(), "weak": rsa_key(512)}
    with live_tenants(lab, *(TenantSpec(**t, key=keys[t["id"]]) for t in (EDCO, WEAK))):
        yield keys


@pytest.fixture
def kit(lab, acme, globex, extra_tenants):
    return Kit(lab, acme, globex, Mailer(lab, EDCO, extra_tenants["edco"]), Mailer(lab, WEAK, extra_tenants["weak"]))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(kit, case):
    lab = kit.lab
    logs_before = len(lab.milter_log_text()), len(lab.maillog_text())
    code, text = case.attack(kit)
    assert (code, text.split(" ", 1)[0]) == (case.code, case.dsn), text
    pattern = case.log_pattern()
    wait_for(
        lambda: re.search(pattern, lab.milter_log_text()[logs_before[0]:] + lab.maillog_text()[logs_before[1]:]),
        10, what=f"log line {pattern}",
    )
    if case.delivered:
        sink = lab.sinks[case.sink]
        wait_for(lambda: sum(len(m.rcpt_tos) for m in sink.messages) >= len(case.delivered), 60, what="deliveries")
        wait_for(lambda: lab.queue() == [], 30, what="empty queue")
        assert Counter(r for m in sink.messages for r in m.rcpt_tos) == Counter(case.delivered)
        assert all(not s.messages for s in lab.sinks.values() if s is not sink)
    else:
        assert lab.queue() == []
        assert all(not s.messages for s in lab.sinks.values())
    assert lab.milter_proc.poll() is None


def test_relay_still_relays_after_the_hostile_table(acme, lab):
    milter = lab.milter_proc
    assert submit(acme, acme.signed(subject="after the storm"))[0] == 250
    [got] = lab.sinks["acme"].wait(1)
    assert got.header("Subject") == ["after the storm"]
    assert lab.milter_proc is milter and milter.poll() is None
