"""Sender reputation decisions: which source address each tenant leaves from, what a
blocklist answer means, which state changes are events, and where a listed address fails
over to. Pure: the DNS lookups, the state file and the alerts are in the ``reputation``
sub-package (``reputation/dns.py``, ``reputation/state.py``, ``reputation/alerts.py``), the
orchestration (lookups, re-render, reload, the event store) in ``cli/reputation.py``.

The state (``reputation.state_file``, JSON) is the only thing remembered between runs::

    {"addresses": {"127.0.0.2": {"state": "listed", "lists": ["bl.test"], "since": ..., "checked": ...,
                                 "fcrdns": "ok", "detail": "..."}},
     "domains":   {"acme.relay.test": {"state": "clean", ...}},
     "failovers": {"127.0.0.2": {"to": "127.0.0.4", "at": ..., "tenants": ["acme"]}},
     "events":    [{"at": ..., "event": "IP_LISTED", ...}, ...],   # the last MAX_EVENTS
     "counts":    {"IP_LISTED": 3, ...}}   # every event ever recorded, by kind (a counter)
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from relay_milter.config import BlocklistZone, ConfigError, ReputationSettings, SourceAddress, Tenant

MAX_EVENTS = 200

Status = Literal["listed", "clean", "error"]


# -- which address a tenant leaves from -------------------------------------------------


def pool_problems(tenants: Iterable[Tenant], rep: ReputationSettings) -> list[str]:
    """Cross-checks between the tenant files and the pool (each names the tenant and field)."""
    problems = []
    ids = {t.id for t in tenants}
    for entry in rep.pool:
        for tid in entry.tenants:
            if tid not in ids:
                problems.append(f"settings: field reputation.pool: {entry.address} is dedicated to tenant {tid}, which does not exist")
    for t in tenants:
        if t.source_address is None:
            continue
        entry = rep.entry(t.source_address)
        if entry is None:
            problems.append(f"tenant {t.id}: field source_address: {t.source_address} is not in the settings' reputation.pool")
            continue
        other = next((a for a in rep.pool if t.id in a.tenants and a.address != entry.address), None)
        if other is not None:
            problems.append(f"tenant {t.id}: field source_address: {entry.address}, but reputation.pool dedicates {other.address} to it")
    return problems


def configured_address(tenant: Tenant, rep: ReputationSettings) -> SourceAddress | None:
    """The address the configuration gives the tenant (its own source_address, or the pool
    entry dedicated to it); None: the host's default source address."""
    if tenant.source_address is not None:
        return rep.entry(tenant.source_address)
    return next((a for a in rep.pool if tenant.id in a.tenants), None)


def effective_address(tenant: Tenant, rep: ReputationSettings, state: dict) -> SourceAddress | None:
    """The configured address, or what it failed over to (following a chain of failovers)."""
    entry = configured_address(tenant, rep)
    seen: set[str] = set()
    failovers = state.get("failovers", {})
    while entry is not None and entry.address in failovers and entry.address not in seen:
        seen.add(entry.address)
        target = rep.entry(failovers[entry.address]["to"])
        if target is None:  # the standby was removed from the pool: stay where configured
            break
        entry = target
    return entry


def assignments(tenants: Iterable[Tenant], rep: ReputationSettings, state: dict) -> dict[str, SourceAddress | None]:
    """tenant id -> the address its transport binds to. Raises ConfigError on a pool mismatch."""
    tenants = list(tenants)
    problems = pool_problems(tenants, rep)
    if problems:
        raise ConfigError("\n".join(problems))
    return {t.id: effective_address(t, rep, state) for t in tenants}


def users_of(address: str, tenants: Iterable[Tenant], rep: ReputationSettings, state: dict) -> list[str]:
    return sorted(t.id for t in tenants if (a := effective_address(t, rep, state)) is not None and a.address == address)


# -- blocklist queries and answers --------------------------------------------------------


def reversed_name(address: str) -> str:
    """127.0.0.2 -> 2.0.0.127; IPv6 -> its 32 nibbles, least significant first."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def ip_query(address: str, zone: BlocklistZone) -> str:
    return f"{reversed_name(address)}.{zone.zone}."


def domain_query(domain: str, zone: BlocklistZone) -> str:
    return f"{domain}.{zone.zone}."


@dataclass(frozen=True)
class Answer:
    """One blocklist lookup: the A records returned (empty: not listed), or a lookup error."""

    zone: str
    answers: tuple[str, ...] = ()
    error: str | None = None


def classify(answer: Answer, zone: BlocklistZone) -> tuple[Status, str]:
    """What one lookup means. Refusal codes (open resolver, quota) are errors, not listings;
    with ``listed`` set, other answers are errors too (an unknown code is not a verdict)."""
    if answer.error is not None:
        return "error", f"{zone.zone}: {answer.error}"
    if not answer.answers:
        return "clean", f"{zone.zone}: not listed"
    refused = [a for a in answer.answers if a in zone.errors]
    if refused:
        return "error", f"{zone.zone}: query refused by the list (answer {','.join(refused)}: open or public resolver, or over quota)"
    outside = [a for a in answer.answers if not a.startswith("127.")]
    if outside:
        return "error", f"{zone.zone}: answer {','.join(outside)} is not a blocklist code (wildcard or hijacked DNS?)"
    hits = [a for a in answer.answers if not zone.listed or a in zone.listed]
    if hits:
        return "listed", f"{zone.zone}: listed ({','.join(hits)})"
    return "error", f"{zone.zone}: unknown return code {','.join(answer.answers)}"


def combine(results: list[tuple[Status, str]]) -> tuple[Status, list[str], str]:
    """Per subject: listed on any list wins; else an error anywhere is an error; else clean."""
    listed = [d.split(":", 1)[0] for s, d in results if s == "listed"]
    if listed:
        return "listed", listed, "; ".join(d for s, d in results if s == "listed")
    errors = [d for s, d in results if s == "error"]
    if errors:
        return "error", [], "; ".join(errors)
    return "clean", [], "not listed" if results else "no lists configured"


# -- state and its events -------------------------------------------------------------------


def empty_state() -> dict:
    return {"addresses": {}, "domains": {}, "failovers": {}, "events": [], "counts": {}}


def normalise_state(data: Any) -> dict:
    """A state as read from its file (any JSON value) with every part present; unknown
    keys are dropped. Raises ValueError if it is not a JSON object."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    state = empty_state()
    state.update({k: v for k, v in data.items() if k in state and isinstance(v, type(state[k]))})
    if not state["counts"] and state["events"]:  # a state written before the counters existed
        for e in state["events"]:
            state["counts"][e["event"]] = state["counts"].get(e["event"], 0) + 1
    return state


@dataclass
class Change:
    """One operator event: IP_LISTED, IP_DELISTED, DOMAIN_LISTED, DOMAIN_DELISTED, IP_FAILOVER, IP_RESTORED."""

    event: str
    subject: str
    detail: str
    fields: dict[str, Any] = field(default_factory=dict)

    def record(self, now: float) -> dict[str, Any]:
        return {"at": now, "event": self.event, "subject": self.subject, "detail": self.detail, **self.fields}


def record(state: dict, kind: Literal["addresses", "domains"], subject: str, status: Status, lists: list[str], detail: str, now: float) -> Change | None:
    """Store one check result; return the event if the listing state changed.

    An error keeps the last known listing state (a list that cannot be asked says nothing)."""
    entry = state[kind].setdefault(subject, {"state": "unknown", "lists": [], "since": now})
    entry["checked"] = now
    entry["detail"] = detail
    if status == "error":
        entry["error"] = detail
        return None
    entry.pop("error", None)
    was = entry["state"]
    entry["lists"] = lists
    if status == was:
        return None
    entry["state"] = status
    entry["since"] = now
    prefix = "IP" if kind == "addresses" else "DOMAIN"
    if status == "listed":
        return Change(f"{prefix}_LISTED", subject, detail, {"lists": ",".join(lists)})
    if was == "listed":
        return Change(f"{prefix}_DELISTED", subject, detail)
    return None  # unknown -> clean: the first check, nothing changed


def is_listed(state: dict, address: str) -> bool:
    return state.get("addresses", {}).get(address, {}).get("state") == "listed"


def choose_standby(rep: ReputationSettings, state: dict, listed: SourceAddress) -> SourceAddress | None:
    """A healthy standby of the same IP version: not listed, not already standing in for
    another address (else the first healthy one that is), checked clean before unknown."""
    taken = {f["to"] for f in state.get("failovers", {}).values()}
    candidates = [
        a for a in rep.pool
        if a.role == "standby" and a.version == listed.version and a.address != listed.address
        and not is_listed(state, a.address) and a.address not in state.get("failovers", {})
    ]
    rank = lambda a: (a.address in taken, state.get("addresses", {}).get(a.address, {}).get("state") != "clean")  # noqa: E731
    return min(candidates, key=rank) if candidates else None


def fail_over(state: dict, rep: ReputationSettings, tenants: Iterable[Tenant], address: str, now: float) -> Change:
    """Move the tenants leaving from ``address`` to a standby. Raises ValueError when that cannot be done."""
    entry = rep.entry(address)
    if entry is None:
        raise ValueError(f"{address} is not in reputation.pool")
    if address in state.get("failovers", {}):
        raise ValueError(f"{address} already failed over to {state['failovers'][address]['to']}")
    tenants = list(tenants)
    moved = users_of(address, tenants, rep, state)
    standby = choose_standby(rep, state, entry)
    if standby is None:
        raise ValueError(f"no healthy standby IPv{entry.version} address in reputation.pool for {address}")
    state.setdefault("failovers", {})[address] = {"to": standby.address, "at": now, "tenants": moved}
    return Change("IP_FAILOVER", address, f"{address} -> {standby.address}", {"to": standby.address, "helo": standby.helo, "tenants": ",".join(moved) or "-"})


def restore(state: dict, address: str, now: float) -> Change:
    """Undo a failover: the tenants go back to ``address``."""
    f = state.get("failovers", {}).pop(address, None)
    if f is None:
        raise ValueError(f"{address} has no failover in force")
    return Change("IP_RESTORED", address, f"{f['to']} -> {address}", {"from": f["to"], "tenants": ",".join(f.get("tenants", [])) or "-"})


def auto_failovers(state: dict, rep: ReputationSettings, tenants: Iterable[Tenant], now: float) -> tuple[list[Change], list[str]]:
    """With failover: auto, fail over every listed active address that tenants leave from.
    Returns the changes and the addresses that could not fail over (no standby)."""
    changes, stuck = [], []
    tenants = list(tenants)
    for entry in rep.pool:
        if entry.role != "active" or not is_listed(state, entry.address) or entry.address in state.get("failovers", {}):
            continue
        if not users_of(entry.address, tenants, rep, state):
            continue
        try:
            changes.append(fail_over(state, rep, tenants, entry.address, now))
        except ValueError as exc:
            stuck.append(str(exc))
    return changes, stuck


def log_events(state: dict, changes: Iterable[Change], now: float | None = None) -> None:
    now = time.time() if now is None else now
    changes = list(changes)
    state.setdefault("events", []).extend(c.record(now) for c in changes)
    del state["events"][:-MAX_EVENTS]
    counts = state.setdefault("counts", {})
    for c in changes:
        counts[c.event] = counts.get(c.event, 0) + 1
