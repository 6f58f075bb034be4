"""Queued mail that still carries an old next hop, and re-routing it.

Cleanup stores the route of a message in its queue file when it is accepted
(``postcat -q ID`` shows ``content_filter: rc_3f2a9c01d4:[host]:port``, the tenant's transport
class and next hop). ``postqueue -f`` and
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
from relay_milter.postfix import classes
from relay_milter.postfix.queue import OpsError, QueueChange, QueuedMessage, changed_count, run_tool

CHUNK = 500  # queue ids per postcat run
_FILTER = re.compile(r"^content_filter: (\S+)$", re.M)
# The route marker the milter added (it deletes every copy a client sent); "X-Relay-Route: acme"
# in mail accepted before the exact-match tables.
_MARKER = re.compile(rf"^{re.escape(defaults.ROUTE_HEADER)}: ?(\S+)$", re.M | re.I)
_ID_HEADER = re.compile(r"^\*\*\* ENVELOPE RECORDS (?:\S+/)?(\S+) \*\*\*$", re.M)


@dataclass(frozen=True)
class StaleRoute:
    queue_id: str
    queue: str
    tenant: str  # the message's tenant (queue.attribute), or of a pre-class relay_<tenant> route
    stored: str  # content_filter as stored: rc_3f2a9c01d4:[127.0.0.1]:39852
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


def stored_routes(config_directory: Path | str, queue_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """queue id -> (the content_filter stored in its queue file, the tenant of the route
    marker the milter added to its header, or None): ``postcat -e -h -q``."""
    routes: dict[str, tuple[str, str | None]] = {}
    for i in range(0, len(queue_ids), CHUNK):
        part = list(queue_ids[i : i + CHUNK])
        cmd = ["postcat", "-c", str(config_directory), "-e", "-h", "-q", *part]
        try:
            r = run_tool(cmd, f"postcat -c {config_directory} -e -h -q", None, 120, f"{len(routes)} queue file(s) read")
        except OpsError:
            # postcat exits non-zero if any one file vanished (delivered meanwhile): read one by one.
            r = None
        texts: list[str] = []
        if r is not None:
            texts = [r.stdout]
        else:
            for qid in part:
                try:
                    texts.append(run_tool(["postcat", "-c", str(config_directory), "-e", "-h", "-q", qid], "postcat", None, 60, "").stdout)
                except OpsError:
                    continue
        for text in texts:
            starts = list(_ID_HEADER.finditer(text))
            for n, m in enumerate(starts):
                block = text[m.end() : starts[n + 1].start() if n + 1 < len(starts) else len(text)]
                f = _FILTER.search(block)
                if f:
                    marker = _MARKER.search(block)
                    routes[m.group(1)] = (f.group(1), marker.group(1).lower() if marker else None)
    return routes


def current_routes(config_directory: Path | str) -> dict[str, str]:
    """tenant id -> its route now (``<class>:<next hop>``), from the live route table."""
    prefix = defaults.ROUTE_HEADER.lower() + ":"
    routes: dict[str, str] = {}
    try:
        text = (Path(config_directory) / "relay" / "route").read_text(encoding="utf-8")
    except OSError as exc:
        raise OpsError(f"cannot read the route table: {exc}") from None
    for line in text.splitlines():
        key, _, value = line.partition("\t")
        if key.lower().startswith(prefix) and value.startswith("FILTER "):
            routes[key[len(prefix):]] = value.removeprefix("FILTER ").strip()
    return routes


def scan(config_directory: Path | str, messages: Iterable[QueuedMessage], tenants: TenantSet) -> RouteScan:
    """Messages whose stored tenant route differs from their tenant's route now (the live
    route table). A message's tenant is the one of the route marker in its header, else the
    one ``queue.attribute`` gave it; a route from before transport classes
    (``relay_<tenant>:...``) names its tenant itself."""
    messages = [m for m in messages if m.queue in ("deferred", "active", "hold", "incoming")]
    result = RouteScan(scanned=len(messages))
    by_id = {m.queue_id: m for m in messages}
    known = {t.id for t in tenants}
    current = {tid: r for tid, r in current_routes(config_directory).items() if tid in known}
    for qid, (stored, marker) in stored_routes(config_directory, [m.queue_id for m in messages]).items():
        transport = stored.partition(":")[0]
        if not classes.is_tenant_transport(transport):
            continue  # not a tenant route (e.g. no filter): nothing to compare
        m = by_id.get(qid)
        tenant = marker if marker in known else None
        if tenant is None and m is not None and m.tenant in known:
            tenant = m.tenant
        if tenant is None and transport.startswith("relay_"):
            tenant = transport.removeprefix("relay_")
        if tenant is None:
            continue  # whose it is is unknown: nothing to compare it with
        now = current.get(tenant)
        if now != stored:
            result.stale.append(StaleRoute(qid, m.queue if m else "?", tenant, stored, now))
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
