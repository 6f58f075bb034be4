"""Queued mail that still carries an old next hop, and re-routing it.

Cleanup stores the route of a message in its queue file when it is accepted
(``postcat -q ID`` shows ``content_filter: relay_acme:[host]:port``). ``postqueue -f`` and
``postqueue -i`` retry with that stored next hop, so after a smarthost change queued mail
keeps going to the old one. ``postsuper -r`` is the only way back through cleanup: pickup
hands the message to the ``cleanup_requeue`` service, whose route table (the same
``relay/requeue/route``, just reloaded) routes it again from the ``X-Relay-Route-Seal`` the
milter added. The message gets a new queue id; it is moved, never copied, so it is
delivered once. ``postkick`` wakes pickup so that happens now, not at its next wakeup.

Only deferred messages are re-routed: a message in the active queue is being delivered
(to the old hop) and comes back to the deferred queue if that fails; a held message stays
held until an operator releases it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay_milter import defaults
from relay_milter.config import TenantSet
from relay_milter.postfix.queue import OpsError, QueueChange, QueuedMessage, changed_count, run_tool

CHUNK = 500  # queue ids per postcat run
_FILTER = re.compile(r"^content_filter: (\S+)$", re.M)
_ID_HEADER = re.compile(r"^\*\*\* ENVELOPE RECORDS (?:\S+/)?(\S+) \*\*\*$", re.M)


@dataclass(frozen=True)
class StaleRoute:
    queue_id: str
    queue: str
    tenant: str  # from the stored transport (relay_<tenant>)
    stored: str  # content_filter as stored: relay_acme:[127.0.0.1]:39852
    current: str | None  # the tenant's route now; None if the tenant no longer exists


@dataclass
class RouteScan:
    stale: list[StaleRoute] = field(default_factory=list)
    scanned: int = 0

    def by_tenant(self) -> dict[str, list[StaleRoute]]:
        out: dict[str, list[StaleRoute]] = {}
        for s in self.stale:
            out.setdefault(s.tenant, []).append(s)
        return out

    def reroutable(self, tenant: str | None = None) -> list[str]:
        """Deferred messages of existing tenants (optionally one tenant): safe for postsuper -r."""
        return [s.queue_id for s in self.stale if s.queue == "deferred" and s.current and (tenant is None or s.tenant == tenant)]


def stored_routes(config_directory: Path | str, queue_ids: Sequence[str]) -> dict[str, str]:
    """queue id -> the content_filter stored in its queue file (``postcat -e -q``)."""
    routes: dict[str, str] = {}
    for i in range(0, len(queue_ids), CHUNK):
        part = list(queue_ids[i : i + CHUNK])
        cmd = ["postcat", "-c", str(config_directory), "-e", "-q", *part]
        try:
            r = run_tool(cmd, f"postcat -c {config_directory} -e -q", None, 120, f"{len(routes)} queue file(s) read")
        except OpsError:
            # postcat exits non-zero if any one file vanished (delivered meanwhile): read one by one.
            r = None
        texts: list[str] = []
        if r is not None:
            texts = [r.stdout]
        else:
            for qid in part:
                try:
                    texts.append(run_tool(["postcat", "-c", str(config_directory), "-e", "-q", qid], "postcat", None, 60, "").stdout)
                except OpsError:
                    continue
        for text in texts:
            starts = list(_ID_HEADER.finditer(text))
            for n, m in enumerate(starts):
                block = text[m.end() : starts[n + 1].start() if n + 1 < len(starts) else len(text)]
                f = _FILTER.search(block)
                if f:
                    routes[m.group(1)] = f.group(1)
    return routes


def scan(config_directory: Path | str, messages: Iterable[QueuedMessage], tenants: TenantSet) -> RouteScan:
    """Messages whose stored tenant route differs from the tenant's route now."""
    messages = [m for m in messages if m.queue in ("deferred", "active", "hold", "incoming")]
    result = RouteScan(scanned=len(messages))
    where = {m.queue_id: m.queue for m in messages}
    current = {t.transport: f"{t.transport}:{t.smarthost.nexthop}" for t in tenants}
    for qid, stored in stored_routes(config_directory, [m.queue_id for m in messages]).items():
        transport = stored.partition(":")[0]
        if not transport.startswith("relay_"):
            continue  # not a tenant route (e.g. no filter): nothing to compare
        now = current.get(transport)
        if now != stored:
            result.stale.append(StaleRoute(qid, where.get(qid, "?"), transport.removeprefix("relay_"), stored, now))
    return result


def reroute(config_directory: Path | str, queue_ids: Sequence[str]) -> QueueChange:
    """``postsuper -r`` the deferred messages among ``queue_ids``, then wake pickup."""
    result = QueueChange("reroute")
    cmd = ["postsuper", "-c", str(config_directory), "-r", "-", "deferred"]
    for i in range(0, len(queue_ids), 2000):
        part = queue_ids[i : i + 2000]
        r = run_tool(cmd, f"postsuper -c {config_directory} -r", "\n".join(part) + "\n", 600, f"{result.changed} message(s) were requeued")
        result.requested += len(part)
        result.changed += changed_count(r.stderr, "Requeued")
        result.warnings += [ln.split("warning: ", 1)[1] for ln in r.stderr.splitlines() if "warning: " in ln]
    if result.changed:
        # pickup runs every 60 s; wake it so re-routed mail moves now. Not fatal if it fails.
        try:
            run_tool(["postkick", "-c", str(config_directory), "public", "pickup", "W"], "postkick", None, 30, "")
        except OpsError as exc:
            result.warnings.append(f"{exc} (pickup will find the messages within 60 s)")
    return result


# The text relay/smarthost_status.regexp puts in the delay reason of a message whose
# smarthost name does not resolve (see postfix-templates/smarthost_status.regexp.j2).
UNRESOLVED_MARK = "smarthost name does not resolve"


def unresolved_by_tenant(messages: Iterable[QueuedMessage]) -> dict[str, int]:
    """Deferred messages per tenant that wait on a smarthost name that does not resolve."""
    out: dict[str, int] = {}
    for m in messages:
        if m.queue == "deferred" and any(UNRESOLVED_MARK in r for r in m.delay_reasons):
            out[m.tenant] = out.get(m.tenant, 0) + 1
    return out


def unresolved_metric(messages: Iterable[QueuedMessage] | None, tenants: Iterable[str]) -> str:
    """Prometheus text for relay_smarthost_unresolved_messages{tenant} (every tenant, 0 too,
    up to defaults.METRICS_ZERO_FILL_TENANTS tenants; beyond, the tenants with such mail)."""
    if messages is None:
        return ""
    counts = unresolved_by_tenant(messages)
    tenants = tuple(tenants)
    if len(tenants) > defaults.METRICS_ZERO_FILL_TENANTS:
        tenants = ()
    lines = [
        "# HELP relay_smarthost_unresolved_messages Deferred messages waiting on a smarthost name that does not resolve.",
        "# TYPE relay_smarthost_unresolved_messages gauge",
    ]
    for t in sorted(set(tenants) | set(counts)):
        label = t.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'relay_smarthost_unresolved_messages{{tenant="{label}"}} {counts.get(t, 0)}')
    return "\n".join(lines) + "\n"
