"""The event store, the same tests on SQLite and on a real (private) PostgreSQL cluster."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from relay_milter.config import ConfigError
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import OutboxRow, Store, open_store, redact_dsn
from relay_milter.tracking.webhooks import record_event

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z
_dbs = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def dsn(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/events.db"
    from support.pgcluster import create_database

    return create_database(request.getfixturevalue("pg_dsn"), f"t{next(_dbs)}")


@pytest.fixture
def store(dsn):
    s = open_store(dsn)
    yield s
    s.close()


def ev(kind: Kind, ts: float, **kw) -> Event:
    kw.setdefault("node", "relay1")
    kw.setdefault("tenant", "acme")
    return Event(kind, T0 + ts, **kw)


def add(store: Store, *events: Event, webhook: bool = False) -> list[int]:
    with store.transaction() as tx:
        return [record_event(tx, e, webhook=webhook) for e in events]


def message(qid: str, msgid: str, rcpts: list[str], t: float = 0, node: str = "relay1", tenant: str = "acme") -> list[Event]:
    """RECEIVED then RELAYED for each recipient, as the tracker records a relayed message."""
    common = dict(node=node, tenant=tenant, queue_id=qid, message_id=msgid, sender="news@acme.example")
    out = [ev(Kind.RECEIVED, t, recipient=r, original_recipient=r.replace("@", "=") + "@acme.relay.test", **common) for r in rcpts]
    out += [ev(Kind.RELAYED, t + 1, recipient=r, response_code="250", dsn="2.0.0", **common) for r in rcpts]
    return out


# -- events ---------------------------------------------------------------------------


def test_event_round_trip_keeps_every_field(store):
    full = ev(
        Kind.DEFERRED, 5.25, queue_id="89037160377", message_id="<m1@acme.example>", upstream_id="up-1",
        sender="news@acme.example", recipient="alice@example.org", original_recipient="alice=example.org@acme.relay.test",
        relay="127.0.0.1[127.0.0.1]:2525", response_code="451", dsn="4.3.0", reason="deferred (451 4.3.0 try later)",
        tls={"requested": "verify", "established": True, "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        next_retry=T0 + 305.5, size=1091, client="localhost[127.0.0.1]",
    )
    [eid] = add(store, full)
    assert full.id == eid
    [back] = store.events()
    assert back == full
    assert isinstance(back.kind, Kind) and back.tls["established"] is True


def test_events_filters(store):
    add(store, *message("Q1", "<m1@acme.example>", ["alice@example.org", "bob@example.org"]))
    add(store, *message("Q2", "<m2@globex.example>", ["carol@example.net"], t=10, tenant="globex"))
    add(store, ev(Kind.REJECTED, 20, tenant=None, recipient="x@nowhere.test", response_code="550"))

    assert [e.id for e in store.events()] == sorted(e.id for e in store.events())
    assert len(store.events()) == 7
    assert {e.queue_id for e in store.events(tenant="globex")} == {"Q2"}
    assert len(store.events(queue_id="Q1")) == 4
    # Message-ID with or without the brackets.
    assert len(store.events(message_id="<m1@acme.example>")) == 4
    assert len(store.events(message_id="m1@acme.example")) == 4
    # Decoded or encoded recipient.
    assert [e.kind for e in store.events(recipient="alice@example.org")] == [Kind.RECEIVED, Kind.RELAYED]
    assert [e.kind for e in store.events(recipient="alice=example.org@acme.relay.test")] == [Kind.RECEIVED]
    # since inclusive, until exclusive.
    assert {e.queue_id for e in store.events(since=T0 + 10, until=T0 + 20)} == {"Q2"}
    assert [e.kind for e in store.events(kinds=[Kind.REJECTED])] == [Kind.REJECTED]
    assert store.events(kinds=[]) == []
    assert len(store.events(kinds=["RECEIVED", Kind.RELAYED], tenant="acme")) == 4
    first = store.events(limit=2)
    assert [e.id for e in first] == [e.id for e in store.events()][:2]


def test_trace_by_each_key(store):
    m1 = message("Q1", "<m1@acme.example>", ["alice@example.org", "bob@example.org"])
    # The same queue id on another node is another message (queue ids are per node).
    other = message("Q1", "<other@acme.example>", ["dave@example.org"], t=50, node="relay2")
    m3 = message("Q3", "<m3@acme.example>", ["alice@example.org"], t=100)
    # A rejection without queue id or Message-ID, for alice.
    reject = ev(Kind.REJECTED, 200, recipient="alice@example.org", response_code="550", client="localhost[127.0.0.1]")
    add(store, *m1, *other, *m3, reject)

    def keys(events):
        return [(e.node, e.queue_id, e.recipient, e.kind) for e in events]

    by_msgid = store.trace("<m1@acme.example>")
    assert keys(by_msgid) == keys(m1)  # ordered by ts, id
    assert keys(store.trace("m1@acme.example")) == keys(m1)
    # By queue id: every node's message with that id.
    assert keys(store.trace("Q1")) == keys(m1 + other)
    # By recipient: all events of all of alice's messages (bob's too), and the reject.
    assert keys(store.trace("alice@example.org")) == keys(m1 + m3 + [reject])
    assert keys(store.trace("alice=example.org@acme.relay.test")) == keys(m1 + m3)
    assert keys(store.trace("bob@example.org")) == keys(m1)
    assert store.trace("nobody@example.org") == []
    assert store.trace("  ") == []


def test_trace_follows_message_id_across_queue_ids(store):
    """A message refused at END-OF-MESSAGE has a Message-ID but no queue id; its retry
    was queued. Tracing the queue id shows the rejection too."""
    reject = ev(Kind.REJECTED, 0, message_id="<retry@acme.example>", recipient="alice@example.org", response_code="550")
    queued = message("Q9", "<retry@acme.example>", ["alice@example.org"], t=60)
    add(store, reject, *queued)
    assert [e.kind for e in store.trace("Q9")] == [Kind.REJECTED, Kind.RECEIVED, Kind.RELAYED]


def test_stats_windows_and_counts(store):
    add(store, *message("Q1", "<m1@x>", ["a@example.org", "b@example.org"], t=0))  # RECEIVED x2 @0, RELAYED x2 @1
    add(store, *message("Q2", "<m2@x>", ["c@example.org"], t=3600, tenant="globex"))
    add(store, ev(Kind.REJECTED, 3601, tenant=None))

    whole = store.stats(T0, T0 + 7200)
    assert whole["acme"] == {"RECEIVED": 2, "RELAYED": 2, "DEFERRED": 0, "BOUNCED": 0, "REJECTED": 0, "OPENED": 0, "CLICKED": 0, "DELAYED": 0, "COMPLAINED": 0}
    assert whole["globex"]["RECEIVED"] == 1 and whole["globex"]["RELAYED"] == 1
    assert whole["-"]["REJECTED"] == 1
    # Half-open windows: [T0, T0+1) has the RECEIVED only; T0+3600 belongs to the second hour.
    assert store.stats(T0, T0 + 1) == {"acme": {"RECEIVED": 2, "RELAYED": 0, "DEFERRED": 0, "BOUNCED": 0, "REJECTED": 0,
                                                "OPENED": 0, "CLICKED": 0, "DELAYED": 0, "COMPLAINED": 0}}
    assert set(store.stats(T0 + 3600, T0 + 7200)) == {"globex", "-"}
    assert store.stats(T0 + 10, T0 + 3600) == {}
    assert set(store.stats(T0, T0 + 7200, tenant="globex")) == {"globex"}

    assert store.event_counts() == {
        ("acme", "RECEIVED"): 2, ("acme", "RELAYED"): 2,
        ("globex", "RECEIVED"): 1, ("globex", "RELAYED"): 1, ("-", "REJECTED"): 1,
    }


# -- checkpoints and state --------------------------------------------------------------


def test_checkpoint_and_state_round_trip(store):
    with store.transaction() as tx:
        assert tx.get_checkpoint("relay1", "maillog") is None
        tx.set_checkpoint("relay1", "maillog", {"inode": 12, "offset": 345, "path": "/var/log/postfix.log"})
        tx.put_state("relay1", "Q1", {"tenant": "acme", "rcpts": ["a@example.org"]})
        tx.put_state("relay1", "Q2", {"tenant": "globex"})
    with store.transaction() as tx:
        assert tx.get_checkpoint("relay1", "maillog") == {"inode": 12, "offset": 345, "path": "/var/log/postfix.log"}
        tx.set_checkpoint("relay1", "maillog", {"inode": 12, "offset": 999, "path": "/var/log/postfix.log"})
        tx.put_state("relay1", "Q1", {"tenant": "acme", "rcpts": []})  # upsert
        tx.delete_state("relay1", "Q2")
        tx.delete_state("relay1", "nope")  # deleting what is not there is fine
    with store.transaction() as tx:
        assert tx.get_checkpoint("relay1", "maillog")["offset"] == 999
        assert tx.get_checkpoint("relay1", "milterlog") is None
        assert tx.get_state("relay1", "Q1") == {"tenant": "acme", "rcpts": []}
        assert tx.get_state("relay1", "Q2") is None
        assert tx.all_state("relay1") == {"Q1": {"tenant": "acme", "rcpts": []}}
        assert tx.all_state("relay2") == {}


def test_queue_tenants_from_state_then_events(store):
    add(store, *message("Q5", "<m5@x>", ["a@example.org"], tenant="globex"))
    with store.transaction() as tx:
        tx.put_state("relay1", "Q1", {"tenant": "acme"})
        tx.put_state("relay1", "Q2", {"stage": "no tenant yet"})
    assert store.queue_tenants("relay1", ["Q1", "Q2", "Q5", "Q404"]) == {"Q1": "acme", "Q5": "globex"}
    assert store.queue_tenants("relay2", ["Q1", "Q5"]) == {}
    assert store.queue_tenants("relay1", []) == {}


def test_rollback_on_exception_leaves_nothing(store):
    with store.transaction() as tx:
        tx.set_checkpoint("relay1", "maillog", {"inode": 1, "offset": 10, "path": "p"})

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.transaction() as tx:
            record_event(tx, ev(Kind.RECEIVED, 0, queue_id="Q1"), webhook=True)
            tx.set_checkpoint("relay1", "maillog", {"inode": 1, "offset": 20, "path": "p"})
            tx.put_state("relay1", "Q1", {"tenant": "acme"})
            raise Boom()
    assert store.events() == []
    assert store.outbox_backlog() == {}
    with store.transaction() as tx:
        assert tx.get_checkpoint("relay1", "maillog")["offset"] == 10
        assert tx.get_state("relay1", "Q1") is None
    # The store is usable afterwards.
    add(store, ev(Kind.RECEIVED, 1))
    assert len(store.events()) == 1


def test_reads_see_committed_data_only(store):
    with store.transaction() as tx:
        tx.add_event(ev(Kind.RECEIVED, 0))
        assert store.events() == []
    assert len(store.events()) == 1


def test_nested_transaction_is_refused(store):
    with store.transaction():
        with pytest.raises(RuntimeError, match="nested"):
            with store.transaction():
                pass


def test_readers_are_not_blocked_by_an_open_write(store):
    with store.transaction() as tx:
        tx.add_event(ev(Kind.RECEIVED, 0))
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(len(store.events())))
        reader.start()
        reader.join(5)
        assert not reader.is_alive() and seen == [0]


# -- outbox ---------------------------------------------------------------------------


def test_webhook_event_queues_its_payload(store):
    e = ev(Kind.RELAYED, 0, queue_id="Q1", message_id="<m@x>", recipient="a@example.org")
    [eid] = add(store, e, webhook=True)
    [row] = _due(store, T0)
    assert (row.tenant, row.event_id, row.attempts) == ("acme", eid, 0)
    body = json.loads(row.payload)
    assert body["notifications"][0]["meta"]["id"] == eid
    assert body["notifications"][0]["meta"]["event"]["type"] == "RELAYED"
    with pytest.raises(ValueError, match="needs a tenant"):
        add(store, ev(Kind.REJECTED, 0, tenant=None), webhook=True)


def _due(store: Store, now: float) -> list[OutboxRow]:
    with store.transaction() as tx:
        return tx.outbox_due(now)


def _ids(rows: list[OutboxRow]) -> list[tuple[str, int]]:
    return [(r.tenant, r.event_id) for r in rows]


def test_outbox_keeps_per_tenant_order(store):
    a1, a2, a3 = add(store, *(ev(Kind.RECEIVED, i, queue_id=f"A{i}") for i in range(3)), webhook=True)
    g1, g2 = add(store, *(ev(Kind.RECEIVED, 10 + i, tenant="globex") for i in range(2)), webhook=True)
    now = T0 + 100

    assert _ids(_due(store, now)) == [("acme", a1), ("globex", g1)]
    assert _due(store, T0 - 1) == []  # not due before the event happened
    # acme's head fails: it blocks acme's later rows, not globex.
    rows = _due(store, now)
    [head] = [r for r in rows if r.tenant == "acme"]
    [ghead] = [r for r in rows if r.tenant == "globex"]
    with store.transaction() as tx:
        tx.outbox_failed(head.id, now, "HTTP 500", now + 30)
        tx.outbox_done(ghead.id, now)
    assert _ids(_due(store, now)) == [("globex", g2)]
    assert _ids(_due(store, now + 29)) == [("globex", g2)]
    # Once due again, acme's head comes back (attempts counted), still before a2; heads
    # come oldest next_attempt first.
    rows = _due(store, now + 30)
    assert _ids(rows) == [("globex", g2), ("acme", a1)]
    [again] = [r for r in rows if r.tenant == "acme"]
    assert again.attempts == 1 and again.next_attempt == now + 30
    with store.transaction() as tx:
        tx.outbox_done(again.id, now + 30)
    assert ("acme", a2) in _ids(_due(store, now + 30))
    assert ("acme", a3) not in _ids(_due(store, now + 30))
    assert store.outbox_backlog() == {"acme": 2, "globex": 1}


def test_outbox_backlog_and_limit(store):
    add(store, *(ev(Kind.RECEIVED, i, tenant=t) for i, t in enumerate(["acme", "acme", "globex", "initech"])), webhook=True)
    add(store, ev(Kind.RECEIVED, 9, tenant="hooli"))  # no webhook: no outbox row
    assert store.outbox_backlog() == {"acme": 2, "globex": 1, "initech": 1}
    with store.transaction() as tx:
        assert [r.tenant for r in tx.outbox_due(T0 + 100, limit=2)] == ["acme", "globex"]  # oldest first
    with store.transaction() as tx:
        for row in tx.outbox_due(T0 + 100):
            tx.outbox_done(row.id, T0 + 100)
    assert store.outbox_backlog() == {"acme": 1}


def test_done_row_is_not_failed_later(store):
    [eid] = add(store, ev(Kind.RECEIVED, 0), webhook=True)
    [row] = _due(store, T0)
    with store.transaction() as tx:
        tx.outbox_done(row.id, T0)
        tx.outbox_failed(row.id, T0, "late failure report", T0 + 30)
    assert store.outbox_backlog() == {}


# -- opening, schema ------------------------------------------------------------------


def test_a_report_events_detail_round_trips_and_received_events_find_the_message(store):
    """Bounce tracking (issue 15 A): schema version 3's detail column, and the lookup the
    tracker makes for a report's original message."""
    add(store, ev(Kind.RECEIVED, 0, queue_id="Q9", recipient="a@example.org"), ev(Kind.RELAYED, 1, queue_id="Q9"))
    detail = {"async": True, "source": "rfc3464", "reportingMta": "mx.example.org"}
    add(store, ev(Kind.BOUNCED, 60, queue_id="Q9", recipient="a@example.org", detail=detail), webhook=True)
    bounced = store.trace("Q9")[-1]
    assert bounced.detail == detail and bounced.to_json()["detail"] == detail
    with store.transaction() as tx:
        assert [(e.kind, e.recipient) for e in tx.received_events("Q9")] == [(Kind.RECEIVED, "a@example.org")]
        assert tx.received_events("Q0") == []


def test_migrate_is_idempotent_and_keeps_data(dsn, store):
    add(store, ev(Kind.RECEIVED, 0))
    assert store.migrate() == 4
    assert store.migrate() == 4
    with open_store(dsn) as again:
        assert len(again.events()) == 1


def test_newer_schema_is_refused(dsn, store):
    with store.transaction() as tx:
        tx._c.execute("INSERT INTO schema_version (version) VALUES (?)", [99])
    with pytest.raises(ConfigError, match="schema version 99, newer than"):
        open_store(dsn)


def test_bare_sqlite_path(tmp_path):
    with open_store(str(tmp_path / "e.db")) as s:
        add(s, ev(Kind.RECEIVED, 0))
    with open_store(f"sqlite:///{tmp_path}/e.db") as s:
        assert len(s.events()) == 1
        assert s._query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"


def test_open_errors_name_the_dsn_without_password(tmp_path):
    with pytest.raises(ConfigError, match=r"events_dsn sqlite:////nonexistent-dir/e.db: .*directory /nonexistent-dir does not exist"):
        open_store("sqlite:////nonexistent-dir/e.db")
    with pytest.raises(ConfigError) as info:
        open_store("postgresql://relay:s3cret-pw@127.0.0.1:1/events")
    text = str(info.value)
    assert "s3cret-pw" not in text and "postgresql://relay:***@127.0.0.1:1/events" in text and "cannot connect" in text
    with pytest.raises(ConfigError, match="unsupported"):
        open_store("mysql://u:pw@h/db")
    assert redact_dsn("postgresql://u:pw@[::1]:5432/db?sslmode=require") == "postgresql://u:***@[::1]:5432/db?sslmode=require"
    assert redact_dsn("postgresql://u@db1/ev?sslmode=require&password=pw") == "postgresql://u@db1/ev?sslmode=require&password=***"
    # nothing to hide: shown exactly as configured (an absolute SQLite path keeps its four slashes)
    assert redact_dsn("sqlite:////var/lib/tenant-relay/events.db") == "sqlite:////var/lib/tenant-relay/events.db"


def test_unreadable_sqlite_file_is_a_config_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="junk.db: cannot"):
        open_store(str(path))


# -- PostgreSQL: several nodes on one database -------------------------------------------


def test_two_nodes_share_events_but_not_checkpoints(pg_dsn):
    from support.pgcluster import create_database

    dsn = create_database(pg_dsn, f"nodes{next(_dbs)}")
    with open_store(dsn) as one, open_store(dsn) as two:
        with one.transaction() as tx:
            tx.add_event(ev(Kind.RECEIVED, 0, node="relay1", queue_id="Q1"))
            tx.set_checkpoint("relay1", "maillog", {"inode": 1, "offset": 100, "path": "/var/log/postfix.log"})
            tx.put_state("relay1", "Q1", {"tenant": "acme"})
        with two.transaction() as tx:
            tx.add_event(ev(Kind.RECEIVED, 1, node="relay2", queue_id="Q1"))
            tx.set_checkpoint("relay2", "maillog", {"inode": 7, "offset": 5, "path": "/var/log/postfix.log"})
        for s in (one, two):
            assert [e.node for e in s.events()] == ["relay1", "relay2"]
            with s.transaction() as tx:
                assert tx.get_checkpoint("relay1", "maillog")["offset"] == 100
                assert tx.get_checkpoint("relay2", "maillog")["offset"] == 5
                assert tx.all_state("relay1") == {"Q1": {"tenant": "acme"}}
                assert tx.all_state("relay2") == {}
        assert len(two.trace("Q1")) == 2


def test_one_node_at_a_time_sends_a_tenant(pg_dsn):
    """While node one's sending transaction holds acme, node two gets only globex; once
    one commits, two sees acme's next row, never the one already delivered."""
    from support.pgcluster import create_database

    dsn = create_database(pg_dsn, f"locks{next(_dbs)}")
    with open_store(dsn) as one, open_store(dsn) as two:
        a1, a2 = add(one, ev(Kind.RECEIVED, 0), ev(Kind.RECEIVED, 1), webhook=True)
        g1 = add(one, ev(Kind.RECEIVED, 2, tenant="globex"), webhook=True)[0]
        now = T0 + 10
        with one.transaction() as tx1:
            rows = [r for r in tx1.outbox_due(now) if r.tenant == "acme"]
            assert _ids(rows) == [("acme", a1)]
            # one holds acme (and globex, which it was offered too): two gets nothing.
            assert _due(two, now) == []
            tx1.outbox_done(rows[0].id, now)
        # acme's lock was released at commit; the delivered row is gone from two's view.
        assert _ids(_due(two, now)) == [("acme", a2), ("globex", g1)]


def test_concurrent_migrations_from_two_nodes(pg_dsn):
    from support.pgcluster import create_database

    dsn = create_database(pg_dsn, f"race{next(_dbs)}")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_store(dsn).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with open_store(dsn) as s:
        assert [r["version"] for r in s._query("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4]


def test_outbox_heads_match_a_plain_computation(store):
    """Interleaved tenants, some rows delivered out of the middle (as after a restart with
    another node): the head of each tenant is its oldest undelivered row."""
    import random

    rng = random.Random(4)
    tenants = [f"t{i}" for i in range(7)]
    events = [ev(Kind.RECEIVED, i, tenant=rng.choice(tenants)) for i in range(120)]
    add(store, *events, webhook=True)
    with store.transaction() as tx:
        rows = tx.outbox_due(T0 + 1000, limit=100)
    assert len(rows) == len({e.tenant for e in events})
    delivered = set(rng.sample([e.id for e in events], 60))
    with store.transaction() as tx:
        for row_id in store._query("SELECT id, event_id FROM outbox"):
            if row_id["event_id"] in delivered:
                tx.outbox_done(row_id["id"], T0)
    pending = [e for e in events if e.id not in delivered]
    expected = {t: min(e.id for e in pending if e.tenant == t) for t in {e.tenant for e in pending}}
    with store.transaction() as tx:
        assert {r.tenant: r.event_id for r in tx.outbox_due(T0 + 1000, limit=100)} == expected


# -- operator events --------------------------------------------------------------------


def test_operator_events_are_copied_once_from_the_reputation_state(store, tmp_path):
    """The tracker copies the events `relayctl reputation` appends to its state file:
    each exactly once (checkpoint in the same transaction), with their fields, per node."""
    from relay_milter.tracking.operatorevents import import_events, read_events

    state = tmp_path / "reputation.json"
    assert read_events(state) == []
    listed = {"at": T0, "event": "IP_LISTED", "subject": "127.0.0.2", "detail": "bl.test: listed (127.0.0.2)",
              "lists": "bl.test", "tenants": "acme"}
    moved = {"at": T0 + 4, "event": "IP_FAILOVER", "subject": "127.0.0.2", "detail": "127.0.0.2 -> 127.0.0.4",
             "to": "127.0.0.4", "helo": "out-c.relay.test", "tenants": "acme"}
    state.write_text(json.dumps({"addresses": {}, "events": [listed]}))
    assert import_events(store, "relay1", read_events(state)) == 1
    state.write_text(json.dumps({"addresses": {}, "events": [listed, moved]}))
    assert import_events(store, "relay1", read_events(state)) == 1  # only the new one
    assert import_events(store, "relay1", read_events(state)) == 0
    assert import_events(store, "relay2", [moved | {"at": T0 + 9}]) == 1  # another node, its own checkpoint
    got = store.operator_events()
    assert [(e["node"], e["event"]) for e in got] == [("relay1", "IP_LISTED"), ("relay1", "IP_FAILOVER"), ("relay2", "IP_FAILOVER")]
    assert {k: v for k, v in got[1].items() if k != "id"} == moved | {"node": "relay1"}
    assert [e["event"] for e in store.operator_events(since=T0 + 1, node="relay1")] == ["IP_FAILOVER"]
    assert [e["at"] for e in store.operator_events(limit=1)] == [T0 + 9]  # the last ones
    assert store.operator_events(kinds=["IP_DELISTED"]) == []
    store.prune(T0 + 5)
    assert [e["at"] for e in store.operator_events()] == [T0 + 9]


def test_a_broken_state_file_is_an_error_not_an_empty_list(tmp_path):
    from relay_milter.tracking.operatorevents import read_events

    (tmp_path / "r.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a reputation state"):
        read_events(tmp_path / "r.json")
