"""Transport classes: tenants share master.cf transports, never a connection or a login.

One master.cf entry per tenant made Postfix's own tools slow down with the square of the
tenant count and the master hold three descriptors per tenant (docs/scale.md). Tenants
whose transport settings are the same now share one entry, a *transport class*; what
differs per tenant lives in lookup tables keyed by the tenant's next hop:

- the route table gives each tenant's mail its class and next hop
  (``FILTER rc_3f2a9c01d4:[smtp.acme.example]:587``);
- the class's ``smtp_tls_policy_maps`` (``relay/tls/<class>.policy``) gives the next hop
  its TLS policy, and with ``smarthost.auth`` the class's ``smtp_sasl_password_maps``
  (``relay/smtp_auth/<class>``, root-only) gives it the tenant's login.

Isolation rule: **a next hop appears at most once per class.** Postfix keys its
connection cache by transport and next hop, its TLS policy and SASL lookups by next hop,
and its destination concurrency by transport and next hop. Two tenants on the same
smarthost host and port therefore never share a class: the second goes to the class's
sibling ``<class>_1`` (the third to ``_2``...), its own master.cf service with its own
tables, so it can never use the first one's cached connection, TLS policy or password.
Classes with SASL also keep connection caching off (``smtp_connection_cache_on_demand=no``).

A class is named after a hash of its settings, so it keeps its name when tenants are
added or removed; adding a tenant whose settings match an existing class changes tables
only (no master.cf change, no ``postfix reload``: Postfix picks ``hash:`` tables up by
itself). Pure code: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from relay_milter.config import Tenant

PREFIX = "rc_"
# maxproc of a class (Postfix's default_process_limit), or its concurrency if that is higher.
# Each tenant's own limit is the class's destination concurrency limit (its next hop is its
# own in the class). The entry does not depend on the members, so adding or removing one
# never changes master.cf.
PROCESS_CAP = 100


@dataclass(frozen=True)
class Source:
    """The outbound address and HELO name a class binds to (sender reputation, issue 14)."""

    address: str
    helo: str
    version: int


@dataclass(frozen=True)
class Settings:
    """What a transport class fixes in master.cf and main.cf: tenants differing in any of
    these never share a class."""

    tls: str
    ca_file: Path | None
    auth: bool
    concurrency: int
    rate_delay: str | None
    source: Source | None  # the address the class sends from now (after a failover: the standby)
    # The address the configuration gives its tenants: it names the class, so a failover
    # (sender reputation) changes the class's bind address, never the class, and mail
    # queued before the failover keeps a transport that exists.
    home: Source | None = None

    def digest(self) -> str:
        home = self.home if self.home is not None else self.source
        text = repr((self.tls, str(self.ca_file) if self.ca_file else None, self.auth, self.concurrency, self.rate_delay, home))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def describe(self) -> str:
        parts = [f"tls={self.tls}", f"concurrency={self.concurrency}"]
        if self.ca_file:
            parts.append(f"ca_file={self.ca_file}")
        if self.auth:
            parts.append("sasl")
        if self.rate_delay:
            parts.append(f"rate_delay={self.rate_delay}")
        if self.source:
            parts.append(f"source={self.source.address}")
        return " ".join(parts)


@dataclass(frozen=True)
class TransportClass:
    name: str
    settings: Settings
    members: tuple[Tenant, ...]  # sorted by tenant id; every next hop once

    @property
    def maxproc(self) -> int:
        return max(self.settings.concurrency, PROCESS_CAP)


@dataclass(frozen=True)
class Assignment:
    classes: tuple[TransportClass, ...]  # sorted by name
    of: Mapping[str, str]  # tenant id -> class name

    def route(self, tenant: Tenant) -> str:
        """The tenant's Postfix route: ``<class>:<next hop>``."""
        return f"{self.of[tenant.id]}:{tenant.smarthost.nexthop}"


def _source(entry) -> Source | None:
    return Source(str(entry.address), entry.helo, entry.version) if entry is not None else None


def settings_of(tenant: Tenant, source, home=None) -> Settings:
    sh = tenant.smarthost
    return Settings(
        tls=sh.tls,
        ca_file=sh.ca_file,
        auth=sh.auth is not None,
        concurrency=sh.concurrency,
        rate_delay=sh.rate.delay if sh.rate else None,
        source=_source(source),
        home=_source(home) if home is not None else None,
    )


def assign(
    tenants: Iterable[Tenant], sources: Mapping[str, object | None], homes: Mapping[str, object | None] | None = None
) -> Assignment:
    """Group tenants into transport classes. ``sources``: tenant id -> the pool address it
    sends from now (``render.source_addresses``, failovers applied) or None; ``homes``: the
    address its configuration gives it (``reputation.configured_address``), which names the
    class (default: ``sources``). The k-th tenant (by id) with given settings and next hop
    goes to class ``rc_<digest>`` (k = 0) or ``rc_<digest>_<k>``."""
    rank: dict[tuple[str, str], int] = {}
    groups: dict[str, tuple[Settings, list[Tenant]]] = {}
    of: dict[str, str] = {}
    for t in sorted(tenants, key=lambda t: t.id):
        s = settings_of(t, sources.get(t.id), (homes or {}).get(t.id))
        digest = s.digest()
        k = rank.get((digest, t.smarthost.nexthop), 0)
        rank[(digest, t.smarthost.nexthop)] = k + 1
        name = f"{PREFIX}{digest}" + (f"_{k}" if k else "")
        groups.setdefault(name, (s, []))[1].append(t)
        of[t.id] = name
    classes = tuple(TransportClass(name, s, tuple(members)) for name, (s, members) in sorted(groups.items()))
    return Assignment(classes, of)


def is_tenant_transport(transport: str) -> bool:
    """A transport that carries tenant mail: a class (``rc_...``) or, in queue files from
    before transport classes, a tenant's own ``relay_<id>``."""
    return transport.startswith((PREFIX, "relay_"))
