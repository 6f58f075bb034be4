"""The relay's Postfix queue seen per tenant: read, summarise, select, hold/release/requeue.

Postfix knows nothing about tenants. A queued message is attributed to one:

1. by the tracker's per-queue-id state (``store.queue_tenants``), which knows the tenant
   the milter routed the message to (the most reliable answer);
2. otherwise by the envelope sender's domain: the tenant whose ``allowed_sender_domains``,
   bounce domains or hop signing domain contain it, if exactly one does. Bounces the relay
   generates itself have the null sender (``MAILER-DAEMON`` in postqueue -j); they go to
   the original sender, so for them the recipients' domains are used the same way (all
   must name the same tenant);
3. otherwise ``-`` (unattributed). ``postqueue -j`` does not show the transport, so there
   is no better guess.

Nothing here parses ``postqueue -p`` text: ``postqueue -j`` (Postfix >= 3.1) is the
stable, one-JSON-object-per-line interface. Every tool runs through
``postfix.runner.run_postfix_tool``; its failures reach callers as ``OpsError``. Changes go through ``postsuper`` with queue ids
on standard input, in chunks, so a 100 000-message queue neither hits the argument-length
limit nor keeps the operator without progress.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from relay_milter.config import TenantSet
from relay_milter.core import quota
from relay_milter.postfix.runner import PostfixToolError, run_postfix_tool

QUEUES: tuple[str, ...] = ("active", "deferred", "hold", "incoming", "maildrop")
UNATTRIBUTED = "-"
# postsuper options per action, and the line it prints with the number of messages changed.
# "requeue" is ``schedule_retry`` (postqueue -i), not postsuper -r: it keeps the queue id and
# skips a second pass through cleanup. (postsuper -r is safe too: master.cf routes mail that
# comes back through pickup by the route seal the milter added, an HMAC under the relay's key
# on a top-level header only; see core/route.py.)
ACTIONS: dict[str, tuple[str, str]] = {
    "hold": ("-h", "Placed on hold"),
    "release": ("-H", "Released from hold"),
}
CHUNK = 2000  # queue ids per postsuper run: bounded memory, frequent progress
TOP_REASONS = 3
_TIMEOUT = 600  # seconds; postqueue -j over a six-figure queue takes a while on slow disks


class OpsError(Exception):
    """Postfix (or the store) could not answer. The message is meant for the operator as is."""


class QueueTenantSource(Protocol):
    """The one store method this module needs (eventstore.Store has it)."""

    def queue_tenants(self, node: str, queue_ids: Iterable[str]) -> dict[str, str]: ...


@dataclass
class QueuedMessage:
    queue_id: str
    queue: str  # active | deferred | hold | incoming | maildrop
    arrival: float  # epoch seconds
    size: int
    sender: str  # postqueue -j shows the null sender (bounces) as MAILER-DAEMON
    recipients: list[dict[str, Any]]  # postqueue -j: address, orig_address?, delay_reason?
    forced_expire: bool = False
    tenant: str = UNATTRIBUTED

    @classmethod
    def from_postqueue(cls, obj: dict[str, Any]) -> "QueuedMessage":
        return cls(
            queue_id=str(obj["queue_id"]),
            queue=str(obj.get("queue_name", "")),
            arrival=float(obj.get("arrival_time") or 0),
            size=int(obj.get("message_size") or 0),
            sender=str(obj.get("sender") or ""),
            recipients=list(obj.get("recipients") or []),
            forced_expire=bool(obj.get("forced_expire", False)),
        )

    @property
    def delay_reasons(self) -> list[str]:
        return [r["delay_reason"] for r in self.recipients if r.get("delay_reason")]

    def to_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "queue": self.queue,
            "tenant": self.tenant,
            "arrival": self.arrival,
            "size": self.size,
            "sender": self.sender,
            "recipients": self.recipients,
        }


# -- reading the queue ---------------------------------------------------------------------


def parse_postqueue_json(lines: Iterable[str]) -> Iterator[QueuedMessage]:
    """One message per non-empty line of ``postqueue -j`` output."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield QueuedMessage.from_postqueue(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise OpsError(f"postqueue -j: unreadable line {n}: {exc}: {line[:200]!r}") from None


def read_queue(config_directory: Path | str) -> list[QueuedMessage]:
    """Run ``postqueue -c DIR -j`` for our instance and parse its output."""
    cmd = ["postqueue", "-c", str(config_directory), "-j"]
    r = run_tool(cmd, " ".join(cmd), None, _TIMEOUT, None)
    return list(parse_postqueue_json(r.stdout.splitlines()))


# -- tenants -------------------------------------------------------------------------------


def domain_tenants(tenants: TenantSet) -> dict[str, str]:
    """Domain -> tenant id, for domains exactly one tenant sends from (ambiguous ones dropped)."""
    owners: dict[str, set[str]] = defaultdict(set)
    for t in tenants:
        for d in (*t.allowed_sender_domains, *t.bounce_domains, t.signing_domain):
            owners[d.lower()].add(t.id)
    return {d: next(iter(ids)) for d, ids in owners.items() if len(ids) == 1}


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def guess_tenant(msg: QueuedMessage, by_domain: dict[str, str]) -> str:
    """The fallback attribution when the tracker's state does not know the queue id.

    postqueue -j shows the null sender as ``MAILER-DAEMON`` (no domain): such a message
    is a bounce or delay notice, owned by the tenant its recipients' domain belongs to.
    """
    if "@" in msg.sender:
        return by_domain.get(_domain(msg.sender), UNATTRIBUTED)
    found = {by_domain.get(_domain(r.get("address", "")), UNATTRIBUTED) for r in msg.recipients}
    return found.pop() if len(found) == 1 else UNATTRIBUTED


def attribute(
    messages: Sequence[QueuedMessage],
    tenants: TenantSet,
    store: QueueTenantSource | None = None,
    node: str | None = None,
) -> list[QueuedMessage]:
    """Set ``tenant`` on every message (in place; returned for chaining)."""
    known: dict[str, str] = {}
    if store is not None and node is not None and messages:
        try:
            known = store.queue_tenants(node, [m.queue_id for m in messages])
        except Exception as exc:  # the store is a nice-to-have here; say so, don't guess silently
            raise OpsError(f"event store: queue tenant lookup failed: {exc}") from exc
    by_domain = domain_tenants(tenants)
    for m in messages:
        m.tenant = known.get(m.queue_id) or guess_tenant(m, by_domain)
    return messages


# -- summary -------------------------------------------------------------------------------

_MAILBOX = re.compile(r"<[^<>\s@]*@[^<>\s]*>|(?<![\w.+=-])[\w.+=-]+@[\w-]+(?:\.[\w-]+)+")
_QUEUED_AS = re.compile(r"\b(queued as|queue id) [^\s)]+", re.I)
# host[address]:port and enhanced status codes stay as they are.
_PROTECT = re.compile(r"[\w.-]*\[[^\]]*\](?::\d+)?|(?<![\w.])[245]\.\d{1,3}\.\d{1,3}(?![\w.])")
# A standalone token (not part of a dotted name) of 8+ characters with a digit in it.
_LONG_TOKEN = re.compile(r"(?<![\w.-])(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{8,}(?![\w.-])")
_LONG_NUMBER = re.compile(r"(?<![\w.])\d{4,}(?![\w.])")


def normalise_reason(text: str) -> str:
    """Collapse per-message detail so equal causes group together.

    Kept: host names, host[IP]:port, SMTP and enhanced status codes, the reply text.
    Replaced: addresses (``<addr>``), queue ids and other standalone tokens of 8+
    characters with digits, such as ticket or session ids (``<id>``), and numbers of 4+
    digits, such as sizes or timestamps (``<n>``). Short numbers ("retry in 300 s") stay.
    """
    text = _QUEUED_AS.sub(r"\1 <id>", text)
    text = _MAILBOX.sub("<addr>", text)
    saved: list[str] = []

    def keep(m: re.Match[str]) -> str:
        saved.append(m.group(0))
        return f"\x00{len(saved) - 1}\x00"

    text = _PROTECT.sub(keep, text)
    text = _LONG_NUMBER.sub("<n>", text)
    text = _LONG_TOKEN.sub("<id>", text)
    text = re.sub("\x00(\\d+)\x00", lambda m: saved[int(m.group(1))], text)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class TenantQueue:
    """One tenant's share of the queue (messages, not recipients)."""

    tenant: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUES, 0))
    oldest_age: float | None = None  # seconds since the oldest message arrived
    oldest_deferred_age: float | None = None
    reasons: list[tuple[str, int]] = field(default_factory=list)  # top deferral reasons

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "total": self.total,
            "queues": dict(self.counts),
            "oldest_age_seconds": self.oldest_age,
            "oldest_deferred_age_seconds": self.oldest_deferred_age,
            "top_deferral_reasons": [{"reason": r, "messages": n} for r, n in self.reasons],
        }


def queue_summary(messages: Iterable[QueuedMessage], now: float, top: int = TOP_REASONS) -> list[TenantQueue]:
    """Per tenant (sorted by id, ``-`` last): counts per queue, ages, top deferral reasons.

    Reasons are those of messages in the deferred queue (a held message keeps its last
    delay reason, but it is not being retried). A reason counts once per message even if
    several of its recipients share it, so the numbers add up with the deferred count.
    """
    rows: dict[str, TenantQueue] = {}
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for m in messages:
        row = rows.setdefault(m.tenant, TenantQueue(m.tenant))
        row.counts[m.queue] = row.counts.get(m.queue, 0) + 1
        age = max(0.0, now - m.arrival)
        row.oldest_age = age if row.oldest_age is None else max(row.oldest_age, age)
        if m.queue == "deferred":
            row.oldest_deferred_age = age if row.oldest_deferred_age is None else max(row.oldest_deferred_age, age)
            reasons[m.tenant].update({normalise_reason(r) for r in m.delay_reasons})
    for tenant, row in rows.items():
        # Ties sorted by text: the same queue always gives the same table.
        row.reasons = sorted(reasons[tenant].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return sorted(rows.values(), key=lambda r: (r.tenant == UNATTRIBUTED, r.tenant))


def backpressure_queues(rows: Iterable[TenantQueue], now: float) -> dict[str, quota.TenantQueue]:
    """The milter's view of a queue summary (core/quota.py): per attributed tenant, the
    messages queued except held ones (an operator's decision), and the arrival time of its
    oldest deferred message."""
    out: dict[str, quota.TenantQueue] = {}
    for r in rows:
        if r.tenant == UNATTRIBUTED:
            continue
        oldest = None if r.oldest_deferred_age is None else now - r.oldest_deferred_age
        out[r.tenant] = quota.TenantQueue(r.total - r.counts.get("hold", 0), oldest)
    return out


def select(messages: Iterable[QueuedMessage], tenant: str, queues: Iterable[str] | None = None) -> list[str]:
    """Queue ids of ``tenant``'s messages, optionally only in the given queues."""
    wanted = set(queues) if queues else None
    return [m.queue_id for m in messages if m.tenant == tenant and (wanted is None or m.queue in wanted)]


# -- changing the queue --------------------------------------------------------------------


@dataclass
class QueueChange:
    action: str
    requested: int = 0  # queue ids handed to Postfix
    changed: int = 0  # postsuper: messages it reports as changed; postqueue -i: ids it accepted
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "requested": self.requested, "changed": self.changed, "warnings": self.warnings}


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def changed_count(stderr: str, label: str) -> int:
    """postsuper's own tally line, e.g. ``postsuper: Placed on hold: 3 messages``."""
    total = 0
    for m in re.finditer(rf"{re.escape(label)}: (\d+) messages?", stderr):
        total += int(m.group(1))
    return total


def run_tool(cmd: list[str], what: str, stdin: str | None, timeout: float, done: str | None) -> subprocess.CompletedProcess:
    """runner.run_postfix_tool, its failures as OpsError (the same operator message)."""
    try:
        return run_postfix_tool(cmd, input=stdin, timeout=timeout, what=what, done=done)
    except PostfixToolError as exc:
        raise OpsError(str(exc)) from None


def apply_postsuper(
    config_directory: Path | str,
    action: str,
    queue_ids: Sequence[str],
    progress: Callable[[int], None] | None = None,
    queues: Sequence[str] = (),
    chunk: int = CHUNK,
) -> QueueChange:
    """``postsuper -c DIR -r|-h|-H - [queue...]`` with the ids on standard input, chunk by chunk.

    ``queues`` restricts postsuper to those queues, so a message that moved on since it
    was selected (e.g. was delivered, or an operator held it meanwhile) is left alone.
    ``progress(n)`` is called after each chunk with the number of ids it handled.
    Raises OpsError when postsuper itself fails; what was done before that stays done.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    option, label = ACTIONS[action]
    result = QueueChange(action)
    cmd = ["postsuper", "-c", str(config_directory), option, "-", *queues]
    for part in _chunks(list(queue_ids), chunk):
        r = run_tool(cmd, f"postsuper -c {config_directory} {option}", "\n".join(part) + "\n", _TIMEOUT, f"{result.changed} message(s) were changed")
        result.requested += len(part)
        result.changed += changed_count(r.stderr, label)
        result.warnings += [ln.split("warning: ", 1)[1] for ln in r.stderr.splitlines() if "warning: " in ln]
        if progress:
            progress(len(part))
    return result


def schedule_retry(
    config_directory: Path | str,
    queue_ids: Sequence[str],
    progress: Callable[[int], None] | None = None,
    every: int = 100,
) -> QueueChange:
    """Retry deferred messages now: ``postqueue -c DIR -i QID``, one id per run.

    postqueue takes a single -i per invocation (several are a usage error), so this runs
    it once per id, about 5 ms each; ``progress`` is called every ``every`` ids. The flush
    daemon moves the queue file to the incoming queue unchanged, so the message keeps its
    queue id and tenant route. Ids no longer deferred are ignored by Postfix, and postqueue
    does not say which those were: ``changed`` counts ids it accepted.
    """
    result = QueueChange("requeue")
    done = 0
    for qid in queue_ids:
        cmd = ["postqueue", "-c", str(config_directory), "-i", qid]
        run_tool(cmd, f"postqueue -c {config_directory} -i {qid}", None, 60, f"{result.changed} message(s) were scheduled")
        result.requested += 1
        result.changed += 1
        done += 1
        if progress and done == every:
            progress(done)
            done = 0
    if progress and done:
        progress(done)
    return result
