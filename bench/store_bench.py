#!/usr/bin/env python3
"""Event store at scale: the metrics pass and `trace` lookups at 10 K and 1 M events.

Fills a fresh store through the tracker's own write path (``record_event`` in batches, so
sequence numbers and the per-node counters are kept as in production), then times:

- the metrics pass as ``relayctl track`` runs it every 15 s (this node's counters, the
  delay histograms and the webhook backlog), and, for comparison, the full-table
  ``COUNT(*) ... GROUP BY`` that the counters replaced;
- ``Store.trace`` by queue id, Message-ID, recipient and upstream id (random existing
  keys), and ``events_after`` (the ``relayctl events`` cursor).

Each figure is the median of ``--repeat`` runs, in milliseconds. This is a benchmark, not a
test: the suite never times anything.

    .venv/bin/python bench/store_bench.py                          # SQLite, 10K and 1M
    .venv/bin/python bench/store_bench.py --sizes 10000 --dsn postgresql://relay@db/bench_events
    .venv/bin/python bench/store_bench.py --markdown /tmp/store.md

The store is created under --dir (default: a temporary directory, removed at the end), or
in the PostgreSQL database --dsn names (its tables are dropped first: use a scratch database).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import Store, open_store
from relay_milter.tracking.webhooks import record_event

T0 = 1_790_000_000.0
TENANTS = [f"tenant{i:02d}" for i in range(20)]
NODES = ["relay1", "relay2"]
BATCH = 5000


def fill(store: Store, n: int, seed: int = 13) -> dict[str, list[str]]:
    """``n`` events: messages of 1-2 recipients, RECEIVED then RELAYED (one in ten deferred
    first), over 20 tenants and 2 nodes, 1 % with a webhook row (all but the newest 100
    delivered at the end, as in a steady state). Returns sample keys."""
    rng = random.Random(seed)
    keys: dict[str, list[str]] = {"queue_id": [], "message_id": [], "recipient": [], "upstream_id": []}
    written = m = 0
    started = time.monotonic()
    while written < n:
        with store.transaction() as tx:
            in_batch = 0
            while in_batch < BATCH and written < n:
                m += 1
                tenant, node = TENANTS[m % len(TENANTS)], NODES[m % len(NODES)]
                qid = f"{m:011X}"
                common = dict(tenant=tenant, queue_id=qid, message_id=f"<m{m}@{tenant}.example>",
                              upstream_id=f"up-{m}", sender=f"news@{tenant}.example", size=2048)
                rcpts = [f"user{m}-{r}@example.org" for r in range(1 + (m % 2))]
                ts = T0 + m * 0.5
                evs = [Event(Kind.RECEIVED, ts, node, recipient=r, **common) for r in rcpts]
                if m % 10 == 0:
                    evs += [Event(Kind.DEFERRED, ts + 1, node, recipient=r, response_code="451", dsn="4.3.0",
                                  reason="deferred (451 try later)", **common) for r in rcpts]
                evs += [Event(Kind.RELAYED, ts + 2, node, recipient=r, response_code="250", dsn="2.0.0",
                              reason="sent (250 ok)", delay=rng.uniform(0.05, 30), delays="0/0/0.1/0.2", **common) for r in rcpts]
                for ev in evs:
                    record_event(tx, ev, webhook=(m % 100 == 0))
                written += len(evs)
                in_batch += len(evs)
                if rng.random() < 0.001:
                    keys["queue_id"].append(qid)
                    keys["message_id"].append(common["message_id"])
                    keys["recipient"].append(rcpts[0])
                    keys["upstream_id"].append(common["upstream_id"])
        if sys.stderr.isatty():
            print(f"\r  {written:,} events, {written / (time.monotonic() - started):,.0f}/s", end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    # A steady state: the webhook workers have delivered all but the newest 100 rows.
    with store.transaction() as tx:
        tx._c.execute("UPDATE outbox SET delivered_at = created WHERE id <= (SELECT MAX(id) - 100 FROM outbox)")
    return keys


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(store: Store, keys: dict[str, list[str]], repeat: int) -> dict[str, float]:
    out = {}
    out["metrics pass (counters)"] = median_ms(
        lambda: (store.event_counts("relay1"), store.delay_histograms("relay1"), store.outbox_backlog()), repeat)
    out["full scan COUNT(*) GROUP BY (old)"] = median_ms(
        lambda: store._query("SELECT tenant, kind, COUNT(*) AS n FROM events GROUP BY tenant, kind"), max(1, repeat // 3))
    for kind, sample in keys.items():
        picks = sample[:repeat] or sample
        it = iter(picks * (repeat // max(1, len(picks)) + 1))
        out[f"trace by {kind}"] = median_ms(lambda: store.trace(next(it)), repeat)
    out["events --after (cursor, 100)"] = median_ms(lambda: store.events_after("tenant07", 100, 100), repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000", help="Comma-separated event counts (default: 10000,1000000).")
    ap.add_argument("--dsn", default=None, help="PostgreSQL scratch database (default: SQLite in --dir).")
    ap.add_argument("--dir", type=Path, default=None, help="Where the SQLite stores go (default: a temporary directory).")
    ap.add_argument("--repeat", type=int, default=21, help="Runs per figure; the median is shown.")
    ap.add_argument("--markdown", type=Path, default=None, help="Also write the table to this file.")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="relay-store-bench-"))
    results: dict[int, dict[str, float]] = {}
    info: dict[int, str] = {}
    try:
        for n in sizes:
            if args.dsn:
                dsn = args.dsn
                with open_store(dsn, migrate=False) as s:
                    with s.transaction() as tx:
                        for t in ("events", "checkpoints", "state", "outbox", "tenant_seq", "counters", "schema_version"):
                            tx._c.execute(f"DROP TABLE IF EXISTS {t}")
            else:
                dsn = f"sqlite:///{work}/events-{n}.db"
            print(f"filling {n:,} events into {dsn.split('@')[-1]}", file=sys.stderr)
            with open_store(dsn) as store:
                t = time.monotonic()
                keys = fill(store, n)
                fill_s = time.monotonic() - t
                size = os.path.getsize(dsn[len("sqlite:///"):]) if dsn.startswith("sqlite") else 0
                info[n] = f"filled in {fill_s:.0f} s ({n / fill_s:,.0f} events/s)" + (f", {size / 2**20:,.0f} MiB" if size else "")
                results[n] = measure(store, keys, args.repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    backend = "PostgreSQL" if args.dsn else "SQLite"
    lines = [f"Event store, {backend}; median of {args.repeat} runs, milliseconds.", ""]
    lines.append("| operation | " + " | ".join(f"{n:,} events" for n in sizes) + " |")
    lines.append("|---|" + "---:|" * len(sizes))
    for op in results[sizes[0]]:
        lines.append(f"| {op} | " + " | ".join(f"{results[n][op]:.2f}" for n in sizes) + " |")
    lines.append("")
    lines += [f"- {n:,} events: {info[n]}" for n in sizes]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
