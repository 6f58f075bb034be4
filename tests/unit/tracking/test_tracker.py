"""The tracker against real-format log lines in temp files and the real SQLite event store.

No Postfix needed. The clock is injected, so record_wait and next-retry freshness are
deterministic. The key property, checked over every cut point of a scripted log: a tracker
restarted anywhere records exactly the events of one uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from relay_milter.config import Settings, Tenant, TenantSet
from relay_milter.tracking.store import open_store
from relay_milter.tracking.events import Kind
from relay_milter.logs import logfmt_value
from relay_milter.tracking.service import main_loop
from relay_milter.tracking.tracker import STREAM_MAILLOG, Tracker

UTC = timezone.utc
T0 = datetime(2026, 11, 25, 8, 19, 50, tzinfo=UTC).timestamp()
NODE = "relay1"


# -- real-format lines ------------------------------------------------------------------


def pf(ts: float, service: str, pid: int, msg: str) -> str:
    """A line as Postfix's maillog_file writes it."""
    d = datetime.fromtimestamp(ts, UTC)
    return f"{d:%b} {d.day:2d} {d:%H:%M:%S} relay postfix/{service}[{pid}]: {msg}"


def ml(ts: float, qid: str, event: str, level: str = "INFO", **fields: str | None) -> str:
    """A line as the milter's logs.event writes it."""
    d = datetime.fromtimestamp(ts, UTC)
    parts = [f"event={event}"] + [f"{k}={logfmt_value(v)}" for k, v in fields.items() if v]
    return f"{d:%Y-%m-%dT%H:%M:%S+0000} relay.milter[3344]: {level} {qid}: {' '.join(parts)}"


def encoded(rcpt: str, tenant: str) -> str:
    local, _, domain = rcpt.partition("@")
    return f"{local}={domain}@{tenant}.relay.test"


@dataclass
class Msg:
    """One upstream message's lines (the lab's real shapes), to script scenarios."""

    qid: str
    tenant: str
    rcpts: list[str]
    ts: float = T0
    upstream_id: str | None = None
    smtp_pid: int = 3500

    @property
    def sender(self) -> str:
        return f"news@{self.tenant}.example"

    @property
    def message_id(self) -> str:
        return f"<{self.qid.lower()}@platform.example>"

    def milter(self, ts: float | None = None) -> tuple[str, str]:
        return "milter", ml(
            ts or self.ts, self.qid, "accepted", tenant=self.tenant, route=f"relay_{self.tenant}:[127.0.0.1]:2525",
            client="127.0.0.1", sender=self.sender, header_from=self.sender, message_id=self.message_id,
            upstream_id=self.upstream_id, rcpts=",".join(f"<{r}>" for r in self.rcpts),
            orig_rcpts=",".join(f"<{encoded(r, self.tenant)}>" for r in self.rcpts),
        )

    def ingress(self, ts: float | None = None) -> list[tuple[str, str]]:
        t = ts or self.ts
        return [
            ("maillog", pf(t, "smtpd", 3495, f"{self.qid}: client=localhost[127.0.0.1]")),
            ("maillog", pf(t, "cleanup", 3499, f"{self.qid}: message-id={self.message_id}")),
            ("maillog", pf(t, "cleanup", 3499, f"{self.qid}: milter-header-filter: header X-Relay-Route: {self.tenant} from localhost[127.0.0.1]; from=<{self.sender}> to=<{encoded(self.rcpts[0], self.tenant)}> proto=ESMTP helo=<platform.lab.test>: relay_{self.tenant}:[127.0.0.1]:2525")),
        ]

    def queued(self, ts: float | None = None) -> tuple[str, str]:
        return "maillog", pf(ts or self.ts, "qmgr", 3493, f"{self.qid}: from=<{self.sender}>, size=1091, nrcpt={len(self.rcpts) + 1} (queue active)")

    def tls(self, ts: float | None = None) -> tuple[str, str]:
        return "maillog", pf(ts or self.ts, f"relay_{self.tenant}/smtp", self.smtp_pid, "Verified TLS connection established to 127.0.0.1[127.0.0.1]:2525: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256")

    def delivery(self, rcpt: str, status: str, ts: float | None = None) -> tuple[str, str]:
        text = {
            "sent": "250 2.0.0 Ok: queued",
            "deferred": "host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command)",
            "bounced": "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to end of DATA command)",
        }[status]
        dsn = {"sent": "2.0.0", "deferred": "4.3.0", "bounced": "5.1.1"}[status]
        return "maillog", pf(ts or self.ts, f"relay_{self.tenant}/smtp", self.smtp_pid, f"{self.qid}: to=<{rcpt}>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.03, delays=0.01/0.01/0/0, dsn={dsn}, status={status} ({text})")

    def removed(self, ts: float | None = None) -> tuple[str, str]:
        return "maillog", pf(ts or self.ts, "qmgr", 3493, f"{self.qid}: removed")

    def expired(self, ts: float | None = None) -> tuple[str, str]:
        return "maillog", pf(ts or self.ts, "qmgr", 3493, f"{self.qid}: from=<{self.sender}>, status=expired, returned to sender")


def bounce_notice(parent: Msg, qid: str, ts: float) -> list[tuple[str, str]]:
    """The relay's own non-delivery notification (from=<>, no smtpd client): not tenant mail."""
    return [
        ("maillog", pf(ts, "cleanup", 3499, f"{qid}: message-id=<20261125081953.{qid}@relay.lab.test>")),
        ("maillog", pf(ts, "bounce", 3530, f"{parent.qid}: sender non-delivery notification: {qid}")),
        ("maillog", pf(ts, "qmgr", 3493, f"{qid}: from=<>, size=2540, nrcpt=1 (queue active)")),
        ("maillog", pf(ts, f"relay_{parent.tenant}/smtp", parent.smtp_pid, f"{qid}: to=<{parent.sender}>, relay=127.0.0.1[127.0.0.1]:2525, delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)")),
        ("maillog", pf(ts, "qmgr", 3493, f"{qid}: removed")),
    ]


EOM_REJECT = [
    ("maillog", pf(T0 + 7, "smtpd", 3497, "AC41D16038F: client=localhost[127.0.0.1]")),
    ("maillog", pf(T0 + 7, "cleanup", 3499, "AC41D16038F: message-id=<1795594797696764892.3070@platform.example>")),
    ("milter", '2026-11-25T08:19:57+0000 relay.milter[3344]: WARNING AC41D16038F: event=reject stage=eom code=550 dsn=5.7.20 reason="DKIM verification failed: signature did not verify: signed headers changed, or signed with another key" client=127.0.0.1 tenant=globex sender=news@globex.example header_from=news@globex.example message_id=<1795594797696764892.3070@platform.example>'),
    ("maillog", pf(T0 + 7, "cleanup", 3499, "AC41D16038F: milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 5.7.20 DKIM verification failed: signature did not verify: signed headers changed, or signed with another key; from=<news@globex.example> to=<dave=example.org@globex.relay.test> proto=ESMTP helo=<platform.lab.test>")),
]
NOQUEUE_REJECT = ("maillog", pf(T0 + 7, "smtpd", 3495, "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 <a@other.example>: Relay access denied; from=<x@evil.example> to=<a@other.example> proto=ESMTP helo=<platform.lab.test>"))


# -- fixtures ---------------------------------------------------------------------------


def make_tenant(tid: str, tls: str, webhook: bool = False) -> Tenant:
    return Tenant(
        id=tid,
        relay_domain=f"{tid}.relay.test",
        signing_domain=f"hop.{tid}.test",
        selector="s1",
        allowed_sender_domains=[f"{tid}.example"],
        smarthost={"host": "127.0.0.1", "port": 2525, "tls": tls},
        webhook={"url": f"https://hooks.example/{tid}"} if webhook else None,
    )


TENANTS = TenantSet((make_tenant("acme", "verify", webhook=True), make_tenant("globex", "may")), {})


@dataclass
class Env:
    dir: Path
    now: float = T0 + 1
    record_wait: float = 10.0
    trackers: list[Tracker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.maillog = self.dir / "maillog"
        self.milter_log = self.dir / "milter.log"
        self.queue = self.dir / "queue"
        self.settings = Settings(
            maillog_file=str(self.maillog),
            queue_directory=self.queue,
            tracking={"milter_log_file": str(self.milter_log), "node": NODE, "record_wait": self.record_wait},
        )
        self.store = open_store(f"sqlite:///{self.dir}/events.db")
        self.maillog.touch()
        self.milter_log.touch()

    def write(self, entries, partial: str | None = None) -> None:
        for stream, line in entries:
            with open(self.maillog if stream == "maillog" else self.milter_log, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def tracker(self, **kw) -> Tracker:
        kw.setdefault("from_start", True)
        t = Tracker(self.settings, TENANTS, self.store, clock=lambda: self.now, tz=UTC, **kw)
        self.trackers.append(t)
        return t

    def run(self, **kw) -> int:
        """A fresh tracker (as after a restart) processes what is there."""
        t = self.tracker(**kw)
        try:
            return t.run_once()
        finally:
            t.close()

    def events(self):
        return self.store.events()

    def summary(self):
        return [(e.kind.value, e.queue_id, e.recipient) for e in self.events()]

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.store.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


def comparable(events) -> list[dict]:
    out = []
    for ev in events:
        data = ev.to_json()
        data.pop("id")
        out.append(data)
    return out


# -- outcomes ---------------------------------------------------------------------------


def test_relayed_with_verified_tls_and_webhook_row(env):
    m = Msg("89037160377", "acme", ["alice@example.org"], upstream_id="job-42")
    env.write([m.milter(), *m.ingress(), m.queued(), m.tls(), m.delivery("alice@example.org", "sent"), m.removed()])
    assert env.run() == 2
    received, relayed = env.events()
    assert received.kind is Kind.RECEIVED and relayed.kind is Kind.RELAYED
    for ev in (received, relayed):
        assert (ev.tenant, ev.queue_id, ev.node) == ("acme", "89037160377", NODE)
        assert ev.message_id == m.message_id and ev.upstream_id == "job-42"
        assert ev.sender == "news@acme.example" and ev.recipient == "alice@example.org"
        assert ev.original_recipient == "alice=example.org@acme.relay.test"
        assert ev.client == "localhost[127.0.0.1]" and ev.size == 1091
    assert relayed.response_code == "250" and relayed.dsn == "2.0.0"
    assert relayed.reason == "sent (250 2.0.0 Ok: queued)" and relayed.relay == "127.0.0.1[127.0.0.1]:2525"
    assert relayed.tls == {"requested": "verify", "established": True, "level": "Verified", "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    assert received.tls is None
    assert env.store.outbox_backlog() == {"acme": 2}  # acme has a webhook; same transaction
    with env.store.transaction() as tx:
        assert "89037160377" not in tx.all_state(NODE)  # removed drops the state


def test_deferred_then_relayed_with_next_retry(env):
    m = Msg("987DC160377", "globex", ["bob@example.org"], smtp_pid=3501)
    env.write([m.milter(), *m.ingress(), m.queued(), m.delivery("bob@example.org", "deferred")])
    # Postfix sets the deferred queue file's mtime to the next attempt.
    qfile = env.queue / "deferred" / "9" / "987DC160377"
    qfile.parent.mkdir(parents=True)
    qfile.touch()
    os.utime(qfile, (T0 + 123, T0 + 123))
    env.run()
    m2 = Msg("987DC160377", "globex", ["bob@example.org"], ts=T0 + 200, smtp_pid=3501)
    env.write([m2.queued(), m2.delivery("bob@example.org", "deferred"), m2.queued(T0 + 500), m2.delivery("bob@example.org", "sent", T0 + 500), m2.removed(T0 + 500)])
    env.now = T0 + 501
    env.run()
    kinds = [(e.kind.value, e.response_code, e.next_retry) for e in env.events()]
    assert kinds == [
        ("RECEIVED", None, None),
        ("DEFERRED", "451", T0 + 123),  # fresh line: the queue file's mtime
        ("DEFERRED", "451", T0 + 200 + 300),  # line 301 s old: ts + minimal backoff
        ("RELAYED", "250", None),
    ]
    deferred = env.events()[1]
    assert deferred.tenant == "globex" and deferred.dsn == "4.3.0"
    assert deferred.reason.startswith("deferred (host 127.0.0.1[127.0.0.1] said: 451 4.3.0")
    assert deferred.tls == {"requested": "may", "established": False}
    assert env.store.outbox_backlog() == {}  # globex has no webhook


def test_a_message_requeued_with_postsuper_keeps_its_history_under_the_new_queue_id(env):
    """postsuper -r: pickup logs the new queue id with orig_id=; the message's later attempts
    are its events (same tenant, Message-ID, original recipient), with no second RECEIVED."""
    m = Msg("987DC160377", "globex", ["bob@example.org"], smtp_pid=3501)
    env.write([m.milter(), *m.ingress(), m.queued(), m.delivery("bob@example.org", "deferred")])
    env.run()
    new = Msg("C3193166811", "globex", ["bob@example.org"], ts=T0 + 60, smtp_pid=3502)
    env.write([
        ("maillog", pf(T0 + 60, "postsuper", 4000, "Requeued: 1 message")),
        ("maillog", pf(T0 + 60, "pickup", 3385, "C3193166811: uid=0 from=<news@globex.example> orig_id=987DC160377")),
        ("maillog", pf(T0 + 60, "cleanup", 3499, "C3193166811: message-id=<987dc160377@platform.example>")),
        new.queued(), new.delivery("bob@example.org", "sent"), new.removed(),
    ])
    env.now = T0 + 61
    env.run()
    evs = env.events()
    assert [(e.kind.value, e.queue_id) for e in evs] == [
        ("RECEIVED", "987DC160377"), ("DEFERRED", "987DC160377"), ("RELAYED", "C3193166811"),
    ]
    relayed = evs[-1]
    assert (relayed.tenant, relayed.message_id, relayed.original_recipient) == (
        "globex", "<987dc160377@platform.example>", "bob=example.org@globex.relay.test",
    )
    with env.store.transaction() as tx:
        assert tx.all_state(NODE) == {}  # the old id's state moved, the new one ended


def test_a_local_submission_through_pickup_is_no_tenant_event(env):
    env.write([
        ("maillog", pf(T0, "pickup", 3385, "D1193166811: uid=0 from=<root>")),
        ("maillog", pf(T0, "qmgr", 3493, "D1193166811: from=<root@relay.lab.test>, size=300, nrcpt=1 (queue active)")),
        ("maillog", pf(T0, "relay_acme/smtp", 3500, "D1193166811: to=<x@example.org>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.03, delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 ok)")),
    ])
    env.run()
    assert env.events() == []


def test_bounced_and_the_relays_bounce_notice_is_not_tenant_mail(env):
    m = Msg("A9356160377", "globex", ["carol@example.org"])
    env.write([m.milter(), *m.ingress(), m.queued(), m.delivery("carol@example.org", "bounced"),
               *bounce_notice(m, "ABD1D16038E", T0), m.removed()])
    env.run()
    assert env.summary() == [("RECEIVED", "A9356160377", "carol@example.org"), ("BOUNCED", "A9356160377", "carol@example.org")]
    bounced = env.events()[1]
    assert bounced.response_code == "550" and bounced.dsn == "5.1.1"
    with env.store.transaction() as tx:
        assert not [k for k in tx.all_state(NODE) if not k.startswith("tls ")]


def test_milter_reject_and_noqueue_reject(env):
    other = ("maillog", pf(T0 + 8, "smtpd", 3495, "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.7.1 <x=y.org@acme.relay.test>: Recipient address rejected: denied; from=<bad@nowhere.example> to=<x=y.org@acme.relay.test> proto=ESMTP helo=<h>"))
    by_sender = ("maillog", pf(T0 + 9, "smtpd", 3495, "NOQUEUE: milter-reject: MAIL from localhost[127.0.0.1]: 550 5.7.1 client not allowed; from=<news@globex.example> proto=ESMTP helo=<h>"))
    env.write([*EOM_REJECT, NOQUEUE_REJECT, other, by_sender])
    env.run()
    eom, relay_denied, by_domain, sender = env.events()
    assert all(e.kind is Kind.REJECTED for e in env.events())
    assert (eom.tenant, eom.queue_id, eom.response_code, eom.dsn) == ("globex", "AC41D16038F", "550", "5.7.20")
    # Shown decoded, so trace finds it by the real recipient; the address as refused is kept.
    assert (eom.recipient, eom.original_recipient) == ("dave@example.org", "dave=example.org@globex.relay.test")
    assert eom.sender == "news@globex.example"
    assert eom.message_id == "<1795594797696764892.3070@platform.example>" and eom.client == "localhost[127.0.0.1]"
    assert eom.reason.startswith("DKIM verification failed")
    assert (relay_denied.tenant, relay_denied.queue_id, relay_denied.response_code) == (None, None, "554")
    assert relay_denied.recipient == "a@other.example" and relay_denied.reason == "<a@other.example>: Relay access denied"
    assert relay_denied.original_recipient is None
    assert by_domain.tenant == "acme"  # relay domain of to=
    assert (by_domain.recipient, by_domain.original_recipient) == ("x@y.org", "x=y.org@acme.relay.test")
    assert sender.tenant == "globex" and sender.recipient is None  # the only tenant sending from globex.example
    with env.store.transaction() as tx:
        assert tx.all_state(NODE) == {}  # the refused transaction leaves nothing behind


def test_milter_reject_code_without_the_milter_record_comes_from_the_dsn_class(env):
    env.write([EOM_REJECT[0], EOM_REJECT[1], EOM_REJECT[3]])
    env.run()
    (ev,) = env.events()
    assert ev.response_code == "550" and ev.tenant == "globex"


def test_multi_recipient_deferred_twice_then_relayed_counts_per_recipient(env):
    rcpts = ["alice@example.org", "bob@example.net"]
    m = Msg("B1234567890", "acme", rcpts)
    script = [m.milter(), *m.ingress()]
    for attempt in range(3):
        t = T0 + attempt * 300
        script += [m.queued(t), m.tls(t)]
        script += [m.delivery(r, "sent" if attempt == 2 else "deferred", t) for r in rcpts]
    script.append(m.removed(T0 + 600))
    env.write(script)
    env.run()
    counts = {k: sum(1 for e in env.events() if e.kind is k) for k in Kind}
    assert counts == {Kind.RECEIVED: 2, Kind.DEFERRED: 4, Kind.RELAYED: 2, Kind.BOUNCED: 0, Kind.REJECTED: 0,
                      Kind.OPENED: 0, Kind.CLICKED: 0, Kind.DELAYED: 0, Kind.COMPLAINED: 0}  # engagement events come from relayctl web, never the tracker
    received = [e for e in env.events() if e.kind is Kind.RECEIVED]
    assert [(e.recipient, e.original_recipient) for e in received] == [
        ("alice@example.org", "alice=example.org@acme.relay.test"),
        ("bob@example.net", "bob=example.net@acme.relay.test"),
    ]
    assert all(e.tls["established"] for e in env.events() if e.kind is not Kind.RECEIVED)


def test_expired_bounces_every_recipient_not_final(env):
    rcpts = ["alice@example.org", "bob@example.net", "carol@example.com"]
    m = Msg("C1234567890", "acme", rcpts)
    env.write([m.milter(), *m.ingress(), m.queued(), m.delivery(rcpts[0], "sent"), m.delivery(rcpts[1], "deferred"),
               m.expired(T0 + 172800), m.removed(T0 + 172800)])
    env.run()
    bounced = [e for e in env.events() if e.kind is Kind.BOUNCED]
    assert [e.recipient for e in bounced] == ["bob@example.net", "carol@example.com"]
    assert bounced[0].dsn == "4.3.0" and bounced[0].response_code == "451"  # the last attempt's
    assert bounced[0].reason.startswith("expired, returned to sender (last attempt: deferred (host")
    assert bounced[1].reason == "expired, returned to sender" and bounced[1].dsn is None
    assert all(e.ts == T0 + 172800 for e in bounced)


def test_tls_of_an_earlier_connection_does_not_apply_to_the_next_message(env):
    a = Msg("D1234567890", "acme", ["a@example.org"], smtp_pid=700)
    b = Msg("E1234567890", "acme", ["b@example.org"], smtp_pid=700)
    env.write([a.milter(), b.milter(), *a.ingress(), *b.ingress(), a.queued(), b.queued(), a.tls(),
               a.delivery("a@example.org", "sent"), b.delivery("b@example.org", "deferred")])
    env.run()
    tls = {e.queue_id: e.tls for e in env.events() if e.kind is not Kind.RECEIVED}
    assert tls["D1234567890"]["established"] is True
    assert tls["E1234567890"] == {"requested": "verify", "established": False}


# -- the milter's record ----------------------------------------------------------------


def test_milter_record_written_after_the_postfix_lines_is_waited_for(env):
    m = Msg("F1234567890", "acme", ["alice@example.org", "bob@example.org"])
    env.write([*m.ingress(), m.queued(), m.delivery("alice@example.org", "sent")])
    assert env.run() == 0  # waits at the qmgr line: nothing recorded yet
    with env.store.transaction() as tx:
        waiting_at = tx.get_checkpoint(NODE, STREAM_MAILLOG)["offset"]
    assert 0 < waiting_at < env.maillog.stat().st_size
    env.write([m.milter()])
    env.run()
    assert env.summary() == [
        ("RECEIVED", "F1234567890", "alice@example.org"),
        ("RECEIVED", "F1234567890", "bob@example.org"),
        ("RELAYED", "F1234567890", "alice@example.org"),
    ]


def test_milter_record_that_never_comes_is_given_up_after_record_wait(env, caplog):
    m = Msg("F1234567890", "acme", ["alice@example.org"])
    env.write([*m.ingress(), m.queued(), m.delivery("alice@example.org", "sent")])
    t = env.tracker()
    env.now = T0 + 9.9
    assert t.run_once() == 0
    env.now = T0 + 10
    with caplog.at_level(logging.WARNING, logger="relay.tracker"):
        assert t.run_once() == 2
    assert "F1234567890: event=tracker_no_milter_record" in caplog.text
    received, relayed = env.events()
    # What Postfix's route line showed: the tenant and the first recipient.
    assert (received.tenant, received.recipient, received.original_recipient) == ("acme", "alice@example.org", "alice=example.org@acme.relay.test")
    assert received.upstream_id is None and received.message_id == m.message_id and received.sender == "news@acme.example"
    assert relayed.tenant == "acme" and relayed.tls["established"] is False


def test_old_lines_do_not_wait_when_the_milter_log_is_read_to_its_end(env):
    m = Msg("F1234567890", "acme", ["alice@example.org"])
    env.write([*m.ingress(), m.queued()])
    env.now = T0 + 3600  # catching up on an hour-old log: the record would have been read
    assert env.run() == 1


# -- files ------------------------------------------------------------------------------


def delivered(n: int, tenant: str = "acme", base: float = T0) -> list[Msg]:
    return [Msg(f"{0xA0000000 + i:08X}", tenant, [f"user{i}@example.org"], ts=base + i, smtp_pid=4000 + i) for i in range(n)]


def full(m: Msg) -> list[tuple[str, str]]:
    return [m.milter(), *m.ingress(), m.queued(), m.tls(), m.delivery(m.rcpts[0], "sent"), m.removed()]


def test_rename_rotation_drains_the_old_file_then_reads_the_new_one(env):
    a, b, c = delivered(3)
    env.write(full(a))
    t = env.tracker()
    t.run_once()
    env.maillog.rename(env.dir / "maillog.1")
    with open(env.dir / "maillog.1", "a") as fh:  # the writer had not reopened yet
        fh.write("\n".join(line for s, line in full(b) if s == "maillog") + "\n")
    env.write([s for s in full(b) if s[0] == "milter"])
    t.run_once()
    env.write(full(c))  # the new file
    t.run_once()
    assert [e.queue_id for e in env.events() if e.kind is Kind.RELAYED] == [a.qid, b.qid, c.qid]
    assert len(env.events()) == 6


def test_rotation_while_stopped_finishes_the_rotated_files_first(env):
    a, b, c, d = delivered(4)
    env.write(full(a) + [("maillog", full(b)[1][1])])
    env.run()
    env.write([x for x in full(b)[2:] if x[0] == "maillog"] + [full(b)[0]])
    env.maillog.rename(env.dir / "maillog.1")
    env.write(full(c))
    os.utime(env.dir / "maillog.1", (T0, T0))
    env.maillog.rename(env.dir / "maillog-20261125")
    os.utime(env.dir / "maillog-20261125", (T0 + 10, T0 + 10))
    env.write(full(d))
    env.run()
    assert [e.queue_id for e in env.events() if e.kind is Kind.RELAYED] == [a.qid, b.qid, c.qid, d.qid]
    assert len(env.events()) == 8


def test_copytruncate_reads_the_new_content_from_the_start_and_recovers_the_copy(env):
    a, b, c = delivered(3)
    env.write(full(a))
    env.run()
    env.write(full(b))  # written after our checkpoint, before logrotate copied the file
    shutil.copy(env.maillog, env.dir / "maillog.1")
    os.truncate(env.maillog, 0)
    env.write(full(c))
    env.run()
    assert [e.queue_id for e in env.events() if e.kind is Kind.RELAYED] == [a.qid, b.qid, c.qid]
    assert len(env.events()) == 6


def test_truncation_to_a_longer_file_is_noticed_by_its_first_bytes(env):
    a = delivered(1)[0]
    b = delivered(2, tenant="globex", base=T0 + 100)
    env.write(full(a))
    env.run()
    os.truncate(env.maillog, 0)
    env.write(full(b[0]) + full(b[1]) + full(b[0]))  # more bytes than before the truncation
    env.run()
    assert [e.tenant for e in env.events() if e.kind is Kind.RELAYED] == ["acme", "globex", "globex"]


def test_a_partial_last_line_waits_for_its_newline(env):
    m = delivered(1)[0]
    lines = full(m)
    env.write(lines[:-2])
    stream, last = lines[-2]
    with open(env.maillog, "a") as fh:
        fh.write(last[:40])
    env.run()
    assert [e.kind for e in env.events()] == [Kind.RECEIVED]
    with open(env.maillog, "a") as fh:
        fh.write(last[40:] + "\n")
    env.run()
    assert [e.kind for e in env.events()] == [Kind.RECEIVED, Kind.RELAYED]


def test_without_a_checkpoint_the_tracker_starts_at_the_end_unless_from_start(env):
    a, b = delivered(2)
    env.write(full(a))
    env.run(from_start=False)
    assert env.events() == []
    env.write(full(b))
    env.run(from_start=False)
    assert {e.queue_id for e in env.events()} == {b.qid}


def test_a_checkpointed_file_that_is_gone_is_reported_and_the_path_read_from_the_start(env, caplog):
    a, b = delivered(2)
    env.write(full(a))
    env.run()
    fresh = env.dir / "new"
    fresh.write_text("".join(line + "\n" for stream, line in full(b) if stream == "maillog"))
    os.replace(fresh, env.maillog)  # the old file is deleted, not kept as a sibling
    env.write([x for x in full(b) if x[0] == "milter"])
    with caplog.at_level(logging.WARNING, logger="relay.tracker"):
        env.run()
    assert "event=tracker_file_gone stream=maillog" in caplog.text
    assert [e.queue_id for e in env.events() if e.kind is Kind.RELAYED] == [a.qid, b.qid]


def test_a_new_file_that_reuses_the_old_inode_number_is_read_from_the_start(env, caplog):
    a, b = delivered(2)
    env.write(full(a))
    env.run()
    env.maillog.unlink()  # the file system may hand the same inode number to the next file
    env.write(full(b) + full(b)[1:])  # longer than our old offset: only the first bytes tell
    with caplog.at_level(logging.WARNING, logger="relay.tracker"):
        env.run()
    assert [e.queue_id for e in env.events() if e.kind is Kind.RELAYED] == [a.qid, b.qid]


def test_garbage_lines_are_skipped(env):
    m = delivered(1)[0]
    junk = [("maillog", "\x00\x01 garbage"), ("milter", "Traceback (most recent call last):"), ("maillog", "Nov 25 08:19:50 relay postfix/qmgr[1]: ÿÿÿ: removed")]
    env.write(junk + full(m) + junk)
    with open(env.maillog, "ab") as fh:
        fh.write(b"\xff\xfe\x80 8-bit junk\n")
    env.run()
    assert len(env.events()) == 2


# -- exactly once ---------------------------------------------------------------------------


def scripted() -> list[tuple[str, str]]:
    """Every case at once, interleaved the way the two files really grow."""
    ok = Msg("89037160377", "acme", ["alice@example.org", "bob@example.net"], upstream_id="u-1")
    later = Msg("987DC160377", "globex", ["bob@example.org"], ts=T0 + 1, smtp_pid=3501)
    bounce = Msg("A9356160377", "globex", ["carol@example.org"], ts=T0 + 2, smtp_pid=3502)
    late_record = Msg("B9356160377", "acme", ["erin@example.org"], ts=T0 + 3, smtp_pid=3503)
    expired = Msg("C9356160377", "acme", ["frank@example.org", "gina@example.org"], ts=T0 + 4, smtp_pid=3504)
    return [
        ok.milter(), *ok.ingress(), later.milter(), ok.queued(), *later.ingress(), ok.tls(),
        ok.delivery("alice@example.org", "sent"), later.queued(), later.delivery("bob@example.org", "deferred"),
        ok.delivery("bob@example.net", "deferred"), bounce.milter(), *bounce.ingress(), bounce.queued(),
        *EOM_REJECT, bounce.tls(), bounce.delivery("carol@example.org", "bounced"),
        *bounce_notice(bounce, "ABD1D16038E", T0 + 2), bounce.removed(), NOQUEUE_REJECT,
        *late_record.ingress(), late_record.queued(), late_record.milter(), late_record.delivery("erin@example.org", "sent"),
        later.queued(T0 + 5), later.tls(T0 + 5), later.delivery("bob@example.org", "sent", T0 + 5), later.removed(T0 + 5),
        expired.milter(), *expired.ingress(), expired.queued(), expired.delivery("frank@example.org", "deferred"),
        ok.queued(T0 + 6), ok.delivery("bob@example.net", "sent", T0 + 6), ok.removed(T0 + 6),
        expired.expired(T0 + 9), late_record.removed(T0 + 9), expired.removed(T0 + 9),
    ]


def reference(tmp: Path) -> list[dict]:
    env = Env(tmp)
    try:
        env.write(scripted())
        env.run()
        return comparable(env.events())
    finally:
        env.close()


def test_the_scripted_log_gives_the_expected_events(tmp_path):
    ref = reference(tmp_path)
    got = [(e["kind"], e["queue_id"], e["recipient"], e["tenant"]) for e in ref]
    assert got == [
        ("RECEIVED", "89037160377", "alice@example.org", "acme"),
        ("RECEIVED", "89037160377", "bob@example.net", "acme"),
        ("RELAYED", "89037160377", "alice@example.org", "acme"),
        ("RECEIVED", "987DC160377", "bob@example.org", "globex"),
        ("DEFERRED", "987DC160377", "bob@example.org", "globex"),
        ("DEFERRED", "89037160377", "bob@example.net", "acme"),
        ("RECEIVED", "A9356160377", "carol@example.org", "globex"),
        ("REJECTED", "AC41D16038F", "dave@example.org", "globex"),
        ("BOUNCED", "A9356160377", "carol@example.org", "globex"),
        ("REJECTED", None, "a@other.example", None),
        ("RECEIVED", "B9356160377", "erin@example.org", "acme"),
        ("RELAYED", "B9356160377", "erin@example.org", "acme"),
        ("RELAYED", "987DC160377", "bob@example.org", "globex"),
        ("RECEIVED", "C9356160377", "frank@example.org", "acme"),
        ("RECEIVED", "C9356160377", "gina@example.org", "acme"),
        ("DEFERRED", "C9356160377", "frank@example.org", "acme"),
        ("RELAYED", "89037160377", "bob@example.net", "acme"),
        ("BOUNCED", "C9356160377", "frank@example.org", "acme"),
        ("BOUNCED", "C9356160377", "gina@example.org", "acme"),
    ]
    tls = {(e["queue_id"], e["kind"]): e["tls"] for e in ref if e["tls"]}
    assert tls[("987DC160377", "RELAYED")]["established"] is True
    assert tls[("987DC160377", "DEFERRED")]["established"] is False


def test_restart_at_every_line_boundary_records_exactly_the_same_events(tmp_path):
    ref = reference(tmp_path / "ref")
    script = scripted()
    for cut in range(len(script) + 1):
        env = Env(tmp_path / f"cut{cut}")
        try:
            env.write(script[:cut])
            env.run()
            env.write(script[cut:])
            env.run()
            assert comparable(env.events()) == ref, f"restart after line {cut} of {len(script)}"
        finally:
            env.close()


class Crash(Exception):
    pass


class CrashingStore:
    """The real store, but the n-th transaction fails after its writes (a crash mid-commit)."""

    def __init__(self, store, fail_at: int):
        self.store, self.fail_at, self.count = store, fail_at, 0

    def transaction(self):
        self.count += 1
        inner = self.store.transaction()
        fail = self.count == self.fail_at

        class _Ctx:
            def __enter__(ctx):
                return inner.__enter__()

            def __exit__(ctx, *exc):
                if fail and exc[0] is None:
                    try:
                        raise Crash()
                    except Crash as crash:
                        inner.__exit__(Crash, crash, crash.__traceback__)
                        raise
                return inner.__exit__(*exc)

        return _Ctx()


def test_a_failed_commit_at_any_batch_repeats_nothing_and_loses_nothing(tmp_path):
    ref = reference(tmp_path / "ref")
    script = scripted()
    commits = count_transactions(tmp_path / "count", script)
    assert commits > len(script) // 2  # one-line batches: (nearly) every line is its own commit
    for fail_at in range(1, commits + 1):
        env = Env(tmp_path / f"crash{fail_at}")
        try:
            env.write(script)
            t = Tracker(env.settings, TENANTS, CrashingStore(env.store, fail_at), clock=lambda: env.now, tz=UTC, from_start=True, batch_lines=1)
            with pytest.raises(Crash):
                t.run_once()
            t.run_once()  # the same object recovers from the store, like a restart
            t.close()
            assert comparable(env.events()) == ref, f"failure at transaction {fail_at}"
        finally:
            env.close()


def count_transactions(tmp: Path, script) -> int:
    """How many transactions one-line batches of this script take."""
    env = Env(tmp)
    try:
        env.write(script)
        counter = CrashingStore(env.store, fail_at=0)
        t = Tracker(env.settings, TENANTS, counter, clock=lambda: env.now, tz=UTC, from_start=True, batch_lines=1)
        t.run_once()
        t.close()
        return counter.count
    finally:
        env.close()


def test_restart_inside_a_line_changes_nothing(tmp_path):
    ref = reference(tmp_path / "ref")
    text = "".join(line + "\n" for stream, line in scripted() if stream == "maillog")
    milter = "".join(line + "\n" for stream, line in scripted() if stream == "milter")
    for n, cut in enumerate(range(7, len(text), 211)):
        env = Env(tmp_path / f"mid{n}")
        try:
            env.milter_log.write_text(milter)
            env.maillog.write_text(text[:cut])
            env.run()
            with open(env.maillog, "a") as fh:
                fh.write(text[cut:])
            env.run()
            assert comparable(env.events()) == ref, f"restart at byte {cut}"
        finally:
            env.close()


# -- the service loop -------------------------------------------------------------------


def test_main_loop_stops_on_sigterm_after_committing(env):
    a = delivered(1)[0]
    env.write(full(a))
    settings = env.settings.model_copy(update={"tracking": env.settings.tracking.model_copy(update={"poll_interval": 0.05})})
    stop = threading.Event()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert main_loop(settings, TENANTS, env.store, stop, from_start=True) == 0
    finally:
        timer.cancel()
    assert stop.is_set()
    assert len(env.events()) == 2
    # The loop put back exactly the handlers it found, not merely some handler.
    assert {sig: signal.getsignal(sig) for sig in before} == before
