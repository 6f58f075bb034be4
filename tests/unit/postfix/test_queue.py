"""Operator views without a running Postfix: queue attribution and summary from real
`postqueue -j` output (tests/data/postqueue-j.jsonl, captured from a lab whose smarthosts
answered 451), reason folding, time parsing, the Prometheus textfile, and the store-backed
commands (trace, stats) against a real SQLite event store."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from relay_milter.tracking import store as eventstore
from relay_milter.tracking import metrics
from relay_milter.postfix import queue as ops
from relay_milter.cli.app import main
from relay_milter.cli.formats import human_age, parse_when, trace_table
from relay_milter.config import load_tenants
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.webhooks import record_event
from support.factories import tenant_doc, write_tenants
from support.paths import DATA

DATA = DATA / "postqueue-j.jsonl"
ARRIVAL = 1795595007  # the first five messages of the sample arrived then; three more 269 s later
NOW = ARRIVAL + 3600
R451 = "host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command)"


@pytest.fixture
def tenants_dir(tmp_path: Path) -> Path:
    return write_tenants(tmp_path / "tenants", [tenant_doc("acme", headers={"envelope_sender": "bounces@acme.example"}), tenant_doc("globex")])


@pytest.fixture
def tenants(tenants_dir):
    return load_tenants(tenants_dir)


def sample() -> list[ops.QueuedMessage]:
    return list(ops.parse_postqueue_json(DATA.read_text().splitlines()))


# -- queue ------------------------------------------------------------------------------------


def test_attribution_by_sender_domain_null_sender_and_unknown(tenants):
    by_id = {m.queue_id: m.tenant for m in ops.attribute(sample(), tenants)}
    assert by_id == {
        "99A7616006C": "globex",
        "9EB2A160074": "globex",
        "C131B160303": "globex",
        "94F7016006B": "acme",  # envelope sender rewritten to bounces@acme.example
        "C675416007B": "acme",
        "9114516006A": "acme",
        "BDE82160301": "acme",  # MAILER-DAEMON to news@acme.example: a bounce for acme
        "BFE38160082": "-",  # someone@stray.example belongs to nobody
    }


def test_queue_summary_golden_table(tenants):
    rows = ops.queue_summary(ops.attribute(sample(), tenants), NOW)
    assert [r.to_json() for r in rows] == [
        {
            "tenant": "acme",
            "total": 4,
            "queues": {"active": 0, "deferred": 3, "hold": 1, "incoming": 0, "maildrop": 0},
            "oldest_age_seconds": 3600.0,
            "oldest_deferred_age_seconds": 3600.0,
            "top_deferral_reasons": [{"reason": R451, "messages": 2}, {"reason": "deferred transport", "messages": 1}],
        },
        {
            "tenant": "globex",
            "total": 3,
            "queues": {"active": 0, "deferred": 3, "hold": 0, "incoming": 0, "maildrop": 0},
            "oldest_age_seconds": 3600.0,
            "oldest_deferred_age_seconds": 3600.0,
            "top_deferral_reasons": [{"reason": R451, "messages": 2}, {"reason": "deferred transport", "messages": 1}],
        },
        {
            "tenant": "-",
            "total": 1,
            "queues": {"active": 0, "deferred": 1, "hold": 0, "incoming": 0, "maildrop": 0},
            "oldest_age_seconds": 3331.0,
            "oldest_deferred_age_seconds": 3331.0,
            "top_deferral_reasons": [{"reason": R451, "messages": 1}],
        },
    ]


def test_top_reasons_are_capped_and_counted_once_per_message():
    def msg(qid: str, reasons: list[str]) -> ops.QueuedMessage:
        rcpts = [{"address": f"r{i}@example.org", "delay_reason": r} for i, r in enumerate(reasons)]
        return ops.QueuedMessage(qid, "deferred", ARRIVAL, 1, "a@acme.example", rcpts, tenant="acme")

    queue = [
        msg("A1", ["host h[1.1.1.1] said: 452 4.2.2 <x@example.org> mailbox full"] * 2),
        msg("A2", ["host h[1.1.1.1] said: 452 4.2.2 <y@example.org> mailbox full"]),
        msg("A3", ["connect to h[1.1.1.1]:25: Connection refused"]),
        msg("A4", ["lost connection with h[1.1.1.1] while sending RCPT TO"]),
        msg("A5", ["conversation with h[1.1.1.1] timed out while receiving the initial server greeting"]),
    ]
    [row] = ops.queue_summary(queue, NOW)
    assert row.reasons == [
        ("host h[1.1.1.1] said: 452 4.2.2 <addr> mailbox full", 2),
        ("connect to h[1.1.1.1]:25: Connection refused", 1),
        ("conversation with h[1.1.1.1] timed out while receiving the initial server greeting", 1),
    ]


@pytest.mark.parametrize(
    "raw, folded",
    [
        (R451, R451),
        ("connect to 127.0.0.1[127.0.0.1]:2525: Connection refused", "connect to 127.0.0.1[127.0.0.1]:2525: Connection refused"),
        (
            "host mx1-eu.example.com[10.0.0.1]:25 said: 452 4.2.2 <alice@example.org>: Mailbox full, "
            "ticket 8D578160069XY, retry in 300 seconds (in reply to RCPT TO command)",
            "host mx1-eu.example.com[10.0.0.1]:25 said: 452 4.2.2 <addr>: Mailbox full, "
            "ticket <id>, retry in 300 seconds (in reply to RCPT TO command)",
        ),
        ("host x[1.2.3.4] said: 250 2.0.0 Ok: queued as 4Q7ZxM0Yz3z9sL size 123456", "host x[1.2.3.4] said: 250 2.0.0 Ok: queued as <id> size <n>"),
        (
            "Host or domain name not found. Name service error for name=mx9-abc1.example.com type=MX: Host not found, try again",
            "Host or domain name not found. Name service error for name=mx9-abc1.example.com type=MX: Host not found, try again",
        ),
        ("rate limited for bob@example.net until 1795595007", "rate limited for <addr> until <n>"),
        ("  spaces\n and   newlines  ", "spaces and newlines"),
    ],
)
def test_normalise_reason(raw, folded):
    assert ops.normalise_reason(raw) == folded


def test_long_reasons_are_cut():
    assert len(ops.normalise_reason("x " * 300)) == 200


def test_select_by_tenant_and_queue(tenants):
    queue = ops.attribute(sample(), tenants)
    assert ops.select(queue, "acme") == ["94F7016006B", "BDE82160301", "C675416007B", "9114516006A"]
    assert ops.select(queue, "acme", ["hold"]) == ["9114516006A"]
    assert ops.select(queue, "-", ["deferred"]) == ["BFE38160082"]
    assert ops.select(queue, "globex", ["hold"]) == []


def test_unreadable_postqueue_line_is_an_error_naming_the_line():
    with pytest.raises(ops.OpsError, match="line 2"):
        list(ops.parse_postqueue_json(['{"queue_id": "A", "queue_name": "deferred"}', "not json"]))


def test_postsuper_tally_is_read_from_its_own_summary_lines():
    err = "postsuper: 8D578160069: placed on hold\npostsuper: Placed on hold: 1 message\n"
    assert ops.changed_count(err, "Placed on hold") == 1
    assert ops.changed_count("postsuper: Requeued: 1500 messages\n", "Requeued") == 1500
    assert ops.changed_count("postsuper: Released from hold: 0 messages\n", "Released from hold") == 0


@pytest.mark.parametrize("action", ["delete", "requeue"])  # postsuper -r would drop the tenant route
def test_postsuper_actions_are_only_hold_and_release(action):
    with pytest.raises(ValueError, match="unknown action"):
        ops.apply_postsuper("/etc/postfix", action, ["A"])


def test_store_state_wins_over_the_sender_domain(tenants, tmp_path):
    store = eventstore.open_store(f"sqlite:///{tmp_path}/events.db")
    with store.transaction() as tx:
        tx.put_state("relay1", "BFE38160082", {"tenant": "globex"})  # the stray sender's message
        tx.put_state("relay1", "94F7016006B", {"tenant": "globex"})
        tx.put_state("relay2", "99A7616006C", {"tenant": "acme"})  # another node's queue id
    by_id = {m.queue_id: m.tenant for m in ops.attribute(sample(), tenants, store, "relay1")}
    store.close()
    assert by_id["BFE38160082"] == "globex"
    assert by_id["94F7016006B"] == "globex"
    assert by_id["99A7616006C"] == "globex"  # from its sender: relay2's state does not apply


# -- time and table helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("now", NOW),
        ("90s", NOW - 90),
        ("15m", NOW - 900),
        ("24h", NOW - 86400),
        ("7d", NOW - 7 * 86400),
        ("2w", NOW - 14 * 86400),
        ("2026-11-25T08:00:00Z", 1795593600),
        ("2026-11-25T09:00:00+01:00", 1795593600),
        ("2026-11-25 08:00", 1795593600),  # no zone: UTC
        ("2026-11-25", 1795564800),
    ],
)
def test_parse_when(text, expected):
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "15", "-5m", "3x", "2026-13-01"])
def test_parse_when_rejects(text):
    with pytest.raises(ValueError, match="duration like 15m"):
        parse_when(text, NOW)


@pytest.mark.parametrize("secs, text", [(None, "-"), (0, "0s"), (59.9, "59s"), (125, "2m05s"), (3 * 3600 + 7 * 60, "3h07m"), (2 * 86400 + 4 * 3600, "2d04h")])
def test_human_age(secs, text):
    assert human_age(secs) == text


# -- metrics ----------------------------------------------------------------------------------

GOLDEN = """\
# HELP relay_events_total Delivery events recorded by the tracker, by tenant and event kind.
# TYPE relay_events_total counter
relay_events_total{tenant="-",event="REJECTED"} 4
relay_events_total{tenant="a\\"b\\\\c\\nd",event="BOUNCED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="CLICKED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="COMPLAINED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="DEFERRED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="DELAYED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="OPENED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="RECEIVED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="REJECTED"} 0
relay_events_total{tenant="a\\"b\\\\c\\nd",event="RELAYED"} 0
relay_events_total{tenant="acme",event="BOUNCED"} 0
relay_events_total{tenant="acme",event="CLICKED"} 0
relay_events_total{tenant="acme",event="COMPLAINED"} 0
relay_events_total{tenant="acme",event="DEFERRED"} 2
relay_events_total{tenant="acme",event="DELAYED"} 0
relay_events_total{tenant="acme",event="OPENED"} 0
relay_events_total{tenant="acme",event="RECEIVED"} 7
relay_events_total{tenant="acme",event="REJECTED"} 0
relay_events_total{tenant="acme",event="RELAYED"} 5
# HELP relay_queue_messages Messages in the Postfix queue, by tenant and queue.
# TYPE relay_queue_messages gauge
relay_queue_messages{tenant="-",queue="active"} 0
relay_queue_messages{tenant="-",queue="deferred"} 1
relay_queue_messages{tenant="-",queue="hold"} 0
relay_queue_messages{tenant="-",queue="incoming"} 0
relay_queue_messages{tenant="-",queue="maildrop"} 0
relay_queue_messages{tenant="a\\"b\\\\c\\nd",queue="active"} 0
relay_queue_messages{tenant="a\\"b\\\\c\\nd",queue="deferred"} 0
relay_queue_messages{tenant="a\\"b\\\\c\\nd",queue="hold"} 0
relay_queue_messages{tenant="a\\"b\\\\c\\nd",queue="incoming"} 0
relay_queue_messages{tenant="a\\"b\\\\c\\nd",queue="maildrop"} 0
relay_queue_messages{tenant="acme",queue="active"} 0
relay_queue_messages{tenant="acme",queue="deferred"} 3
relay_queue_messages{tenant="acme",queue="hold"} 1
relay_queue_messages{tenant="acme",queue="incoming"} 0
relay_queue_messages{tenant="acme",queue="maildrop"} 0
# HELP relay_queue_oldest_deferred_seconds Age of the tenant's oldest deferred message in seconds (0 when none is deferred).
# TYPE relay_queue_oldest_deferred_seconds gauge
relay_queue_oldest_deferred_seconds{tenant="-"} 3331
relay_queue_oldest_deferred_seconds{tenant="a\\"b\\\\c\\nd"} 0
relay_queue_oldest_deferred_seconds{tenant="acme"} 3600
# HELP relay_webhook_backlog Webhook notifications not yet delivered, by tenant.
# TYPE relay_webhook_backlog gauge
relay_webhook_backlog{tenant="a\\"b\\\\c\\nd"} 0
relay_webhook_backlog{tenant="acme"} 12
# HELP relay_tracker_last_run_timestamp_seconds Unix time of the tracker's last committed batch.
# TYPE relay_tracker_last_run_timestamp_seconds gauge
relay_tracker_last_run_timestamp_seconds 1795595007.25
"""


def test_metrics_golden_text_with_escaping(tenants):
    rows = [r for r in ops.queue_summary(ops.attribute(sample(), tenants), NOW) if r.tenant != "globex"]
    snap = metrics.Snapshot(
        tenants=("acme", 'a"b\\c\nd'),  # not a valid tenant id: exercises label escaping
        event_counts={("acme", "RECEIVED"): 7, ("acme", "RELAYED"): 5, ("acme", "DEFERRED"): 2, ("-", "REJECTED"): 4},
        queue=rows,
        webhook_backlog={"acme": 12},
        tracker_last_run=1795595007.25,
    )
    assert metrics.render(snap) == GOLDEN


def test_metrics_leave_out_what_was_not_collected():
    text = metrics.render(metrics.Snapshot(tenants=("acme",), tracker_last_run=1795595007))
    assert text == (
        "# HELP relay_tracker_last_run_timestamp_seconds Unix time of the tracker's last committed batch.\n"
        "# TYPE relay_tracker_last_run_timestamp_seconds gauge\n"
        "relay_tracker_last_run_timestamp_seconds 1795595007\n"
    )
    assert metrics.render(metrics.Snapshot()) == ""


def test_help_text_escaping():
    assert metrics.escape_help('a\\b\n"c"') == 'a\\\\b\\n"c"'


def test_textfile_is_replaced_atomically_with_mode_0644(tmp_path):
    target = tmp_path / "relay.prom"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    old_umask = os.umask(0o077)  # a restrictive umask must not make the file unreadable to node-exporter
    try:
        metrics.write_textfile(target, "new 1\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.prom"]  # no temp file left


def test_textfile_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "relay.prom"
    target.write_text("old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    from relay_milter import files  # the one atomic writer metrics.write_textfile uses

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        metrics.write_textfile(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["relay.prom"]


def test_collect_reads_the_real_store(tmp_path, tenants):
    store = eventstore.open_store(f"sqlite:///{tmp_path}/events.db")
    with store.transaction() as tx:
        tx.add_event(Event(Kind.RECEIVED, ARRIVAL, "relay1", tenant="acme", queue_id="Q1", recipient="a@example.org"))
        record_event(tx, Event(Kind.DEFERRED, ARRIVAL + 1, "relay1", tenant="acme", queue_id="Q1", recipient="a@example.org"), webhook=True)
        tx.add_event(Event(Kind.REJECTED, ARRIVAL + 2, "relay1", recipient="x@example.org"))
    snap = metrics.collect(["acme", "globex"], store, queue=None)
    store.close()
    text = metrics.render(snap)
    assert 'relay_events_total{tenant="acme",event="DEFERRED"} 1\n' in text
    assert 'relay_events_total{tenant="-",event="REJECTED"} 1\n' in text
    assert 'relay_events_total{tenant="globex",event="RELAYED"} 0\n' in text
    assert 'relay_webhook_backlog{tenant="acme"} 1\n' in text
    assert 'relay_webhook_backlog{tenant="globex"} 0\n' in text
    assert "relay_queue_messages" not in text


# -- store-backed commands --------------------------------------------------------------------

TLS = {"requested": "verify", "established": True, "level": "Verified", "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}


def fill(store) -> None:
    """One message to two recipients: received, one deferred then relayed, one relayed; a reject."""
    common = dict(node="relay1", tenant="acme", queue_id="89037160377", message_id="<m1@platform.example>", sender="news@acme.example")
    with store.transaction() as tx:
        for rcpt in ("alice@example.org", "bob@example.net"):
            tx.add_event(Event(Kind.RECEIVED, ARRIVAL, recipient=rcpt, client="localhost[127.0.0.1]", **common))
        tx.add_event(
            Event(
                Kind.DEFERRED, ARRIVAL + 1, recipient="bob@example.net", relay="127.0.0.1[127.0.0.1]:2525",
                response_code="451", dsn="4.3.0", reason="deferred (host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later)",
                next_retry=ARRIVAL + 301, **common,
            )
        )
        for rcpt, ts in (("alice@example.org", ARRIVAL + 1), ("bob@example.net", ARRIVAL + 400)):
            record_event(
                tx,
                Event(
                    Kind.RELAYED, ts, recipient=rcpt, relay="127.0.0.1[127.0.0.1]:2525", response_code="250", dsn="2.0.0",
                    reason="sent (250 2.0.0 Ok: queued as 4Q7Z)", tls=TLS, **common,
                ),
                webhook=True,
            )
        tx.add_event(Event(Kind.REJECTED, ARRIVAL + 5, "relay1", tenant="globex", recipient="x@example.org", response_code="550", dsn="5.7.1"))


@pytest.fixture
def env(tmp_path, tenants_dir):
    db = tmp_path / "events.db"
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({"tracking": {"events_dsn": f"sqlite:///{db}", "node": "relay1"}}))
    store = eventstore.open_store(f"sqlite:///{db}")
    fill(store)
    store.close()

    def run(*args: str):
        return CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), *args])

    return run


def test_trace_by_message_id_lists_every_event_aligned(env):
    r = env("trace", "m1@platform.example")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["TIME", "TENANT", "QUEUE", "ID", "EVENT", "RECIPIENT", "RELAY", "CODE", "TLS", "REASON"]
    assert [ln.split()[3] for ln in lines[1:]] == ["RECEIVED", "RECEIVED", "DEFERRED", "RELAYED", "RELAYED"]
    assert lines[3].startswith("2026-11-25T08:23:28Z")
    assert "451 4.3.0" in lines[3] and lines[3].endswith("deferred (host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later)")
    assert "TLSv1.3 TLS_AES_256_GCM_SHA384" in lines[4]
    assert len({ln.index("EVENT" if i == 0 else ln.split()[3]) for i, ln in enumerate(lines)}) == 1  # aligned


def test_trace_json_and_queue_id_key(env):
    r = env("trace", "89037160377", "--json")
    assert r.exit_code == 0, r.output
    events = json.loads(r.output)
    assert [e["kind"] for e in events] == ["RECEIVED", "RECEIVED", "DEFERRED", "RELAYED", "RELAYED"]
    assert events[2]["next_retry"] == "2026-11-25T08:28:28.000Z"


def test_trace_of_unknown_key_exits_1(env):
    r = env("trace", "<nothing@example>")
    assert r.exit_code == 1
    assert "nothing recorded for <nothing@example>" in r.output


def test_trace_table_marks_tls_not_established():
    ev = Event(Kind.RELAYED, ARRIVAL, "n", recipient="a@b.c", tls={"requested": "may", "established": False})
    assert trace_table([ev])[1].split()[7] == "none"


def test_stats_counts_in_window_with_backlog(env):
    r = env("stats", "--since", "2026-11-25T08:00:00Z", "--until", "2026-11-25T08:30:00Z", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["since"] == "2026-11-25T08:00:00.000Z"
    assert out["tenants"]["acme"] == {"RECEIVED": 2, "RELAYED": 1, "DEFERRED": 1, "BOUNCED": 0, "REJECTED": 0,
                                      "OPENED": 0, "CLICKED": 0, "DELAYED": 0, "COMPLAINED": 0,
                                      "webhook_backlog": 2}
    assert out["tenants"]["globex"]["REJECTED"] == 1
    r = env("stats", "--since", "2026-11-25T08:00:00Z", "--until", "2026-11-25T08:30:00Z", "--tenant", "acme")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[2].split() == ["acme", "2", "1", "1", "0", "0", "0", "0", "0", "0", "2"]  # ... OPENED CLICKED DELAYED COMPLAINED BACKLOG
    assert len(r.output.splitlines()) == 3


def test_stats_rejects_bad_times_and_unknown_tenants(env):
    r = env("stats", "--since", "yesterday")
    assert r.exit_code == 2 and "duration like 15m" in r.output
    r = env("stats", "--since", "1h", "--until", "2h")
    assert r.exit_code == 2 and "must be before" in r.output
    r = env("stats", "--tenant", "initech")
    assert r.exit_code == 3 and "unknown tenant 'initech'" in r.output


def test_missing_store_is_unavailable_not_created(tmp_path, tenants_dir):
    settings = tmp_path / "relay.yaml"
    db = tmp_path / "nowhere" / "events.db"
    settings.write_text(yaml.safe_dump({"tracking": {"events_dsn": f"sqlite:///{db}"}}))
    for args in (["trace", "x"], ["stats"]):
        r = CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), *args])
        assert r.exit_code == 4, r.output
        assert f"event store {db} does not exist" in r.output
    assert not db.parent.exists()
