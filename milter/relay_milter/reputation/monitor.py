"""One blocklist check: every pool address in every DNSBL and every monitored domain in
every domain list, with FCrDNS of each address. The answers are classified and recorded
in the state by ``core/reputation.py``; nothing here decides anything."""

from __future__ import annotations

from relay_milter.config import Settings, TenantSet
from relay_milter.core import reputation as rep
from relay_milter.reputation.dns import fcrdns, lookup, resolver


def monitored_domains(ts: TenantSet, settings: Settings) -> list[str]:
    """Relay and signing domains of every tenant, and the pool's HELO names."""
    domains = [d for t in ts for d in (t.relay_domain, t.signing_domain)]
    domains += [a.helo for a in settings.reputation.pool]
    return list(dict.fromkeys(domains))


def check_once(ts: TenantSet, settings: Settings, state: dict, now: float) -> tuple[list[rep.Change], list[str]]:
    """Look every pool address and domain up and record the results in ``state``.
    Returns the listing changes and the lookups that failed (errors)."""
    r = resolver(settings.dns)
    cfg = settings.reputation
    changes: list[rep.Change] = []
    errors: list[str] = []
    for a in cfg.pool:
        results = [rep.classify(lookup(r, rep.ip_query(a.address, z), z.zone), z) for z in cfg.dnsbls]
        status, lists, detail = rep.combine(results)
        if status == "error":
            errors.append(f"{a.address}: {detail}")
        if (c := rep.record(state, "addresses", a.address, status, lists, detail, now)) is not None:
            c.fields["tenants"] = ",".join(rep.users_of(a.address, ts, cfg, state)) or "-"
            changes.append(c)
        f_status, f_detail = fcrdns(r, a.address, a.helo)
        state["addresses"][a.address]["fcrdns"] = f_status
        state["addresses"][a.address]["fcrdns_detail"] = f_detail
    if cfg.domain_lists:
        for d in monitored_domains(ts, settings):
            results = [rep.classify(lookup(r, rep.domain_query(d, z), z.zone), z) for z in cfg.domain_lists]
            status, lists, detail = rep.combine(results)
            if status == "error":
                errors.append(f"{d}: {detail}")
            if (c := rep.record(state, "domains", d, status, lists, detail, now)) is not None:
                changes.append(c)
    return changes, errors


def fcrdns_warnings(settings: Settings) -> list[str]:
    """Pool addresses whose PTR and HELO name do not confirm each other (a warning of
    `relayctl check`: receivers score it, Postfix does not care)."""
    if not settings.reputation.pool:
        return []
    res = resolver(settings.dns)
    out = []
    for a in settings.reputation.pool:
        status, detail = fcrdns(res, a.address, a.helo)
        if status != "ok":
            out.append(f"source address {a.address}: FCrDNS {status}: {detail}")
    return out
