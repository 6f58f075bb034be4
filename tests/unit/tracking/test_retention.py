"""Per-node counters, prune and backup/restore, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading

import pytest
import yaml
from click.testing import CliRunner

from relay_milter.cli import main
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.metrics import Snapshot, render
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import record_event
from support.factories import tenant_doc, write_tenants

T0 = 1_795_000_000.0
DAY = 86400.0
_dbs = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def dsn(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/events.db"
    from support.pgcluster import create_database

    return create_database(request.getfixturevalue("pg_dsn"), f"r{next(_dbs)}")


@pytest.fixture
def store(dsn):
    s = open_store(dsn)
    yield s
    s.close()


def msg(s, qid: str, ts: float, node: str = "relay1", tenant: str = "acme", webhook: bool = False, delay: float = 2.0) -> list[Event]:
    evs = [Event(Kind.RECEIVED, ts, node, tenant=tenant, queue_id=qid, recipient="a@example.org"),
           Event(Kind.RELAYED, ts + 1, node, tenant=tenant, queue_id=qid, recipient="a@example.org", delay=delay, delays="0/0/1/1")]
    with s.transaction() as tx:
        for e in evs:
            record_event(tx, e, webhook=webhook)
    return evs


def test_counters_are_per_node_and_survive_prune(store):
    msg(store, "Q1", T0)
    msg(store, "Q2", T0, node="relay2", delay=0.3)
    msg(store, "Q3", T0 + 100 * DAY, delay=400)
    assert store.event_counts("relay1") == {("acme", "RECEIVED"): 2, ("acme", "RELAYED"): 2}
    assert store.event_counts("relay2") == {("acme", "RECEIVED"): 1, ("acme", "RELAYED"): 1}
    assert store.event_counts() == {("acme", "RECEIVED"): 3, ("acme", "RELAYED"): 3}
    before = store.event_counts("relay1"), store.delay_histograms("relay1")
    assert store.prune(T0 + 50 * DAY) == (4, 0)
    assert [e.queue_id for e in store.events()] == ["Q3", "Q3"]
    assert (store.event_counts("relay1"), store.delay_histograms("relay1")) == before  # never go down
    h = store.delay_histograms("relay1")["acme"]
    assert (h["count"], h["sum"]) == (2, 402.0)
    assert h["buckets"]["1"] == 0 and h["buckets"]["2.5"] == 1 and h["buckets"]["300"] == 1 and h["buckets"]["900"] == 2
    assert h["buckets"]["+Inf"] == 2
    text = render(Snapshot(tenants=("acme",), node="relay1", event_counts=store.event_counts("relay1"),
                           delays=store.delay_histograms("relay1")))
    assert 'relay_events_total{node="relay1",tenant="acme",event="RELAYED"} 2\n' in text
    assert 'relay_delivery_delay_seconds_bucket{node="relay1",tenant="acme",le="2.5"} 1\n' in text
    assert 'relay_delivery_delay_seconds_count{node="relay1",tenant="acme"} 2\n' in text
    assert "# TYPE relay_delivery_delay_seconds histogram\n" in text


def test_prune_keeps_queued_messages_and_undelivered_rows_in_batches(store):
    for i in range(5):
        msg(store, f"D{i}", T0 + i, webhook=True)  # old, delivered below
    pending = msg(store, "P1", T0 + 10, webhook=True)  # old, its webhook rows still undelivered
    queued = msg(store, "S1", T0 + 20)  # old, but still in the queue: the tracker has state
    new = msg(store, "N1", T0 + 100 * DAY, webhook=True)
    with store.transaction() as tx:
        tx.put_state("relay1", "S1", {"tenant": "acme"})
        ids = [r["id"] for r in tx._c.query("SELECT id FROM outbox o WHERE event_id NOT IN (?, ?) ORDER BY id", [pending[0].id, pending[1].id])]
        for row_id in ids:
            tx.outbox_done(row_id, T0 + 30)
    steps = []
    assert store.prune(T0 + 50 * DAY, batch=3, progress=lambda e, o: steps.append((e, o))) == (10, 12)
    assert len(steps) > 4  # several batches
    left = {e.queue_id for e in store.events()}
    assert left == {"P1", "S1", "N1"}
    assert store.outbox_backlog() == {"acme": 2}
    with store.transaction() as tx:
        assert tx.get_state("relay1", "S1") == {"tenant": "acme"}
    assert [e.id for e in store.trace("S1")] == [e.id for e in queued]
    assert [e.id for e in store.events(queue_id="N1")] == [e.id for e in new]
    assert store.prune(T0 + 50 * DAY) == (0, 0)


@pytest.fixture
def cli_env(tmp_path):
    db = tmp_path / "events.db"
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({"tracking": {"events_dsn": f"sqlite:///{db}", "node": "relay1"}}))
    tenants_dir = write_tenants(tmp_path / "tenants", [tenant_doc("acme")])

    def run(*args: str):
        return CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), *args])

    return run, db


def test_prune_command_uses_the_retention_setting(cli_env):
    run, db = cli_env
    import time

    with open_store(f"sqlite:///{db}") as s:
        msg(s, "OLD", time.time() - 91 * DAY)
        msg(s, "NEW", time.time() - 89 * DAY)
    r = run("prune")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("removed 2 event(s) and 0 delivered webhook row(s) from before ")
    with open_store(f"sqlite:///{db}") as s:
        assert {e.queue_id for e in s.events()} == {"NEW"}
    assert run("prune", "--older-than", "88d").output.startswith("removed 2 event(s)")
    assert run("prune", "--older-than", "soon").exit_code == 2


def test_sqlite_backup_while_writing_then_restore(cli_env, tmp_path):
    run, db = cli_env
    writer_store = open_store(f"sqlite:///{db}")
    msg(writer_store, "B0", T0)
    stop = threading.Event()
    written = []

    def write() -> None:  # the tracker keeps committing during the backup
        i = 1
        while not stop.is_set():
            msg(writer_store, f"B{i}", T0 + i)
            written.append(i)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        r = run("backup", str(tmp_path / "copy.db"))
    finally:
        stop.set()
        thread.join(30)
    assert r.exit_code == 0, r.output
    assert run("backup", str(tmp_path / "copy.db")).exit_code == 1  # exists
    with open_store(f"sqlite:///{tmp_path}/copy.db") as copy:
        got = copy.events()
        # A consistent snapshot: whole transactions only (both events of each message).
        assert len(got) % 2 == 0 and len(got) >= 2
        assert copy.event_counts("relay1")[("acme", "RELAYED")] == len(got) // 2
    # Restore: the tracker is stopped, the copy replaces the database.
    writer_store.close()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{db}{suffix}")
        except FileNotFoundError:
            pass
    os.replace(tmp_path / "copy.db", db)
    with open_store(f"sqlite:///{db}") as restored:
        assert [e.id for e in restored.events()] == [e.id for e in got]
        msg(restored, "AFTER", T0 + 10_000)  # writable, sequence numbers carry on
        assert restored.events_after("acme", len(got))[0].queue_id == "AFTER"


def test_postgresql_pg_dump_and_restore(pg_dsn):
    """What docs/tracking.md says for PostgreSQL: pg_dump -Fc, then pg_restore into an empty database."""
    from support.pgcluster import create_database, find_bindir

    src = create_database(pg_dsn, f"dump{next(_dbs)}")
    with open_store(src) as s:
        msg(s, "PG1", T0, webhook=True)
        msg(s, "PG2", T0 + 1)
        before = [e.to_json() for e in s.events()]
    bindir = find_bindir()
    dump = subprocess.run([str(bindir / "pg_dump"), "-Fc", "--dbname", src], capture_output=True, check=True).stdout
    dst = create_database(pg_dsn, f"restored{next(_dbs)}")
    subprocess.run([str(bindir / "pg_restore"), "--no-owner", "--dbname", dst], input=dump, capture_output=True, check=True)
    with open_store(dst) as r:
        assert [e.to_json() for e in r.events()] == before
        assert r.outbox_backlog() == {"acme": 2}
        assert r.event_counts("relay1") == {("acme", "RECEIVED"): 2, ("acme", "RELAYED"): 2}
        msg(r, "PG3", T0 + 2)  # sequences restored: new ids and seqs carry on
        assert [e.seq for e in r.events_after("acme", 4)] == [5, 6]


def test_backup_refuses_postgresql(tmp_path, pg_dsn):
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({"tracking": {"events_dsn": pg_dsn, "node": "relay1"}}))
    tenants_dir = write_tenants(tmp_path / "tenants", [tenant_doc("acme")])
    r = CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), "backup", str(tmp_path / "x.db")])
    assert r.exit_code == 3 and "pg_dump" in r.output


def test_a_version_1_store_is_upgraded_with_sequences_and_counters(dsn):
    """A store written by the previous release: its events get sequence numbers in id order
    and the counters start from what is there; new events carry on from both."""
    from relay_milter.tracking.store import EVENT_FIELDS_V1, schema_sql

    with open_store(dsn, migrate=False) as old, old.transaction() as tx:
        for statement in schema_sql(old.dialect):
            tx._c.execute(statement)
        tx._c.execute("INSERT INTO schema_version (version) VALUES (1)")
        names = list(EVENT_FIELDS_V1)
        rows = [("RECEIVED", T0, "relay1", "acme", "Q1"), ("RELAYED", T0 + 1, "relay1", "acme", "Q1"),
                ("RECEIVED", T0 + 2, "relay2", "globex", "Q2"), ("REJECTED", T0 + 3, "relay1", None, None),
                ("RECEIVED", T0 + 4, "relay1", "acme", "Q3")]
        for kind, ts, node, tenant, qid in rows:
            values = dict.fromkeys(names) | {"kind": kind, "ts": ts, "node": node, "tenant": tenant, "queue_id": qid}
            tx._c.execute(f"INSERT INTO events ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                          [values[n] for n in names])
    with open_store(dsn) as s:
        assert [r["version"] for r in s._query("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4]
        assert [(e.queue_id, e.seq) for e in s.events(tenant="acme")] == [("Q1", 1), ("Q1", 2), ("Q3", 3)]
        assert [e.seq for e in s.events(tenant="globex")] == [1]
        assert s.event_counts("relay1") == {("acme", "RECEIVED"): 2, ("acme", "RELAYED"): 1, ("-", "REJECTED"): 1}
        assert s.event_counts("relay2") == {("globex", "RECEIVED"): 1}
        [new] = msg(s, "Q4", T0 + 10)[:1]
        assert new.seq == 4
        assert s.event_counts("relay1")[("acme", "RECEIVED")] == 3
