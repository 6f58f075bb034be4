"""Per-tenant ingress limits and backpressure (tenant ``limits``): pure decisions the
milter's policy asks at the moment the tenant of a transaction is known.

- ``messages_per_minute`` / ``messages_per_day``: fixed windows (the UTC minute, the UTC
  day) counted in memory when a message is accepted: O(1) per message, no database. The
  counters are per node: one ``Counters`` table shared by every worker process of the
  milter (``milter/sharedcounters.py``; ``LocalCounters`` in one process). They survive
  tenant reloads (the gate is shared) but not a milter restart.
- ``recipients_per_message``: the recipient past the limit gets 452 (RFC 5321 clients send
  the rest in a further transaction).
- ``max_queued`` / ``max_queue_age``: read from a queue summary file that the tracker
  writes (``summary_document``) and a background thread of the milter re-reads
  (``parse_summary``, ``milter/backpressure.py``); never a ``postqueue`` run per message.

Every refusal is a 452, so the platform keeps the mail and retries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from relay_milter.config import Tenant

RATE_DSN = "4.7.0"
BACKPRESSURE_DSN = "4.3.1"


@dataclass(frozen=True)
class TenantQueue:
    """One tenant's share of the Postfix queue at the last refresh."""

    queued: int = 0
    oldest_deferred: float | None = None  # arrival time (epoch) of the oldest deferred message


class Counters(Protocol):
    """Per-tenant message counts of the current UTC minute and day (thread-safe)."""

    def window(self, tenant_id: str, minute: int, day: int, add: int = 0) -> tuple[int, int]:
        """Start new windows if ``minute``/``day`` moved on, add ``add`` to both counts
        (atomically), and return (this minute's count, this day's count)."""
        ...


# -- the queue summary file (written by the tracker, read by the milter) ------------------

SUMMARY_VERSION = 1

Freshness = Literal["fresh", "stale", "expired"]


def summary_document(queues: dict[str, TenantQueue], written: float, node: str, refresh: float) -> dict[str, Any]:
    """The JSON document of the summary file: when it was written, by which node, and per
    tenant the messages queued (held ones excluded) and the oldest deferred arrival time."""
    return {
        "version": SUMMARY_VERSION,
        "written": written,
        "node": node,
        "refresh": refresh,
        "tenants": {tid: {"queued": q.queued, "oldest_deferred": q.oldest_deferred} for tid, q in sorted(queues.items())},
    }


def parse_summary(doc: Any) -> tuple[float, dict[str, TenantQueue]]:
    """(written, per-tenant queues) of a summary document; ValueError if it is not one."""
    if not isinstance(doc, dict) or doc.get("version") != SUMMARY_VERSION:
        raise ValueError("not a queue summary of version 1")
    try:
        written = float(doc["written"])
        tenants = doc["tenants"]
        if not isinstance(tenants, dict):
            raise TypeError("tenants is not an object")
        queues = {
            str(tid): TenantQueue(int(q["queued"]), None if q.get("oldest_deferred") is None else float(q["oldest_deferred"]))
            for tid, q in tenants.items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed queue summary: {exc!r}") from None
    return written, queues


def stale_after(refresh: float) -> float:
    """A summary not rewritten for this long is stale (the writer missed a few rounds)."""
    return max(3 * refresh, 1.0)


def freshness(written: float, now: float, refresh: float, max_age: float) -> Freshness:
    """fresh: use it; stale: keep using the last one and warn; expired: do not trust it
    (backpressure fails open)."""
    age = now - written
    if age > max_age:
        return "expired"
    if age > stale_after(refresh):
        return "stale"
    return "fresh"


@dataclass
class _Counter:
    minute: int = -1
    per_minute: int = 0
    day: int = -1
    per_day: int = 0


@dataclass
class LocalCounters:
    """The counts of one process, in a dict."""

    _counters: dict[str, _Counter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def window(self, tenant_id: str, minute: int, day: int, add: int = 0) -> tuple[int, int]:
        with self._lock:
            c = self._counters.setdefault(tenant_id, _Counter())
            if c.minute != minute:
                c.minute, c.per_minute = minute, 0
            if c.day != day:
                c.day, c.per_day = day, 0
            c.per_minute += add
            c.per_day += add
            return c.per_minute, c.per_day


@dataclass
class IngressGate:
    """Shared by every Policy of one milter process (thread-safe); its ``counters`` may
    be shared by several processes."""

    clock: Callable[[], float] = time.time
    counters: Counters = field(default_factory=LocalCounters)
    _queues: dict[str, TenantQueue] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- queue summary (written by the background refresher) --------------------------

    def set_queues(self, queues: dict[str, TenantQueue]) -> None:
        with self._lock:
            self._queues = dict(queues)

    def queue(self, tenant_id: str) -> TenantQueue:
        with self._lock:
            return self._queues.get(tenant_id, TenantQueue())

    # -- decisions --------------------------------------------------------------------

    def backpressure(self, tenant: Tenant) -> tuple[str, str, str] | None:
        """(code, dsn, reason) if the tenant's queue is past its limits."""
        limits = tenant.limits
        if limits.max_queued is None and limits.max_queue_age is None:
            return None
        q = self.queue(tenant.id)
        if limits.max_queued is not None and q.queued >= limits.max_queued:
            return ("452", BACKPRESSURE_DSN, f"tenant {tenant.id}: {q.queued} messages queued (limit max_queued {limits.max_queued}), try again later")
        if limits.max_queue_age is not None and q.oldest_deferred is not None:
            age = self.clock() - q.oldest_deferred
            if age >= limits.max_queue_age:
                return ("452", BACKPRESSURE_DSN, f"tenant {tenant.id}: oldest deferred message is {int(age)}s old (limit max_queue_age {int(limits.max_queue_age)}s), try again later")
        return None

    def rate(self, tenant: Tenant) -> tuple[str, str, str] | None:
        """(code, dsn, reason) if another message now would pass a message limit."""
        limits = tenant.limits
        if limits.messages_per_minute is None and limits.messages_per_day is None:
            return None
        per_minute, per_day = self._window(tenant.id)
        if limits.messages_per_minute is not None and per_minute >= limits.messages_per_minute:
            return ("452", RATE_DSN, f"tenant {tenant.id}: limit messages_per_minute ({limits.messages_per_minute}) reached, try again later")
        if limits.messages_per_day is not None and per_day >= limits.messages_per_day:
            return ("452", RATE_DSN, f"tenant {tenant.id}: limit messages_per_day ({limits.messages_per_day}) reached, try again later")
        return None

    def admit(self, tenant: Tenant) -> tuple[str, str, str] | None:
        """At the moment the transaction's tenant is known: backpressure first, then rates."""
        return self.backpressure(tenant) or self.rate(tenant)

    def recipients(self, tenant: Tenant, accepted: int) -> tuple[str, str, str] | None:
        """Before accepting one more recipient, ``accepted`` being those already accepted."""
        limit = tenant.limits.recipients_per_message
        if limit is not None and accepted >= limit:
            return ("452", RATE_DSN, f"tenant {tenant.id}: limit recipients_per_message ({limit}) reached, send the rest in another transaction")
        return None

    def accepted(self, tenant: Tenant) -> None:
        """Count one accepted message."""
        if tenant.limits.messages_per_minute is None and tenant.limits.messages_per_day is None:
            return
        self._window(tenant.id, add=1)

    def counts(self, tenant_id: str) -> tuple[int, int]:
        return self._window(tenant_id)

    def _window(self, tenant_id: str, add: int = 0) -> tuple[int, int]:
        now = self.clock()
        return self.counters.window(tenant_id, int(now // 60), int(now // 86400), add)
