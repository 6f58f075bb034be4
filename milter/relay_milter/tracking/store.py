"""The event store: delivery events, the tracker's checkpoints and state, the webhook outbox.

Two backends behind one API and one schema description:

- SQLite (``sqlite:////var/lib/tenant-relay/events.db`` or a bare path): one node, one
  process. WAL so readers (relayctl, metrics) never block the tracker; one writer
  connection, serialized in-process, with a busy timeout for the odd external writer.
- PostgreSQL (``postgresql://user@host/db``, psycopg 3): several relay nodes share one
  database. Each node keys its checkpoints and correlation state by its node name and
  sees every node's events. The webhook sender takes ``pg_try_advisory_xact_lock`` per
  tenant, so two nodes never deliver the same tenant's rows at the same time.

The SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them to
``%s`` in one place (``_PgStore._sql``). JSON blobs are TEXT in both backends, so the
statements stay identical.

Exactly-once recording comes from the tracker writing events, state, outbox rows and the
new file checkpoints in one transaction (``Store.transaction``), not from unique keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from relay_milter.config import ConfigError
from relay_milter.tracking.events import Event, Kind

SCHEMA_VERSION = 4

# -- schema (one description, rendered per dialect) ---------------------------------

# Logical column types -> (SQLite, PostgreSQL).
_TYPES = {
    "id": ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"),
    "int": ("INTEGER", "BIGINT"),
    "real": ("REAL", "DOUBLE PRECISION"),
    "text": ("TEXT", "TEXT"),
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str, bool], ...]  # (name, logical type, NOT NULL)
    primary_key: tuple[str, ...] = ()


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    columns: tuple[str, ...]
    where: str = ""  # partial index predicate (same syntax in both dialects)


# Version 1, as released (never edit: stores created by it are upgraded from exactly this).
_V1_EVENT_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("kind", "text", True),
    ("ts", "real", True),
    ("node", "text", True),
    ("tenant", "text", False),
    ("queue_id", "text", False),
    ("message_id", "text", False),
    ("upstream_id", "text", False),
    ("sender", "text", False),
    ("recipient", "text", False),
    ("original_recipient", "text", False),
    ("relay", "text", False),
    ("response_code", "text", False),
    ("dsn", "text", False),
    ("reason", "text", False),
    ("tls", "text", False),  # JSON
    ("next_retry", "real", False),
    ("size", "int", False),
    ("client", "text", False),
)

_V1_TABLES: tuple[Table, ...] = (
    Table("schema_version", (("version", "int", True),)),
    Table("events", (("id", "id", True),) + _V1_EVENT_COLUMNS),
    Table("checkpoints", (("node", "text", True), ("stream", "text", True), ("value", "text", True)), ("node", "stream")),
    Table("state", (("node", "text", True), ("queue_id", "text", True), ("value", "text", True)), ("node", "queue_id")),
    Table(
        "outbox",
        (
            ("id", "id", True),
            ("tenant", "text", True),
            ("event_id", "int", True),
            ("payload", "text", True),  # the exact JSON body POSTed (same bytes on every retry)
            ("attempts", "int", True),
            ("next_attempt", "real", True),
            ("created", "real", True),
            ("delivered_at", "real", False),
            ("last_attempt", "real", False),
            ("last_error", "text", False),
        ),
    ),
)

_V1_INDEXES: tuple[Index, ...] = (
    Index("events_queue_id", "events", ("queue_id",)),
    Index("events_message_id", "events", ("message_id",)),
    Index("events_recipient", "events", ("recipient",)),
    Index("events_original_recipient", "events", ("original_recipient",)),
    Index("events_tenant_ts", "events", ("tenant", "ts")),
    Index("events_ts", "events", ("ts",)),
    # The sender's hot path: the oldest undelivered row of each tenant.
    Index("outbox_pending", "outbox", ("tenant", "id"), "delivered_at IS NULL"),
)

# Version 2: per-tenant sequence numbers, Postfix's delay per delivery, replays, per-node
# counters kept by the writer (never recomputed by a scan), and the indexes that trace by
# upstream id, events from a cursor and prune need.
_V2_EVENT_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("seq", "int", False),  # per tenant, from 1; None for events without a tenant
    ("delay", "real", False),  # Postfix delay= (seconds from arrival to this attempt)
    ("delays", "text", False),  # Postfix delays=a/b/c/d
)
_V2_OUTBOX_COLUMNS: tuple[tuple[str, str, bool], ...] = (("replay", "int", False),)
_V2_TABLES: tuple[Table, ...] = (
    Table("tenant_seq", (("tenant", "text", True), ("last", "int", True)), ("tenant",)),
    # metric: "events" (label = kind), "delay_bucket" (label = upper bound; per bucket, not
    # cumulative), "delay_sum", "delay_count"
    Table(
        "counters",
        (("node", "text", True), ("metric", "text", True), ("tenant", "text", True), ("label", "text", True), ("value", "real", True)),
        ("node", "metric", "tenant", "label"),
    ),
)
_V2_INDEXES: tuple[Index, ...] = (
    Index("events_tenant_seq", "events", ("tenant", "seq")),
    Index("events_upstream_id", "events", ("upstream_id",)),
    Index("outbox_delivered", "outbox", ("delivered_at",), "delivered_at IS NOT NULL"),
    Index("outbox_pending_event", "outbox", ("event_id",), "delivered_at IS NULL"),
)

# Version 3 (bounce tracking, issue 15 A): what a DSN or feedback report said, as JSON.
_V3_EVENT_COLUMNS: tuple[tuple[str, str, bool], ...] = (("detail", "text", False),)

_EVENT_COLUMNS = _V1_EVENT_COLUMNS + _V2_EVENT_COLUMNS + _V3_EVENT_COLUMNS

# Version 4: operator events (relayctl reputation / ip: IP_LISTED, IP_DELISTED,
# DOMAIN_LISTED, DOMAIN_DELISTED, IP_FAILOVER, IP_RESTORED). Not tenant events: no seq, no
# webhook outbox row; ``fields`` is the event's JSON (to=, helo=, tenants=, lists=, ...).
_V4_TABLES: tuple[Table, ...] = (
    Table(
        "operator_events",
        (("id", "id", True), ("ts", "real", True), ("node", "text", True), ("event", "text", True),
         ("subject", "text", True), ("detail", "text", True), ("fields", "text", True)),
    ),
)
_V4_INDEXES: tuple[Index, ...] = (Index("operator_events_ts", "operator_events", ("ts",)),)
EVENT_FIELDS = tuple(c[0] for c in _EVENT_COLUMNS)
EVENT_FIELDS_V1 = tuple(c[0] for c in _V1_EVENT_COLUMNS)  # the events columns of schema version 1
TABLES = _V1_TABLES + _V2_TABLES + _V4_TABLES
INDEXES = _V1_INDEXES + _V2_INDEXES + _V4_INDEXES


def _create(tables: Sequence[Table], indexes: Sequence[Index], dialect: str) -> list[str]:
    col = 0 if dialect == "sqlite" else 1
    out = []
    for table in tables:
        parts = [f"{name} {_TYPES[kind][col]}{' NOT NULL' if notnull and kind != 'id' else ''}" for name, kind, notnull in table.columns]
        if table.primary_key:
            parts.append(f"PRIMARY KEY ({', '.join(table.primary_key)})")
        out.append(f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(parts)})")
    for ix in indexes:
        where = f" WHERE {ix.where}" if ix.where else ""
        out.append(f"CREATE INDEX IF NOT EXISTS {ix.name} ON {ix.table} ({', '.join(ix.columns)}){where}")
    return out


def schema_sql(dialect: str) -> list[str]:
    """Version 1's CREATE statements for ``dialect`` ("sqlite" or "postgresql"), idempotent."""
    return _create(_V1_TABLES, _V1_INDEXES, dialect)


def _v2(dialect: str) -> list[str]:
    col = 0 if dialect == "sqlite" else 1
    out = [f"ALTER TABLE events ADD COLUMN {n} {_TYPES[k][col]}" for n, k, _ in _V2_EVENT_COLUMNS]
    out += [f"ALTER TABLE outbox ADD COLUMN {n} {_TYPES[k][col]}" for n, k, _ in _V2_OUTBOX_COLUMNS]
    out += _create(_V2_TABLES, _V2_INDEXES, dialect)
    # Existing events: sequence numbers in id order, and the counters they add up to.
    out += [
        "UPDATE events SET seq = r.n FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY id) AS n"
        " FROM events WHERE tenant IS NOT NULL) r WHERE events.id = r.id",
        "INSERT INTO tenant_seq (tenant, last) SELECT tenant, MAX(seq) FROM events WHERE tenant IS NOT NULL GROUP BY tenant",
        "INSERT INTO counters (node, metric, tenant, label, value)"
        " SELECT node, 'events', COALESCE(tenant, '-'), kind, COUNT(*) FROM events GROUP BY node, COALESCE(tenant, '-'), kind",
    ]
    return out


# Version -> statements (per dialect) that bring the previous version up to it (never edit
# a released one; add the next version with its ALTERs).
def _v3(dialect: str) -> list[str]:
    col = 0 if dialect == "sqlite" else 1
    return [f"ALTER TABLE events ADD COLUMN {n} {_TYPES[k][col]}" for n, k, _ in _V3_EVENT_COLUMNS]


def _v4(dialect: str) -> list[str]:
    return _create(_V4_TABLES, _V4_INDEXES, dialect)


MIGRATIONS: dict[int, Callable[[str], list[str]]] = {1: schema_sql, 2: _v2, 3: _v3, 4: _v4}


def _check_event_columns() -> None:
    """The table and the dataclass must not drift apart silently."""
    from dataclasses import fields

    names = tuple(f.name for f in fields(Event) if f.name != "id")
    if names != EVENT_FIELDS:
        raise RuntimeError(f"events table columns {EVENT_FIELDS} do not match Event fields {names}")


_check_event_columns()


# -- public types ---------------------------------------------------------------------


@dataclass
class OutboxRow:
    """One webhook delivery: the body is built when the event is recorded and sent as is."""

    id: int
    tenant: str
    event_id: int
    payload: str
    attempts: int
    next_attempt: float
    created: float
    replay: int | None = None  # 1: re-sent by `relayctl webhooks replay`


# Upper bounds (seconds) of the delivery delay histogram: relay_delivery_delay_seconds.
DELAY_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (0.5, 1, 300, +Inf)."""
    return "+Inf" if bound == float("inf") else f"{bound:g}"


def redact_dsn(dsn: str) -> str:
    """The DSN for messages and logs: never the password (user info or ?password=)."""
    try:
        parts = urlsplit(dsn)
        port = parts.port
    except ValueError:
        return "<unparsable DSN>"
    if parts.password is None and not re.search(r"(^|&)password=", parts.query):
        return dsn  # nothing to hide; urlunsplit would also drop the // of sqlite:////path
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def normalize_message_id(value: str) -> tuple[str, str]:
    """Both spellings of a Message-ID: operators paste it with or without the brackets."""
    bare = value.strip().removeprefix("<").removesuffix(">")
    return f"<{bare}>", bare


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


_EVENT_SELECT = f"SELECT id, {', '.join(EVENT_FIELDS)} FROM events"
_INSERT_EVENT = f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) VALUES ({_placeholders(len(EVENT_FIELDS))}) RETURNING id"
_OUTBOX_COLUMNS = "o.id, o.tenant, o.event_id, o.payload, o.attempts, o.next_attempt, o.created, o.replay"
# The oldest undelivered row of each tenant, if it is due. A later row of the same tenant
# is never returned while an earlier one is pending: per-tenant order is the contract.
# The recursive CTE is a "loose index scan" over the partial index (tenant, id): each
# step jumps to the first pending row of the next tenant, which is that tenant's head.
# A tenant with a million rows backlogged then costs one index probe per round, not a
# scan of its backlog. (A plain MIN(id) per tenant lets PostgreSQL walk the primary key
# through the whole backlog.) Same SQL on SQLite and PostgreSQL.
_NEXT_HEAD = (
    "FROM outbox i WHERE i.delivered_at IS NULL AND i.tenant > heads.tenant ORDER BY i.tenant, i.id LIMIT 1"
)
_OUTBOX_HEADS = (
    "WITH RECURSIVE heads(tenant, id) AS ("
    " SELECT CAST('' AS TEXT), CAST(NULL AS BIGINT)"  # tenant ids are never empty
    " UNION ALL"
    f" SELECT (SELECT i.tenant {_NEXT_HEAD}), (SELECT i.id {_NEXT_HEAD})"
    " FROM heads WHERE heads.tenant IS NOT NULL)"
    f" SELECT {_OUTBOX_COLUMNS} FROM heads JOIN outbox o ON o.id = heads.id"
    " WHERE o.next_attempt <= ?"
)


# -- connections: what a backend provides ----------------------------------------------


class _Conn(ABC):
    """The backend primitives a transaction or a read runs on (placeholders are ``?``)."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    @abstractmethod
    def delete_count(self, sql: str, params: Sequence[Any]) -> int:
        """Run a DELETE (or UPDATE); return how many rows it changed."""

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        """Run an INSERT ... RETURNING id."""
        rows = self.query_write(sql, params)
        return int(rows[0]["id"])

    def query_write(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """A statement that writes and returns rows (RETURNING)."""
        return self.query(sql, params)

    # True when other nodes share the database (webhook sending needs per-tenant locks).
    shared = False

    def lock_tenants(self, tenants: Iterable[str]) -> set[str]:
        """Tenants this transaction may send webhooks for. One node: all of them."""
        return set(tenants)


class Tx:
    """One store transaction: everything in it commits together or not at all."""

    def __init__(self, conn: _Conn):
        self._c = conn
        self._counts: dict[tuple[str, str, str, str], float] = {}

    # -- events ----
    def add_event(self, ev: Event) -> int:
        """Record ``ev``: its tenant's next sequence number (``ev.seq``) and ``id`` are set,
        and this node's counters (events by kind; the RELAYED delay histogram) move in the
        same transaction. Returns the id."""
        if ev.tenant:
            rows = self._c.query_write(
                "INSERT INTO tenant_seq (tenant, last) VALUES (?, 1)"
                " ON CONFLICT (tenant) DO UPDATE SET last = tenant_seq.last + 1 RETURNING last",
                [ev.tenant],
            )
            ev.seq = int(rows[0]["last"])
        row = ev.row()
        ev.id = self._c.insert(_INSERT_EVENT, [row[name] for name in EVENT_FIELDS])
        tenant = ev.tenant or "-"
        self.count(ev.node, "events", tenant, ev.kind.value)
        if ev.kind is Kind.RELAYED and ev.delay is not None:
            # One row per bucket, not cumulative: the reader adds them up (one write here).
            bound = next((b for b in DELAY_BUCKETS if ev.delay <= b), float("inf"))
            self.count(ev.node, "delay_bucket", tenant, _le(bound))
            self.count(ev.node, "delay_sum", tenant, "", ev.delay)
            self.count(ev.node, "delay_count", tenant, "")
        return ev.id

    def lock_sequences(self, tenants: Iterable[str]) -> None:
        """Take the sequence rows of ``tenants`` now, in sorted order, before any event is
        added. Two trackers sharing a PostgreSQL store then always lock tenants in the same
        order: without this, a batch of (acme, globex) on one node and (globex, acme) on
        another deadlock, and PostgreSQL aborts one of them (it is retried, but late)."""
        for tenant in sorted(set(tenants)):
            self._c.execute(
                "INSERT INTO tenant_seq (tenant, last) VALUES (?, 0)"
                " ON CONFLICT (tenant) DO UPDATE SET last = tenant_seq.last",
                [tenant],
            )

    def received_events(self, queue_id: str) -> list[Event]:
        """The RECEIVED events of a queue id, on any node (bounce tracking, issue 15 A: a
        report names the message by the queue id in its VERP return path)."""
        rows = self._c.query(f"{_EVENT_SELECT} WHERE queue_id = ? AND kind = ? ORDER BY id", [queue_id, Kind.RECEIVED.value])
        return [Event.from_row(r) for r in rows]

    def count(self, node: str, metric: str, tenant: str, label: str, by: float = 1) -> None:
        """Add ``by`` to one of ``node``'s counters (written when the transaction commits:
        one upsert per counter touched, however many events it counts)."""
        key = (node, metric, tenant, label)
        self._counts[key] = self._counts.get(key, 0) + by

    def flush(self) -> None:
        """Write the counter increments gathered so far (called before every commit)."""
        for (node, metric, tenant, label), by in sorted(self._counts.items()):
            self._c.execute(
                "INSERT INTO counters (node, metric, tenant, label, value) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (node, metric, tenant, label) DO UPDATE SET value = counters.value + excluded.value",
                [node, metric, tenant, label, by],
            )
        self._counts.clear()

    def queue_webhook(self, ev: Event, body: str, replay: bool = False) -> None:
        """Queue ``body`` (the exact bytes to POST, built by the caller from the recorded
        event) for ``ev``'s tenant. Called in the transaction that recorded ``ev``, so an
        event is never recorded without its delivery."""
        if ev.id is None:
            raise ValueError("queue_webhook needs a recorded event (add_event first)")
        if not ev.tenant:
            raise ValueError(f"event {ev.id}: a webhook needs a tenant")
        now = time.time()
        self._c.execute(
            "INSERT INTO outbox (tenant, event_id, payload, attempts, next_attempt, created, replay)"
            " VALUES (?, ?, ?, 0, ?, ?, ?)",
            [ev.tenant, ev.id, body, now if replay else ev.ts, now, 1 if replay else None],
        )

    # -- checkpoints ----
    def add_operator_event(self, node: str, record: dict[str, Any]) -> None:
        """One operator event (``core.reputation.Change.record``: at, event, subject, detail
        and further fields such as to=, helo=, tenants=, lists=)."""
        extra = {k: v for k, v in record.items() if k not in ("at", "event", "subject", "detail")}
        self._c.execute(
            "INSERT INTO operator_events (ts, node, event, subject, detail, fields) VALUES (?, ?, ?, ?, ?, ?)",
            [float(record["at"]), node, str(record["event"]), str(record["subject"]), str(record.get("detail", "")),
             json.dumps(extra, sort_keys=True, separators=(",", ":"))],
        )

    def get_checkpoint(self, node: str, stream: str) -> dict | None:
        rows = self._c.query("SELECT value FROM checkpoints WHERE node = ? AND stream = ?", [node, stream])
        return json.loads(rows[0]["value"]) if rows else None

    def set_checkpoint(self, node: str, stream: str, value: dict) -> None:
        self._c.execute(
            "INSERT INTO checkpoints (node, stream, value) VALUES (?, ?, ?)"
            " ON CONFLICT (node, stream) DO UPDATE SET value = excluded.value",
            [node, stream, json.dumps(value, sort_keys=True)],
        )

    # -- per-queue-id correlation state ----
    def put_state(self, node: str, queue_id: str, state: dict) -> None:
        self._c.execute(
            "INSERT INTO state (node, queue_id, value) VALUES (?, ?, ?)"
            " ON CONFLICT (node, queue_id) DO UPDATE SET value = excluded.value",
            [node, queue_id, json.dumps(state, sort_keys=True)],
        )

    def get_state(self, node: str, queue_id: str) -> dict | None:
        rows = self._c.query("SELECT value FROM state WHERE node = ? AND queue_id = ?", [node, queue_id])
        return json.loads(rows[0]["value"]) if rows else None

    def delete_state(self, node: str, queue_id: str) -> None:
        self._c.execute("DELETE FROM state WHERE node = ? AND queue_id = ?", [node, queue_id])

    def all_state(self, node: str) -> dict[str, dict]:
        rows = self._c.query("SELECT queue_id, value FROM state WHERE node = ? ORDER BY queue_id", [node])
        return {r["queue_id"]: json.loads(r["value"]) for r in rows}

    # -- webhook outbox ----
    def outbox_due(self, now: float, limit: int = 50) -> list[OutboxRow]:
        """The oldest undelivered row of each tenant whose next attempt is due, oldest first.

        PostgreSQL: only tenants whose advisory lock this transaction obtained; the lock
        holds until commit, so keep the transaction open while sending these rows. The
        heads are read again after locking: another node may have just delivered one.
        """
        heads = self._c.query(f"{_OUTBOX_HEADS} ORDER BY o.next_attempt, o.id LIMIT ?", [now, limit])
        if self._c.shared:
            tenants = sorted(self._c.lock_tenants(sorted({r["tenant"] for r in heads})))
            if not tenants:
                return []
            heads = self._c.query(
                f"{_OUTBOX_HEADS} AND o.tenant IN ({_placeholders(len(tenants))}) ORDER BY o.next_attempt, o.id LIMIT ?",
                [now, *tenants, limit],
            )
        return [OutboxRow(**r) for r in heads]

    def outbox_head(self, tenant: str, now: float) -> OutboxRow | None:
        """``tenant``'s oldest undelivered row if it is due, else None. PostgreSQL: None
        also when another node holds the tenant's lock (it is sending for it)."""
        if self._c.shared and not self._c.lock_tenants([tenant]):
            return None
        rows = self._c.query(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox o WHERE o.tenant = ? AND o.delivered_at IS NULL ORDER BY o.id LIMIT 1",
            [tenant],
        )
        if not rows or rows[0]["next_attempt"] > now:
            return None
        return OutboxRow(**rows[0])

    def outbox_done(self, row_id: int, now: float) -> None:
        self._c.execute(
            "UPDATE outbox SET delivered_at = ?, last_attempt = ?, attempts = attempts + 1 WHERE id = ? AND delivered_at IS NULL",
            [now, now, row_id],
        )

    def outbox_failed(self, row_id: int, now: float, error: str, next_attempt: float) -> None:
        """Record a failed attempt; the row stays at the head of its tenant until delivered."""
        self._c.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_attempt = ?, last_error = ?, next_attempt = ?"
            " WHERE id = ? AND delivered_at IS NULL",
            [now, error[:2000], next_attempt, row_id],
        )


class NodeClaim:
    """A held claim on a node name (``Store.claim_node``); ``release`` gives it up. The
    claim also ends when the process dies (an flock, a PostgreSQL session lock)."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()


def _node_taken(node: str, dsn: str, holder: str) -> ConfigError:
    return ConfigError(
        f"node {node}: another tracker is already running for this node name on {dsn}{holder}; "
        "run one tracker per node (stop the other), or give this relay its own tracking.node"
    )


class Store(ABC):
    """Read side and transactions. Thread-safe: the tracker, the webhook sender and the
    metrics writer share one Store.

    The read methods run outside any transaction and see committed data only (also when
    called inside a ``transaction()`` block: use the Tx for reads that must see its writes).
    """

    dsn: str

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """Commit on success, roll back on an exception (which propagates)."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[_Conn]:
        """A connection for reads outside any transaction."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def safe_dsn(self) -> str:
        return redact_dsn(self.dsn)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._read() as conn:
            return conn.query(sql, params)

    # -- schema ----
    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent, safe when several nodes start at once.
        Returns the schema version."""
        with self.transaction() as tx:
            conn = tx._c
            self._migration_lock(conn)
            conn.execute(schema_sql(self.dialect)[0])  # schema_version
            rows = conn.query("SELECT MAX(version) AS v FROM schema_version")
            current = int(rows[0]["v"] or 0)
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.safe_dsn}: the event store has schema version {current}, newer than this "
                    f"tenant-relay understands ({SCHEMA_VERSION}); upgrade tenant-relay on this node"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version](self.dialect):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
        return SCHEMA_VERSION

    dialect: str = ""

    def _migration_lock(self, conn: _Conn) -> None:
        """Serialize concurrent migrations (PostgreSQL: several nodes starting together)."""

    # -- read side ----
    def events(
        self,
        *,
        tenant: str | None = None,
        queue_id: str | None = None,
        message_id: str | None = None,
        recipient: str | None = None,
        since: float | None = None,
        until: float | None = None,
        kinds: Iterable[Kind | str] | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events matching every given filter, ordered by id (the first ``limit`` of them).
        ``since`` is inclusive, ``until`` exclusive; a Message-ID matches with or without <>,
        a recipient matches the decoded or the encoded (original) address."""
        where: list[str] = []
        params: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if queue_id is not None:
            where.append("queue_id = ?")
            params.append(queue_id)
        if message_id is not None:
            where.append("message_id IN (?, ?)")
            params += normalize_message_id(message_id)
        if recipient is not None:
            where.append("(recipient IN (?, ?) OR original_recipient IN (?, ?))")
            params += [recipient, recipient.lower()] * 2
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        if kinds is not None:
            names = [Kind(k).value for k in kinds]
            if not names:
                return []
            where.append(f"kind IN ({_placeholders(len(names))})")
            params += names
        sql = _EVENT_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [Event.from_row(r) for r in self._query(sql, params)]

    def trace(self, key: str, since: float | None = None, limit: int | None = None) -> list[Event]:
        """Every event of every message ``key`` identifies, ordered by ts, id.

        ``key`` is a Message-ID (with or without <>), a Postfix queue id, a recipient
        (decoded or encoded) or the platform's upstream id (X-Upstream-ID). Messages are
        matched first (with ``since``: by their events at or after it; with ``limit``: the
        most recent ``limit`` matching events), then all their events are read: by (node,
        queue id), since queue ids are only unique per node, and by Message-ID, which links
        a message's rejections and its copies on other nodes.
        """
        key = key.strip()
        if not key:
            return []
        where = ("(queue_id = ? OR message_id IN (?, ?) OR recipient IN (?, ?) OR original_recipient IN (?, ?)"
                 " OR upstream_id = ?)")
        params: list[Any] = [key, *normalize_message_id(key), key, key.lower(), key, key.lower(), key]
        if since is not None:
            where += " AND ts >= ?"
            params.append(since)
        sql = f"SELECT id, node, queue_id, message_id FROM events WHERE {where}"
        if limit is not None:
            sql += " ORDER BY id DESC LIMIT ?"
            params.append(int(limit))
        seeds = self._query(sql, params)
        if not seeds:
            return []
        ids = {r["id"] for r in seeds}
        pairs = sorted({(r["node"], r["queue_id"]) for r in seeds if r["queue_id"]})
        msgids = sorted({r["message_id"] for r in seeds if r["message_id"]})
        found: dict[int, Event] = {}
        for chunk in _chunks(pairs, 200):
            cond = " OR ".join("(node = ? AND queue_id = ?)" for _ in chunk)
            for r in self._query(f"{_EVENT_SELECT} WHERE {cond}", [v for pair in chunk for v in pair]):
                found[r["id"]] = Event.from_row(r)
        for chunk in _chunks(msgids, 500):
            for r in self._query(f"{_EVENT_SELECT} WHERE message_id IN ({_placeholders(len(chunk))})", chunk):
                found[r["id"]] = Event.from_row(r)
        missing = sorted(ids - set(found))  # e.g. a NOQUEUE reject without a Message-ID
        for chunk in _chunks(missing, 500):
            for r in self._query(f"{_EVENT_SELECT} WHERE id IN ({_placeholders(len(chunk))})", chunk):
                found[r["id"]] = Event.from_row(r)
        out = sorted(found.values(), key=lambda e: (e.ts, e.id or 0))
        if since is not None:
            out = [e for e in out if e.ts >= since]
        return out

    # -- retention, backup ----
    def prune(self, cutoff: float, batch: int = 5000, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Delete delivered outbox rows delivered before ``cutoff``, then events recorded
        before it, ``batch`` rows per transaction (the tracker keeps writing in between).
        Kept always: undelivered outbox rows and their events, the tracker's state, and
        every event of a message still in the queue (it has state). Operator events older
        than ``cutoff`` go too. Counters are not touched. Returns (events, outbox rows)
        deleted."""
        outbox = events = 0
        while True:
            with self.transaction() as tx:
                n = tx._c.delete_count(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE delivered_at IS NOT NULL"
                    " AND delivered_at < ? ORDER BY id LIMIT ?)", [cutoff, batch])
            outbox += n
            if progress:
                progress(events, outbox)
            if n < batch:
                break
        while True:
            with self.transaction() as tx:
                n = tx._c.delete_count(
                    "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.ts < ?"
                    " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id AND o.delivered_at IS NULL)"
                    " AND NOT EXISTS (SELECT 1 FROM state s WHERE s.node = e.node AND s.queue_id = e.queue_id)"
                    " ORDER BY e.id LIMIT ?)", [cutoff, batch])
            events += n
            if progress:
                progress(events, outbox)
            if n < batch:
                break
        with self.transaction() as tx:  # operator events: a few a day, one statement
            tx._c.execute("DELETE FROM operator_events WHERE ts < ?", [cutoff])
        return events, outbox

    # -- operator events ----
    def add_operator_events(self, node: str, records: Iterable[dict[str, Any]]) -> int:
        """Record operator events of ``node`` in one transaction; returns how many."""
        n = 0
        with self.transaction() as tx:
            for r in records:
                tx.add_operator_event(node, r)
                n += 1
        return n

    def operator_events(
        self, *, since: float | None = None, node: str | None = None, kinds: Iterable[str] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Operator events, oldest first (the last ``limit`` of them): dicts with id, at,
        node, event, subject, detail and the event's further fields."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if node is not None:
            where.append("node = ?")
            params.append(node)
        if kinds is not None:
            names = list(kinds)
            if not names:
                return []
            where.append(f"event IN ({_placeholders(len(names))})")
            params += names
        sql = "SELECT id, ts, node, event, subject, detail, fields FROM operator_events"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for r in reversed(self._query(sql, params)):
            out.append({"id": int(r["id"]), "at": float(r["ts"]), "node": r["node"], "event": r["event"],
                        "subject": r["subject"], "detail": r["detail"], **json.loads(r["fields"] or "{}")})
        return out

    def backup(self, target: Path | str) -> None:
        """Copy the store to ``target`` consistently while it is in use (SQLite's online
        backup API). PostgreSQL: use pg_dump (docs/tracking.md)."""
        raise ConfigError(f"{self.safe_dsn}: relayctl backup copies an SQLite store; back up PostgreSQL with pg_dump (docs/tracking.md)")

    def events_after(self, tenant: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """``tenant``'s events with a sequence number above ``after``, in sequence order:
        a cursor for pulling (``relayctl events``) and for replays."""
        return [Event.from_row(r) for r in self._query(
            f"{_EVENT_SELECT} WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?", [tenant, int(after), int(limit)])]

    def first_seq_since(self, tenant: str, since: float) -> int | None:
        """The sequence number of ``tenant``'s first event at or after ``since``."""
        rows = self._query("SELECT MIN(seq) AS s FROM events WHERE tenant = ? AND ts >= ?", [tenant, since])
        return int(rows[0]["s"]) if rows and rows[0]["s"] is not None else None

    def stats(self, since: float, until: float, tenant: str | None = None) -> dict[str, dict[str, int]]:
        """{tenant: {kind: count}} for since <= ts < until; every kind is present (0 if
        none) for each tenant that has events. Events without a tenant count under "-"."""
        sql = "SELECT tenant, kind, COUNT(*) AS n FROM events WHERE ts >= ? AND ts < ?"
        params: list[Any] = [since, until]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        out: dict[str, dict[str, int]] = {}
        for r in self._query(sql + " GROUP BY tenant, kind", params):
            counts = out.setdefault(r["tenant"] or "-", {k.value: 0 for k in Kind})
            counts[r["kind"]] = int(r["n"])
        return out

    def event_counts(self, node: str | None = None) -> dict[tuple[str, str], int]:
        """(tenant or "-", kind) -> all-time total of events recorded by ``node`` (None: all
        nodes), from the counters the writer keeps: one row per series, never a scan of
        the events, and never lowered by ``prune``."""
        sql = "SELECT tenant, label, SUM(value) AS n FROM counters WHERE metric = 'events'"
        params: list[Any] = []
        if node is not None:
            sql += " AND node = ?"
            params.append(node)
        rows = self._query(sql + " GROUP BY tenant, label", params)
        return {(r["tenant"], r["label"]): int(r["n"]) for r in rows}

    def delay_histograms(self, node: str) -> dict[str, dict[str, Any]]:
        """tenant -> {"buckets": {le: cumulative count}, "sum": seconds, "count": n} of
        ``node``'s RELAYED deliveries (Postfix's delay=)."""
        out: dict[str, dict[str, Any]] = {}
        rows = self._query("SELECT metric, tenant, label, value FROM counters WHERE node = ? AND metric LIKE 'delay_%'", [node])
        labels = [_le(b) for b in (*DELAY_BUCKETS, float("inf"))]
        for r in rows:
            h = out.setdefault(r["tenant"], {"buckets": dict.fromkeys(labels, 0), "sum": 0.0, "count": 0})
            if r["metric"] == "delay_bucket":
                h["buckets"][r["label"]] = int(r["value"])
            elif r["metric"] == "delay_sum":
                h["sum"] = float(r["value"])
            elif r["metric"] == "delay_count":
                h["count"] = int(r["value"])
        for h in out.values():  # stored per bucket; Prometheus buckets are cumulative
            total = 0
            for le in labels:
                total += h["buckets"][le]
                h["buckets"][le] = total
        return out

    def outbox_due_tenants(self, now: float) -> list[str]:
        """Tenants whose oldest undelivered row is due, the longest waiting first."""
        rows = self._query(f"{_OUTBOX_HEADS} ORDER BY o.next_attempt, o.id", [now])
        return [r["tenant"] for r in rows]

    def outbox_backlog(self) -> dict[str, int]:
        """tenant -> webhook rows not delivered yet (only tenants with a backlog)."""
        rows = self._query("SELECT tenant, COUNT(*) AS n FROM outbox WHERE delivered_at IS NULL GROUP BY tenant")
        return {r["tenant"]: int(r["n"]) for r in rows}

    def checkpoints(self, node: str) -> dict[str, dict]:
        """stream -> ``node``'s committed read position (``relayctl drain`` compares it with
        the end of each log)."""
        rows = self._query("SELECT stream, value FROM checkpoints WHERE node = ?", [node])
        return {r["stream"]: json.loads(r["value"]) for r in rows}

    def state_count(self, node: str) -> int:
        """How many queue ids ``node``'s tracker is still following."""
        rows = self._query("SELECT COUNT(*) AS n FROM state WHERE node = ?", [node])
        return int(rows[0]["n"])

    def queue_tenants(self, node: str, queue_ids: Iterable[str]) -> dict[str, str]:
        """queue id -> tenant for messages in ``node``'s queue: from the tracker's state,
        else from the message's recorded events (state is gone once Postfix removed it)."""
        wanted = sorted(set(queue_ids))
        out: dict[str, str] = {}
        for chunk in _chunks(wanted, 500):
            rows = self._query(
                f"SELECT queue_id, value FROM state WHERE node = ? AND queue_id IN ({_placeholders(len(chunk))})",
                [node, *chunk],
            )
            for r in rows:
                tenant = json.loads(r["value"]).get("tenant")
                if tenant:
                    out[r["queue_id"]] = tenant
        rest = [q for q in wanted if q not in out]
        for chunk in _chunks(rest, 500):
            rows = self._query(
                "SELECT queue_id, MIN(tenant) AS tenant FROM events WHERE node = ? AND tenant IS NOT NULL"
                f" AND queue_id IN ({_placeholders(len(chunk))}) GROUP BY queue_id",
                [node, *chunk],
            )
            out.update({r["queue_id"]: r["tenant"] for r in rows})
        return out


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- SQLite ---------------------------------------------------------------------------


def _rows(cursor: Any) -> list[dict[str, Any]]:
    if cursor.description is None:
        return []
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


class _SqliteConn(_Conn):
    """A SQLite transaction that takes the single writer only at its first write.

    Reads before that go to the shared read connection and see the latest committed data,
    so the webhook sender can read its due rows and POST them without holding the writer
    (a slow receiver must not stall the tracker). Writes are atomic as usual. The tracker
    and the sender write disjoint rows, which is what makes this safe in one process.
    """

    def __init__(self, store: "_SqliteStore"):
        self.store = store
        self.writing = False

    def _begin_write(self) -> None:
        if not self.writing:
            self.store._write_lock.acquire()
            try:
                self.store._writer.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._write_lock.release()
                raise
            self.writing = True

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self.writing:
            return _rows(self.store._writer.execute(sql, params))
        with self.store._read_lock:
            return _rows(self.store._reader.execute(sql, params))

    def query_write(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        self._begin_write()
        return _rows(self.store._writer.execute(sql, params))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._begin_write()
        self.store._writer.execute(sql, params)

    def delete_count(self, sql: str, params: Sequence[Any]) -> int:
        self._begin_write()
        return self.store._writer.execute(sql, params).rowcount

    def finish(self, commit: bool) -> None:
        if not self.writing:
            return
        try:
            if commit:
                try:
                    self.store._writer.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (disk full, I/O error) leaves the transaction
                    # open: end it, or the next writer would inherit it.
                    if self.store._writer.in_transaction:
                        self.store._writer.execute("ROLLBACK")
                    raise
            else:
                self.store._writer.execute("ROLLBACK")
        finally:
            self.writing = False
            self.store._write_lock.release()


class _SqliteStore(Store):
    dialect = "sqlite"
    BUSY_TIMEOUT_MS = 10_000

    def __init__(self, dsn: str, path: str):
        self.dsn = dsn
        self.path = path
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._local = threading.local()
        try:
            self._writer = self._connect()
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._reader = self._connect()
        except sqlite3.Error as exc:
            hint = ""
            parent = Path(path).parent
            if not parent.is_dir():
                hint = f" (directory {parent} does not exist)"
            elif not os.access(parent, os.W_OK):
                hint = f" (directory {parent} is not writable)"
            raise ConfigError(f"events_dsn {dsn}: cannot open the SQLite event store: {exc}{hint}") from None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; reads outside a
        # transaction then always see the latest commit.
        conn = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={self.BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        if getattr(self._local, "active", False):
            raise RuntimeError("nested event store transaction")
        conn = _SqliteConn(self)
        self._local.active = True
        try:
            tx = Tx(conn)
            yield tx
            tx.flush()
        except BaseException:
            conn.finish(commit=False)
            raise
        else:
            conn.finish(commit=True)
        finally:
            self._local.active = False

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        yield _SqliteConn(self)  # never writes: always the read connection

    def claim_node(self, node: str) -> NodeClaim:
        """Claim ``node`` for this tracker: an exclusive flock on a file next to the
        database, which holds the claimant's pid and host for the message a second
        tracker gets."""
        import fcntl
        import socket

        safe = re.sub(r"[^A-Za-z0-9._-]", "_", node)
        path = Path(f"{self.path}.tracker-{safe}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise _node_taken(node, self.safe_dsn, f" ({holder}, lock {path})" if holder else f" (lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

        def release() -> None:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        return NodeClaim(release)

    def backup(self, target: Path | str, pages: int = 1024) -> None:
        """SQLite's online backup API, ``pages`` pages per step: a consistent copy while the
        tracker writes (a plain copy of a WAL database is not). The copy is checked with
        PRAGMA integrity_check; a failed copy is removed."""
        target = Path(target)
        dest = sqlite3.connect(str(target))
        try:
            src = self._connect()
            try:
                src.backup(dest, pages=pages)
            finally:
                src.close()
            dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            ok = dest.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"integrity check of the copy: {ok}")
        except BaseException:
            dest.close()
            target.unlink(missing_ok=True)
            raise
        dest.close()

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()


# -- PostgreSQL -----------------------------------------------------------------------

# Namespace of our advisory locks (first key of the two-int form): "tR".
_LOCK_NAMESPACE = 0x7452
# Session locks that keep one tracker per node name: "tS".
_NODE_NAMESPACE = 0x7453


def tenant_lock_key(tenant: str) -> int:
    """Stable signed 32-bit key for a tenant, the same on every node and Python build."""
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=4).digest(), "big", signed=True)


class _PgConn(_Conn):
    shared = True

    def __init__(self, conn: Any):
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        """The one place where the placeholder style differs: ``?`` -> ``%s``."""
        return sql.replace("%", "%%").replace("?", "%s")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), list(params))
            return _rows(cur)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), list(params))

    def delete_count(self, sql: str, params: Sequence[Any]) -> int:
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), list(params))
            return cur.rowcount

    def lock_tenants(self, tenants: Iterable[str]) -> set[str]:
        got = set()
        for tenant in tenants:
            rows = self.query("SELECT pg_try_advisory_xact_lock(?, ?) AS ok", [_LOCK_NAMESPACE, tenant_lock_key(tenant)])
            if rows[0]["ok"]:
                got.add(tenant)
        return got


class _PgStore(Store):
    """Two connections per thread: one for transactions, one (autocommit) for the read
    side, so reads see committed data only, as with SQLite. The tracker, the sender and
    readers run concurrently, and the sender keeps a transaction open over its POSTs."""

    dialect = "postgresql"
    CONNECT_TIMEOUT = 10

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._conn("tx")  # fail now, with a readable message, not in the first query

    def _conn(self, role: str) -> Any:
        conn = getattr(self._local, role, None)
        if conn is not None and not conn.closed:
            return conn
        import psycopg

        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.CONNECT_TIMEOUT, application_name="relayctl-track")
        except psycopg.Error as exc:
            text = str(exc).strip()
            password = urlsplit(self.dsn).password
            if password:
                text = text.replace(password, "***")
            raise ConfigError(f"events_dsn {self.safe_dsn}: cannot connect to PostgreSQL: {text}") from None
        setattr(self._local, role, conn)
        with self._lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        conn = self._conn("tx")
        from psycopg.pq import TransactionStatus

        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise RuntimeError("nested event store transaction")
        with conn.transaction():
            tx = Tx(_PgConn(conn))
            yield tx
            tx.flush()

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        yield _PgConn(self._conn("read"))

    def _migration_lock(self, conn: _Conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?, 0)", [_LOCK_NAMESPACE])

    def claim_node(self, node: str) -> NodeClaim:
        """Claim ``node`` for this tracker: a session advisory lock on a connection of its
        own, held while the tracker runs (gone with the process or the connection)."""
        import psycopg

        name = f"relayctl-track {node}"[:63]
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.CONNECT_TIMEOUT, application_name=name)
        key = tenant_lock_key(node)
        ok = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [_NODE_NAMESPACE, key]).fetchone()[0]
        if not ok:
            rows = conn.execute(
                "SELECT a.pid, a.client_addr::text, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
                [_NODE_NAMESPACE, key & 0xFFFFFFFF],
            ).fetchall()
            conn.close()
            holder = f" (PostgreSQL backend pid {rows[0][0]}, client {rows[0][1] or 'local'}, since {rows[0][2]:%Y-%m-%d %H:%M:%S%z})" if rows else ""
            raise _node_taken(node, self.safe_dsn, holder)
        return NodeClaim(conn.close)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


# -- opening --------------------------------------------------------------------------


def open_store(dsn: str, migrate: bool = True) -> Store:
    """Open (and by default create or upgrade) the store a DSN names.

    ``sqlite:////abs/path.db``, ``sqlite:///relative.db``, a bare path, or
    ``postgresql://user[:password]@host[:port]/database``. Problems are ConfigErrors that
    name the DSN (never its password).
    """
    store: Store
    if dsn.startswith(("postgresql://", "postgres://")):
        store = _PgStore(dsn)
    elif dsn.startswith("sqlite:"):
        match = re.match(r"^sqlite:///(.+)$", dsn)
        if not match:
            raise ConfigError(f"events_dsn {dsn}: use sqlite:////absolute/path.db")
        if ":memory:" in match.group(1) or match.group(1).startswith("file:"):
            raise ConfigError(f"events_dsn {dsn}: use a file path (the store needs two connections to one database)")
        store = _SqliteStore(dsn, match.group(1))
    elif "://" in dsn:
        raise ConfigError(f"events_dsn {redact_dsn(dsn)}: unsupported; use sqlite:////absolute/path.db or postgresql://user@host/database")
    else:
        store = _SqliteStore(dsn, dsn)
    if migrate:
        try:
            store.migrate()
        except ConfigError:
            store.close()
            raise
        except _db_errors() as exc:
            store.close()
            raise ConfigError(f"events_dsn {store.safe_dsn}: cannot create or upgrade the schema: {exc}") from None
    return store


def _db_errors() -> tuple[type[BaseException], ...]:
    """Database errors of both drivers (psycopg only when it is installed)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)
