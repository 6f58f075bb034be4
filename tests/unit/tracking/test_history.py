"""Per-tenant sequence numbers, pulling from a cursor (relayctl events), replays (relayctl
webhooks replay) and trace by upstream id, --since and --limit."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from relay_milter.cli import main
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import WebhookSender, record_event, replay, verify_signature
from support.factories import tenant_doc, write_tenants
from support.webhook_receiver import WebhookReceiver

from .test_webhooks import SECRETS, SETTINGS, Clock, T0, store, tenant, tenant_set  # noqa: F401 - fixture

TENANTS = ("acme", "globex")


def add(s, tenant_id: str | None, n: int, start: float = 0, **kw) -> list[Event]:
    events = [Event(Kind.RECEIVED, T0 + start + i, kw.pop("node", "relay1"), tenant=tenant_id, queue_id=f"Q{tenant_id}{start + i:g}",
                    recipient=f"r{i}@example.org", **kw) for i in range(n)]
    with s.transaction() as tx:
        for e in events:
            record_event(tx, e, webhook=tenant_id is not None)
    return events


def test_every_event_of_a_tenant_gets_the_next_sequence_number(store):
    a1 = add(store, "acme", 3)
    g = add(store, "globex", 2, start=10)
    a2 = add(store, "acme", 2, start=20, node="relay2")  # another node: the same sequence
    none = add(store, None, 1, start=30)
    assert [e.seq for e in a1 + a2] == [1, 2, 3, 4, 5]
    assert [e.seq for e in g] == [1, 2]
    assert none[0].seq is None
    assert [e.seq for e in store.events_after("acme", 3)] == [4, 5]
    assert [e.seq for e in store.events_after("acme", 0, limit=2)] == [1, 2]
    assert store.events_after("acme", 5) == []
    assert store.first_seq_since("acme", T0 + 2) == 3
    # the payload carries it
    [body] = store._query("SELECT payload FROM outbox WHERE event_id = ?", [a2[0].id])[0].values()
    assert json.loads(body)["notifications"][0]["meta"]["seq"] == 4


def test_replay_resends_marked_and_signed_after_the_pending_rows(store):
    events = add(store, "acme", 3)
    with WebhookReceiver() as rx:
        clock = Clock(T0 + 100)
        with WebhookSender(store, tenant_set(tenant("acme", rx.url)), SECRETS, SETTINGS, clock=clock) as s:
            assert s.run_once() == 3
            assert replay(store, "acme", after=1) == 2  # seq 2 and 3 again
            clock.t = 2e9  # replays are due when queued (wall clock)
            assert s.run_once() == 2
        first, again = rx.requests[:3], rx.requests[3:]
    assert [r.event_id for r in again] == [e.id for e in events[1:]]
    for original, replayed in zip(first[1:], again):
        assert replayed.headers["X-Relay-Replay"] == "1" and "X-Relay-Replay" not in original.headers
        assert replayed.json["meta"]["replay"] is True and "replay" not in original.json["meta"]
        assert replayed.json["notifications"] == original.json["notifications"]
        assert replayed.headers["webhook-id"] != original.headers["webhook-id"]
        assert verify_signature(SECRETS["acme"].webhook_secret, replayed.headers["X-Relay-Signature"], replayed.body, now=clock.t)


def test_trace_by_upstream_id_since_and_limit(store):
    with store.transaction() as tx:
        for i, (qid, up) in enumerate([("Q1", "up-1"), ("Q2", "up-2"), ("Q3", "up-1")]):
            record_event(tx, Event(Kind.RECEIVED, T0 + i * 100, "relay1", tenant="acme", queue_id=qid, upstream_id=up,
                                   recipient="bob@example.org"))
            record_event(tx, Event(Kind.RELAYED, T0 + i * 100 + 1, "relay1", tenant="acme", queue_id=qid, upstream_id=up,
                                   recipient="bob@example.org", delay=1.5, delays="0.1/0/0.4/1"))
    assert [e.queue_id for e in store.trace("up-1")] == ["Q1", "Q1", "Q3", "Q3"]
    assert [e.queue_id for e in store.trace("up-1", since=T0 + 50)] == ["Q3", "Q3"]
    assert {e.queue_id for e in store.trace("bob@example.org", limit=2)} == {"Q3"}
    relayed = [e for e in store.trace("Q2") if e.kind is Kind.RELAYED]
    assert [(e.delay, e.delays) for e in relayed] == [(1.5, "0.1/0/0.4/1")]


@pytest.fixture
def cli(tmp_path):
    db = tmp_path / "events.db"
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({"tracking": {"events_dsn": f"sqlite:///{db}", "node": "relay1"}}))
    tenants_dir = write_tenants(tmp_path / "tenants", [tenant_doc(t) for t in TENANTS])
    s = open_store(f"sqlite:///{db}")
    add(s, "acme", 5)
    add(s, "globex", 1, start=50)

    def run(*args: str):
        return CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), *args])

    run.store = s
    yield run
    s.close()


def test_events_command_prints_from_the_cursor(cli):
    r = cli("events", "--tenant", "acme", "--after", "3", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [(e["seq"], e["tenant"], e["kind"]) for e in lines] == [(4, "acme", "RECEIVED"), (5, "acme", "RECEIVED")]
    table = cli("events", "--tenant", "acme", "--after", "4").output.splitlines()
    assert table[0].split()[:3] == ["SEQ", "TIME", "TENANT"] and table[1].split()[0] == "5"
    r = cli("events", "--tenant", "acme", "--after", "5")
    assert r.exit_code == 1 and "no events of tenant acme after seq 5" in r.output


def test_webhooks_replay_command_queues_from_seq_or_time(cli):
    r = cli("webhooks", "replay", "--tenant", "acme", "--from", "4", "--yes")
    assert r.exit_code == 0, r.output
    assert "queued 2 event(s) of tenant acme for replay, from seq 4" in r.output
    rows = cli.store._query("SELECT event_id, replay FROM outbox WHERE replay = 1 ORDER BY id")
    assert [r["event_id"] for r in rows] == [e.id for e in cli.store.events_after("acme", 3)]
    r = cli("webhooks", "replay", "--tenant", "acme", "--from", "2026-11-18T11:06:43Z", "--yes")  # T0 + 3 s: seq 4
    assert r.exit_code == 0 and "from seq 4" in r.output, r.output
    assert cli("webhooks", "replay", "--tenant", "acme", "--from", "9", "--yes").exit_code == 1
    assert cli("webhooks", "replay", "--tenant", "nosuch", "--from", "1", "--yes").exit_code == 3
    assert cli("webhooks", "replay", "--tenant", "acme", "--from", "yesterday", "--yes").exit_code == 2
