"""Two trackers on one PostgreSQL store (issue 18): per-tenant sequence numbers stay one
gapless fleet-wide sequence and two trackers never deadlock on them; relayctl drain's view
of a node's read positions."""

from __future__ import annotations

import itertools
import threading

from relay_milter.config import Settings
from relay_milter.lab import wait_for
from relay_milter.tracking import catchup
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.tracker import STREAM_MAILLOG, STREAM_MILTER

T0 = 1_795_000_000.0
_dbs = itertools.count()


def ev(tenant: str, node: str, qid: str) -> Event:
    return Event(Kind.RECEIVED, T0, node=node, tenant=tenant, queue_id=qid)


def test_two_trackers_recording_tenants_in_opposite_orders_do_not_deadlock(pg_dsn):
    """relay1 records (acme, globex) while relay2 records (globex, acme), as the tracker
    does (lock_sequences first): relay2 waits for relay1's commit instead of holding
    globex against it, and each tenant's sequence is 1, 2 with no gap."""
    import psycopg

    from support.pgcluster import create_database

    dsn = create_database(pg_dsn, f"fleetseq{next(_dbs)}")
    one, two = open_store(dsn), open_store(dsn)
    errors: list[BaseException] = []

    def relay2() -> None:
        try:
            with two.transaction() as tx:
                batch = [ev("globex", "relay2", "B1"), ev("acme", "relay2", "B2")]
                tx.lock_sequences(e.tenant for e in batch)
                for e in batch:
                    tx.add_event(e)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    def waiting_for_a_lock() -> bool:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()
        return rows[0] >= 1

    try:
        with one.transaction() as tx:
            batch = [ev("acme", "relay1", "A1"), ev("globex", "relay1", "A2")]
            tx.lock_sequences(e.tenant for e in batch)
            tx.add_event(batch[0])
            t = threading.Thread(target=relay2)
            t.start()
            wait_for(waiting_for_a_lock, 20, what="relay2 waiting for relay1's sequence lock")
            tx.add_event(batch[1])  # without the ordered locks: a deadlock here
        t.join(30)
        assert errors == []
        seqs = {(e.tenant, e.node): e.seq for t in ("acme", "globex") for e in one.events_after(t, 0)}
        assert seqs == {("acme", "relay1"): 1, ("globex", "relay1"): 1, ("acme", "relay2"): 2, ("globex", "relay2"): 2}
    finally:
        one.close()
        two.close()


def test_lag_compares_the_committed_positions_with_the_ends_of_the_logs(tmp_path):
    maillog, milter = tmp_path / "maillog", tmp_path / "milter.log"
    maillog.write_text("line one\nline two\n")
    milter.write_text("m\n")
    s = Settings(maillog_file=str(maillog), tracking={"milter_log_file": str(milter), "node": "relay1"})
    with open_store(f"sqlite:///{tmp_path}/events.db") as store:
        lags = catchup.lag(store, s)
        assert not catchup.caught_up(lags) and all(x.offset is None for x in lags)
        assert "no checkpoint of node relay1" in lags[0].describe()
        with store.transaction() as tx:
            tx.set_checkpoint("relay1", STREAM_MAILLOG, {"path": str(maillog), "inode": maillog.stat().st_ino, "offset": 9})
            tx.set_checkpoint("relay1", STREAM_MILTER, {"path": str(milter), "inode": milter.stat().st_ino, "offset": 2})
            tx.set_checkpoint("relay2", STREAM_MAILLOG, {"path": str(maillog), "inode": maillog.stat().st_ino, "offset": 18})
        lags = catchup.lag(store, s)
        assert [x.behind for x in lags] == [9, 0] and not catchup.caught_up(lags)
        assert "9 bytes behind (at 9 of 18)" in lags[0].describe()
        with store.transaction() as tx:
            tx.set_checkpoint("relay1", STREAM_MAILLOG, {"path": str(maillog), "inode": maillog.stat().st_ino, "offset": 18})
        assert catchup.caught_up(catchup.lag(store, s))
        # Rotated: the position is in the old file, the name is a new one.
        maillog.rename(tmp_path / "maillog.1")
        maillog.write_text("new\n")
        lags = catchup.lag(store, s)
        assert lags[0].offset is None and "rotated" in lags[0].describe() and not catchup.caught_up(lags)
        assert store.state_count("relay1") == 0
