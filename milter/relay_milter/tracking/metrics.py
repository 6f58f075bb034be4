"""Prometheus metrics as a node-exporter textfile (collector.textfile).

No HTTP listener: the relay already runs node-exporter, and a file written atomically
every few seconds is the least moving part. ``render`` is pure (a snapshot in, exposition
text out); ``write_textfile`` replaces the file with rename(2), so node-exporter never
reads half a file; ``collect`` gathers a snapshot from the store and the queue.

Series (all gauges except the counters and the histogram):

    relay_events_total{node,tenant,event}       events recorded by this node's tracker (counter)
    relay_delivery_delay_seconds{node,tenant}   Postfix delay= of RELAYED deliveries (histogram)
    relay_queue_messages{tenant,queue}          messages in each Postfix queue
    relay_queue_oldest_deferred_seconds{tenant} age of the oldest deferred message (0: none)
    relay_webhook_backlog{tenant}               webhook notifications not yet delivered
    relay_tracker_last_run_timestamp_seconds    when the tracker last completed a pass (its heartbeat)
    relay_tls_certificate_expiry_timestamp_seconds{file}  notAfter of the relay's certificate

``event`` is the event kind as in ``relayctl trace`` and webhooks (RELAYED, DEFERRED, ...).
The counters come from per-node rows the tracker updates in the transaction that records
the events: reading them costs the same at a thousand events as at a million, each node
exports only its own (sum them across nodes), and pruning old events never lowers them.
Every configured tenant gets every queue series, zeros included, so a series does not
vanish when a queue drains (alerts on absent series are error-prone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from relay_milter import defaults
from relay_milter.files import replace_file
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import DELAY_BUCKETS

DELAY_BUCKET_LABELS: tuple[str, ...] = tuple(f"{b:g}" for b in DELAY_BUCKETS)

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
    node: str | None = None  # labels the per-node counters
    delays: Mapping[str, Mapping] | None = None  # tenant -> {"buckets": {le: n}, "sum", "count"}
    certificates: Mapping[str, float] | None = None  # certificate file -> notAfter (epoch seconds)


class MetricsStore(Protocol):
    def event_counts(self, node: str | None = None) -> dict[tuple[str, str], int]: ...
    def delay_histograms(self, node: str) -> dict[str, dict]: ...
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


# Up to this many configured tenants, every series of every tenant exists from the start (0 until
# something happens), so rate() and alerts see it. Beyond it, only series with something
# recorded are written: 10,000 tenants would otherwise make some 350,000 series of zeros
# (events by kind, histogram buckets, queues), nearly all for label combinations never used.
ZERO_FILL_TENANTS = defaults.METRICS_ZERO_FILL_TENANTS


def zero_filled(tenants: Iterable[str]) -> tuple[str, ...]:
    """The tenants whose unused series are written as 0: all of them, or none past the limit."""
    tenants = tuple(tenants)
    return tenants if len(tenants) <= ZERO_FILL_TENANTS else ()


def render(snap: Snapshot) -> str:
    """The exposition text (ends with a newline). Samples are sorted: stable diffs, stable tests."""
    out: list[str] = []
    snap = replace(snap, tenants=zero_filled(snap.tenants))
    if snap.event_counts is not None:
        counts = dict(snap.event_counts)
        for t in snap.tenants:
            for k in Kind:
                counts.setdefault((t, k.value), 0)
        node = {"node": snap.node} if snap.node else {}
        out += _family(
            "relay_events_total", "counter", "Delivery events recorded by the tracker, by tenant and event kind.",
            ((node | {"tenant": t, "event": e}, n) for (t, e), n in sorted(counts.items())),
        )
    if snap.delays is not None:
        node = {"node": snap.node} if snap.node else {}
        hists = {t: snap.delays.get(t, {}) for t in sorted(set(snap.tenants) | set(snap.delays))}
        lines = [
            "# HELP relay_delivery_delay_seconds " + escape_help("Postfix's delay (arrival to the smarthost's 2xx) of relayed deliveries, by tenant."),
            "# TYPE relay_delivery_delay_seconds histogram",
        ]
        for t, h in hists.items():
            buckets = h.get("buckets", {})
            for le in [*DELAY_BUCKET_LABELS, "+Inf"]:
                lines += _family("relay_delivery_delay_seconds_bucket", "", "", [(node | {"tenant": t, "le": le}, buckets.get(le, 0))])[2:]
            lines += _family("relay_delivery_delay_seconds_sum", "", "", [(node | {"tenant": t}, round(h.get("sum", 0), 3))])[2:]
            lines += _family("relay_delivery_delay_seconds_count", "", "", [(node | {"tenant": t}, h.get("count", 0))])[2:]
        out += lines
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
    if snap.certificates:
        out += _family(
            "relay_tls_certificate_expiry_timestamp_seconds", "gauge",
            "Unix time at which the relay's own TLS certificate expires (notAfter).",
            (({"file": f}, round(t)) for f, t in sorted(snap.certificates.items())),
        )
    return "\n".join(out) + "\n" if out else ""


def write_textfile(path: Path | str, text: str) -> None:
    """Replace ``path`` atomically (temp file in the same directory, fsync, rename), mode 0644.

    The temp name does not end in .prom, so node-exporter ignores it if we die midway.
    """
    replace_file(path, text, 0o644)


def certificate_expiry(path: Path | str) -> float | None:
    """notAfter of the first certificate in a PEM file (epoch seconds), None if unreadable."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


def collect(
    tenants: Iterable[str],
    store: MetricsStore | None,
    queue: Sequence[QueueRow] | None,
    tracker_last_run: float | None = None,
    node: str | None = None,
    certificates: Iterable[Path | str] = (),
) -> Snapshot:
    """A snapshot from the store (this node's counters, webhook backlog) and an attributed
    queue summary."""
    return Snapshot(
        tenants=tuple(tenants),
        node=node,
        event_counts=store.event_counts(node) if store is not None else None,
        delays=store.delay_histograms(node) if store is not None and node else None,
        queue=queue,
        webhook_backlog=store.outbox_backlog() if store is not None else None,
        tracker_last_run=tracker_last_run,
        certificates={str(p): t for p in certificates if (t := certificate_expiry(p)) is not None},
    )
