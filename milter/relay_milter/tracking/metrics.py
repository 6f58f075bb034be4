"""Prometheus metrics as a node-exporter textfile (collector.textfile).

No HTTP listener: the relay already runs node-exporter, and a file written atomically
every few seconds is the least moving part. ``render`` is pure (a snapshot in, exposition
text out); ``write_textfile`` replaces the file with rename(2), so node-exporter never
reads half a file; ``collect`` gathers a snapshot from the store and the queue.

Series (all gauges except the counter):

    relay_events_total{tenant,event}            events recorded by the tracker (counter)
    relay_queue_messages{tenant,queue}          messages in each Postfix queue
    relay_queue_oldest_deferred_seconds{tenant} age of the oldest deferred message (0: none)
    relay_webhook_backlog{tenant}               webhook notifications not yet delivered
    relay_tracker_last_run_timestamp_seconds    when the tracker last committed a batch

``event`` is the event kind as in ``relayctl trace`` and webhooks (RELAYED, DEFERRED, ...).
Every configured tenant gets every queue series, zeros included, so a series does not
vanish when a queue drains (alerts on absent series are error-prone).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay_milter.tracking.events import Kind

# Postfix's queues, in the order their series are written (postconf(5), queue_directory).
QUEUES: tuple[str, ...] = ("active", "deferred", "hold", "incoming", "maildrop")


class QueueRow(Protocol):
    """One tenant's share of the Postfix queue, as the metrics need it. Any object with
    these attributes will do (the queue summary of ``relayctl queue`` is one)."""

    @property
    def tenant(self) -> str: ...
    @property
    def counts(self) -> Mapping[str, int]: ...  # queue name -> messages; a missing queue is 0
    @property
    def oldest_deferred_age(self) -> float | None: ...  # seconds; None when none is deferred


@dataclass
class Snapshot:
    """Everything one textfile shows. Missing parts (None) are left out, not zeroed."""

    tenants: tuple[str, ...] = ()  # configured tenant ids: series that always exist
    event_counts: Mapping[tuple[str, str], int] | None = None  # (tenant, kind) -> total
    queue: Sequence[QueueRow] | None = None
    webhook_backlog: Mapping[str, int] | None = None  # tenant -> undelivered rows
    tracker_last_run: float | None = None  # epoch seconds


class MetricsStore(Protocol):
    def event_counts(self) -> dict[tuple[str, str], int]: ...
    def outbox_backlog(self) -> dict[str, int]: ...


def escape_label(value: str) -> str:
    """Label value escaping of the text exposition format: backslash, quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escaping: backslash and newline only (quotes are literal there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            lines.append(f"{name} {_number(value)}")
    return lines


def render(snap: Snapshot) -> str:
    """The exposition text (ends with a newline). Samples are sorted: stable diffs, stable tests."""
    out: list[str] = []
    if snap.event_counts is not None:
        counts = dict(snap.event_counts)
        for t in snap.tenants:
            for k in Kind:
                counts.setdefault((t, k.value), 0)
        out += _family(
            "relay_events_total", "counter", "Delivery events recorded by the tracker, by tenant and event kind.",
            (({"tenant": t, "event": e}, n) for (t, e), n in sorted(counts.items())),
        )
    if snap.queue is not None:
        rows = {r.tenant: r for r in snap.queue}
        names = sorted(set(snap.tenants) | set(rows))
        out += _family(
            "relay_queue_messages", "gauge", "Messages in the Postfix queue, by tenant and queue.",
            (
                ({"tenant": t, "queue": q}, rows[t].counts.get(q, 0) if t in rows else 0)
                for t in names
                for q in QUEUES
            ),
        )
        out += _family(
            "relay_queue_oldest_deferred_seconds", "gauge",
            "Age of the tenant's oldest deferred message in seconds (0 when none is deferred).",
            (({"tenant": t}, round((rows[t].oldest_deferred_age or 0) if t in rows else 0, 3)) for t in names),
        )
    if snap.webhook_backlog is not None:
        backlog = dict.fromkeys(snap.tenants, 0) | dict(snap.webhook_backlog)
        out += _family(
            "relay_webhook_backlog", "gauge", "Webhook notifications not yet delivered, by tenant.",
            (({"tenant": t}, n) for t, n in sorted(backlog.items())),
        )
    if snap.tracker_last_run is not None:
        out += _family(
            "relay_tracker_last_run_timestamp_seconds", "gauge",
            "Unix time of the tracker's last committed batch.",
            [({}, round(snap.tracker_last_run, 3))],
        )
    return "\n".join(out) + "\n" if out else ""


def write_textfile(path: Path | str, text: str) -> None:
    """Replace ``path`` atomically (temp file in the same directory, fsync, rename), mode 0644.

    The temp name does not end in .prom, so node-exporter ignores it if we die midway.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def collect(
    tenants: Iterable[str],
    store: MetricsStore | None,
    queue: Sequence[QueueRow] | None,
    tracker_last_run: float | None = None,
) -> Snapshot:
    """A snapshot from the store (events, webhook backlog) and an attributed queue summary."""
    return Snapshot(
        tenants=tuple(tenants),
        event_counts=store.event_counts() if store is not None else None,
        queue=queue,
        webhook_backlog=store.outbox_backlog() if store is not None else None,
        tracker_last_run=tracker_last_run,
    )
