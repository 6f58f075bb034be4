"""Golden tables for logparse: real lines from a lab run (tests/data/*.sample) and hostile ones."""

from __future__ import annotations

import collections
import random
from datetime import datetime, timezone

import pytest

from relay_milter.tracking.logparse import (
    BounceNotice,
    Client,
    Delivery,
    Expired,
    MessageId,
    Queued,
    Reject,
    Removed,
    Requeued,
    Route,
    Tls,
    parse_logfmt,
    parse_milter,
    parse_postfix,
    postfix_time,
    response_code,
)
from support.paths import DATA

UTC = timezone.utc
T0 = datetime(2026, 11, 25, 8, 19, 50, tzinfo=UTC).timestamp()


def fields(record) -> dict:
    """The record's class and set fields (the golden tables list only those)."""
    return {"kind": type(record), **{k: v for k, v in vars(record).items() if v not in (None, False)}}


POSTFIX_GOLDEN = [
    (
        "Nov 25 08:19:50 relay postfix/smtpd[3495]: 89037160377: client=localhost[127.0.0.1]",
        dict(kind=Client, ts=T0, service="postfix/smtpd", pid=3495, queue_id="89037160377", client="localhost[127.0.0.1]"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/submission/smtpd[77]: 89037160377: client=unknown[2001:db8::1], sasl_method=PLAIN, sasl_username=acme",
        dict(kind=Client, ts=T0, service="postfix/submission/smtpd", pid=77, queue_id="89037160377", client="unknown[2001:db8::1]"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/cleanup[3499]: 89037160377: message-id=<1795594790512259957.3070@platform.example>",
        dict(kind=MessageId, ts=T0, service="postfix/cleanup", pid=3499, queue_id="89037160377", message_id="<1795594790512259957.3070@platform.example>"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/cleanup[3499]: 89037160377: milter-header-filter: header X-Relay-Route: acme from localhost[127.0.0.1]; from=<news@acme.example> to=<alice=example.org@acme.relay.test> proto=ESMTP helo=<platform.lab.test>: relay_acme:[127.0.0.1]:57681",
        dict(kind=Route, ts=T0, service="postfix/cleanup", pid=3499, queue_id="89037160377", tenant="acme", client="localhost[127.0.0.1]", sender="news@acme.example", recipient="alice=example.org@acme.relay.test"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: from=<news@acme.example>, size=1091, nrcpt=2 (queue active)",
        dict(kind=Queued, ts=T0, service="postfix/qmgr", pid=3493, queue_id="89037160377", sender="news@acme.example", size=1091, nrcpt=2),
    ),
    (
        "Nov 25 08:19:50 relay postfix/relay_acme/smtp[3500]: Verified TLS connection established to 127.0.0.1[127.0.0.1]:57681: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
        dict(kind=Tls, ts=T0, service="postfix/relay_acme/smtp", pid=3500, level="Verified", protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", peer="127.0.0.1[127.0.0.1]:57681"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/relay_acme/smtp[3500]: 89037160377: to=<alice@example.org>, relay=127.0.0.1[127.0.0.1]:57681, delay=0.03, delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)",
        dict(kind=Delivery, ts=T0, service="postfix/relay_acme/smtp", pid=3500, queue_id="89037160377", recipient="alice@example.org", relay="127.0.0.1[127.0.0.1]:57681", delay=0.03, delays="0.01/0.01/0/0", dsn="2.0.0", status="sent", reason="sent (250 2.0.0 Ok: queued)", response_code="250"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/relay_globex/smtp[3501]: 987DC160377: to=<bob@example.org>, relay=127.0.0.1[127.0.0.1]:37303, delay=0.04, delays=0/0.03/0/0, dsn=4.3.0, status=deferred (host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command))",
        dict(kind=Delivery, ts=T0, service="postfix/relay_globex/smtp", pid=3501, queue_id="987DC160377", recipient="bob@example.org", relay="127.0.0.1[127.0.0.1]:37303", delay=0.04, delays="0/0.03/0/0", dsn="4.3.0", status="deferred", reason="deferred (host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command))", response_code="451"),
    ),
    (
        "Nov 25 08:19:53 relay postfix/relay_globex/smtp[3501]: A9356160377: to=<carol@example.org>, relay=127.0.0.1[127.0.0.1]:37303, delay=0.01, delays=0/0/0/0, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to end of DATA command))",
        dict(kind=Delivery, ts=T0 + 3, service="postfix/relay_globex/smtp", pid=3501, queue_id="A9356160377", recipient="carol@example.org", relay="127.0.0.1[127.0.0.1]:37303", delay=0.01, delays="0/0/0/0", dsn="5.1.1", status="bounced", reason="bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to end of DATA command))", response_code="550"),
    ),
    (  # orig_to, a connection failure without a reply code, long queue id
        "Nov 25 08:19:50 relay postfix/relay_acme/smtp[9]: 4YQbZy0d9Lz9sLk: to=<a@example.org>, orig_to=<a=example.org@acme.relay.test>, relay=none, delay=30, delays=0/0/30/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:2525: Connection refused)",
        dict(kind=Delivery, ts=T0, service="postfix/relay_acme/smtp", pid=9, queue_id="4YQbZy0d9Lz9sLk", recipient="a@example.org", orig_recipient="a=example.org@acme.relay.test", relay="none", delay=30.0, delays="0/0/30/0", dsn="4.4.1", status="deferred", reason="deferred (connect to 127.0.0.1[127.0.0.1]:2525: Connection refused)"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: from=<news@acme.example>, status=expired, returned to sender",
        dict(kind=Expired, ts=T0, service="postfix/qmgr", pid=3493, queue_id="89037160377", sender="news@acme.example"),
    ),
    (
        "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: removed",
        dict(kind=Removed, ts=T0, service="postfix/qmgr", pid=3493, queue_id="89037160377"),
    ),
    (
        "Nov 25 08:19:53 relay postfix/bounce[3530]: A9356160377: sender non-delivery notification: ABD1D16038E",
        dict(kind=BounceNotice, ts=T0 + 3, service="postfix/bounce", pid=3530, queue_id="A9356160377", notice_id="ABD1D16038E"),
    ),
    (
        "Nov 25 08:19:57 relay postfix/cleanup[3499]: AC41D16038F: milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 5.7.20 DKIM verification failed: signature did not verify: signed headers changed, or signed with another key; from=<news@globex.example> to=<dave=example.org@globex.relay.test> proto=ESMTP helo=<platform.lab.test>",
        dict(kind=Reject, ts=T0 + 7, service="postfix/cleanup", pid=3499, queue_id="AC41D16038F", stage="END-OF-MESSAGE", milter=True, client="localhost[127.0.0.1]", dsn="5.7.20", text="DKIM verification failed: signature did not verify: signed headers changed, or signed with another key", sender="news@globex.example", recipient="dave=example.org@globex.relay.test"),
    ),
    (
        "Nov 25 08:19:57 relay postfix/smtpd[3495]: NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 <a@other.example>: Relay access denied; from=<x@evil.example> to=<a@other.example> proto=ESMTP helo=<platform.lab.test>",
        dict(kind=Reject, ts=T0 + 7, service="postfix/smtpd", pid=3495, stage="RCPT", client="localhost[127.0.0.1]", response_code="554", dsn="5.7.1", text="<a@other.example>: Relay access denied", sender="x@evil.example", recipient="a@other.example"),
    ),
    (  # milter reject at RCPT, logged by smtpd with the code; a queue id when the file is open
        "Nov 25 08:19:57 relay postfix/smtpd[3495]: 89037160377: milter-reject: RCPT from localhost[127.0.0.1]: 550 5.1.3 recipient is not encoded; from=<news@acme.example> to=<bob@acme.relay.test> proto=ESMTP helo=<h>",
        dict(kind=Reject, ts=T0 + 7, service="postfix/smtpd", pid=3495, queue_id="89037160377", stage="RCPT", milter=True, client="localhost[127.0.0.1]", response_code="550", dsn="5.1.3", text="recipient is not encoded", sender="news@acme.example", recipient="bob@acme.relay.test"),
    ),
    (  # a hostile HELO that imitates the from=/to= tail cannot change them
        "Nov 25 08:19:57 relay postfix/smtpd[3495]: NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 <a@other.example>: Relay access denied; from=<x@evil.example> to=<a@other.example> proto=ESMTP helo=<h; from=<ceo@acme.example> to=<v=x.org@acme.relay.test> proto=ESMTP helo=<h>",
        dict(kind=Reject, ts=T0 + 7, service="postfix/smtpd", pid=3495, stage="RCPT", client="localhost[127.0.0.1]", response_code="554", dsn="5.7.1", text="<a@other.example>: Relay access denied", sender="x@evil.example", recipient="a@other.example"),
    ),
    (  # postsuper -r: the message comes back through pickup under a new queue id
        "Nov 25 08:20:50 relay postfix/pickup[3385]: C3193166811: uid=0 from=<news@globex.example> orig_id=987DC160377",
        dict(kind=Requeued, ts=T0 + 60, service="postfix/pickup", pid=3385, queue_id="C3193166811", sender="news@globex.example", orig_queue_id="987DC160377"),
    ),
    (  # ISO 8601 timestamps (rsyslog RFC 3339 format)
        "2026-11-25T08:19:50.123456+00:00 relay postfix/qmgr[3493]: 89037160377: removed",
        dict(kind=Removed, ts=T0 + 0.123456, service="postfix/qmgr", pid=3493, queue_id="89037160377"),
    ),
    (
        "2026-11-25T09:19:50+0100 relay postfix/qmgr[3493]: 89037160377: removed",
        dict(kind=Removed, ts=T0, service="postfix/qmgr", pid=3493, queue_id="89037160377"),
    ),
]

IGNORED_REAL = [
    "Nov 25 08:19:50 relay postfix/postfix-script[3489]: starting the Postfix mail system",
    "Nov 25 08:19:50 relay postfix/master[3491]: daemon started -- version 3.7.11, configuration /var/tmp/relay-lab-dk8ihynq/postfix",
    "Nov 25 08:19:50 relay postfix/smtpd[3495]: connect from localhost[127.0.0.1]",
    "Nov 25 08:19:50 relay postfix/smtpd[3495]: lost connection after CONNECT from localhost[127.0.0.1]",
    "Nov 25 08:19:50 relay postfix/smtpd[3495]: disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
    "Nov 25 08:19:50 relay postfix/smtpd[3495]: warning: hostname foo does not resolve to address 1.2.3.4",
    "Nov 25 08:19:50 relay postfix/smtpd[3495]: Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher X",
]

HOSTILE = [
    "",
    "\n",
    "garbage",
    "Nov 25 08:19:50",
    "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: from=<news@acme.example>, size=1091",  # cut off
    "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: from=<news@acme.example>, size=1091, nrcpt=2 (queue active)\x00",
    "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: from=<news@acme.example>, size=1\r2, nrcpt=2",
    "Nov 25 08:19:50 relay evil/qmgr[3493]: 89037160377: removed",  # not a Postfix service
    "Nov 25 08:19:50 relay postfix/qmgr[3493]: warning: 89037160377: removed",
    "Foo 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: removed",
    "Feb 30 08:19:50 relay postfix/qmgr[3493]: 89037160377: removed",
    "Nov 25 25:19:50 relay postfix/qmgr[3493]: 89037160377: removed",
    "2026-13-25T08:19:50Z relay postfix/qmgr[3493]: 89037160377: removed",
    "Nov 25 08:19:50 relay postfix/qmgr[3493]: 89037160377: removed" + " x" * 20000,
    "Nov 25 08:19:50 relay postfix/relay_acme/smtp[1]: 89037160377: to=<a@b>, relay=x, delay=1, delays=1, dsn=9.9.9, status=sent (250 ok)",
    "Nov 25 08:19:50 relay postfix/relay_acme/smtp[1]: 89037160377: to=<a@b>, relay=x, delay=1, delays=1, dsn=2.0.0, status=weird (250 ok)",
    "Nov 25 08:19:50 relay postfix/smtpd[1]: NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 denied",  # no tail
    "Nov 25 08:19:50 relay postfix/smtpd[1]: NOQUEUE: client=localhost[127.0.0.1]",
    "Nov 25 08:19:50 relay postfix/smtpd[1]: 89037160377: client=localhost[127.0.0.1]\ud800",
    "\xff\xfe\x00\x01 binary",
]


@pytest.mark.parametrize("line,expected", POSTFIX_GOLDEN, ids=[e["kind"].__name__ + str(i) for i, (_, e) in enumerate(POSTFIX_GOLDEN)])
def test_postfix_golden(line, expected):
    record = parse_postfix(line, 2026, UTC)
    assert record is not None, line
    got = fields(record)
    assert got.pop("ts") == pytest.approx(expected.pop("ts"))
    assert got == expected


def test_transport_tenant_from_service_name():
    record = parse_postfix(POSTFIX_GOLDEN[6][0], 2026, UTC)
    assert record.program == "smtp" and record.transport_tenant == "acme"
    assert parse_postfix(POSTFIX_GOLDEN[0][0], 2026, UTC).transport_tenant is None


@pytest.mark.parametrize("line", IGNORED_REAL)
def test_real_lines_without_tracking_meaning(line):
    assert parse_postfix(line, 2026, UTC) is None


@pytest.mark.parametrize("line", HOSTILE)
def test_hostile_postfix_lines(line):
    assert parse_postfix(line, 2026, UTC) is None


def test_every_sample_line_parses_or_is_ignored_and_the_kinds_add_up():
    """tests/data/maillog.sample is a real lab run (scripts/make-sample-logs.py): a message to
    two recipients over verified TLS, a plain delivery, a deferral then delivery, a hard
    bounce with its notice, a milter reject at END-OF-MESSAGE and at RCPT, a Postfix reject."""
    lines = (DATA / "maillog.sample").read_text(encoding="utf-8").splitlines()
    records = [parse_postfix(line, 2026, UTC) for line in lines]
    kinds = collections.Counter(type(r) for r in records if r)
    assert kinds == {
        Client: 5, MessageId: 6, Route: 4, Queued: 6, Tls: 1, Delivery: 7, BounceNotice: 1, Removed: 5, Reject: 3,
    }
    assert records.count(None) == 19  # connect/disconnect, startup lines
    assert collections.Counter(r.status for r in records if isinstance(r, Delivery)) == {"sent": 4, "deferred": 1, "bounced": 2}
    [tls] = [r for r in records if isinstance(r, Tls)]
    assert (tls.level, tls.protocol, tls.process) == ("Verified", "TLSv1.3", "postfix/relay_acme/smtp[29438]")
    [notice] = [r for r in records if isinstance(r, BounceNotice)]
    assert (notice.queue_id, notice.notice_id) == ("DA5A1166A3E", "E3E66166A42")
    rejects = [(r.queue_id, r.stage, r.milter, r.response_code, r.dsn) for r in records if isinstance(r, Reject)]
    assert rejects == [
        ("1BC7D166A43", "END-OF-MESSAGE", True, None, "5.7.20"),
        (None, "RCPT", True, "550", "5.1.3"),
        (None, "RCPT", False, "554", "5.7.1"),
    ]


def test_random_bytes_never_raise():
    rng = random.Random(4)
    base = POSTFIX_GOLDEN[6][0]
    for _ in range(3000):
        raw = bytearray(base.encode())
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        line = raw.decode("utf-8", "replace")
        record = parse_postfix(line, 2026, UTC)
        assert record is None or isinstance(record, (Delivery, Tls, Reject))
        parse_milter(line)
    for _ in range(500):
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))).decode("latin-1")
        assert parse_postfix(junk, 2026, UTC) is None
        assert parse_milter(junk) is None


# -- timestamps --------------------------------------------------------------------


def test_year_from_hint_and_december_read_in_january():
    jan = datetime(2027, 1, 1, 0, 5, tzinfo=UTC)
    assert postfix_time("Dec 31 23:59:58", jan, UTC) == datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp()
    assert postfix_time("Jan  1 00:00:01", jan, UTC) == datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    # an epoch hint works the same; a int hint is taken literally
    assert postfix_time("Dec 31 23:59:58", jan.timestamp(), UTC) == datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp()
    assert postfix_time("Dec 31 23:59:58", 2027, UTC) == datetime(2027, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp()
    # replaying an old log months later gives last year's date, not a future one
    march = datetime(2027, 3, 1, tzinfo=UTC)
    assert postfix_time("Nov 25 08:19:50", march, UTC) == T0


def test_leap_day_needs_a_leap_year():
    assert postfix_time("Feb 29 12:00:00", 2028, UTC) == datetime(2028, 2, 29, 12, tzinfo=UTC).timestamp()
    assert postfix_time("Feb 29 12:00:00", 2027, UTC) is None


def test_iso_timestamps_in_all_offsets():
    for text in ("2026-11-25T08:19:50Z", "2026-11-25T08:19:50+0000", "2026-11-25T08:19:50+00:00", "2026-11-25T03:19:50-0500"):
        assert postfix_time(text, 1999, UTC) == T0
    assert postfix_time("2026-11-25T08:19:50", 1999, UTC) == T0  # no offset: tz applies
    assert postfix_time("2026-11-25T08:19:50.123456789Z", 1999, UTC) == pytest.approx(T0 + 0.123456)


@pytest.mark.parametrize(
    "status,text,code",
    [
        ("sent", "250 2.0.0 Ok: queued as 4Y", "250"),
        ("deferred", "host h[1.2.3.4] said: 451 4.3.0 try later (in reply to end of DATA command)", "451"),
        ("bounced", "host h[1.2.3.4] said: 550-5.1.1 no such user (in reply to RCPT TO command)", "550"),
        ("deferred", "host h[1.2.3.4] refused to talk to me: 421 4.7.0 busy", "421"),
        ("deferred", "connect to h[1.2.3.4]:25: Connection refused", None),
        ("deferred", "delivery temporarily suspended: connect to h: Connection timed out", None),
        ("sent", "", None),
    ],
)
def test_response_code(status, text, code):
    assert response_code(status, text) == code


# -- milter ------------------------------------------------------------------------


def test_milter_samples():
    lines = (DATA / "milter.log.sample").read_text(encoding="utf-8").splitlines()
    records = [parse_milter(line) for line in lines]
    assert [r.event for r in records] == ["config", "start", "accepted", "accepted", "accepted", "accepted", "reject", "reject"]
    acme = records[2]
    assert acme.ts == datetime(2026, 12, 1, 15, 4, 3, tzinfo=UTC).timestamp()
    assert acme.level == "INFO" and acme.queue_id == "00FBD166A17"
    assert acme.get("tenant") == "acme" and acme.get("sender") == "news@acme.example"
    assert acme.get("message_id") == "<two-recipients-over-TLS@platform.example>"
    assert acme.get("upstream_id") == "job-two-recipients-over-TLS"
    assert acme.rcpts == ["alice@example.org", "bob@example.net"]
    assert acme.orig_rcpts == ["alice=example.org@acme.relay.test", "bob=example.net@acme.relay.test"]
    assert acme.get("dkim") == "pass d=hop.acme.test s=s1 a=rsa-sha256 key=pinned" and not acme.truncated
    eom, rcpt = records[6], records[7]
    assert (eom.level, eom.queue_id, eom.get("stage"), eom.get("code"), eom.get("dsn")) == ("WARNING", "1BC7D166A43", "eom", "550", "5.7.20")
    assert eom.get("reason") == "DKIM verification failed: message has no DKIM signature"
    assert (rcpt.queue_id, rcpt.get("stage"), rcpt.get("rcpt")) == (None, "rcpt", "<no-separator@globex.relay.test>")
    assert records[0].queue_id is None and records[0].get("tenants") == "acme,globex"


def test_milter_accepted_with_upstream_id_and_original_recipients():
    line = (
        '2026-11-25T08:19:50+0000 relay.milter[3344]: INFO 89037160377: event=accepted tenant=acme '
        'route=relay_acme:[127.0.0.1]:57681 client=127.0.0.1 sender=news@acme.example message_id=<m@x> '
        'upstream_id="job 42 \\"q\\"" rcpts=<alice@example.org>,<bob@example.net> '
        'orig_rcpts=<alice=example.org@acme.relay.test>,<bob=example.net@acme.relay.test>'
    )
    record = parse_milter(line)
    assert record.get("upstream_id") == 'job 42 "q"'
    assert record.rcpts == ["alice@example.org", "bob@example.net"]
    assert record.orig_rcpts == ["alice=example.org@acme.relay.test", "bob=example.net@acme.relay.test"]
    assert not record.truncated


def test_milter_truncated_recipient_list_is_flagged():
    rcpts = ",".join(f"<user{i}@example.org>" for i in range(40))
    from relay_milter.logs import logfmt_value

    line = f"2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=accepted rcpts={logfmt_value(rcpts)}"
    record = parse_milter(line)
    assert record.truncated
    assert 0 < len(record.rcpts) < 40 and all(r.startswith("user") and r.endswith("@example.org") for r in record.rcpts)


@pytest.mark.parametrize(
    "value",
    ["plain", "with space", 'quo"te', "back\\slash", "new\nline", "tab\tx", "ümlaut", "", "x" * 600, 'end\\"'],
)
def test_logfmt_round_trip_with_the_milters_own_quoting(value):
    from relay_milter.logs import logfmt_value

    encoded = logfmt_value(value)
    parsed = parse_logfmt(f"a={encoded} b=1")
    expected = value.encode("ascii", "backslashreplace").decode().replace("\n", "\\n").replace("\t", "\\t")
    if len(expected) > 512:
        expected = expected[:509] + "..."
    assert parsed == {"a": expected, "b": "1"}


@pytest.mark.parametrize(
    "line",
    [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: no fields here",
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=accepted tenant=a tenant=b",
        '2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=accepted tenant="unterminated',
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=accepted tenant=a  x=1",
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=",
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO warning: event=accepted",
        "Nov 25 08:19:50 relay.milter[1]: INFO 89037160377: event=accepted",
        "2026-11-25T08:19:50+0000 relay.milter[1]: INFO 89037160377: event=accepted x=\x00",
    ],
)
def test_hostile_milter_lines(line):
    assert parse_milter(line) is None
