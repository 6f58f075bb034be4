"""DNS lookups for sender reputation (dnspython): blocklist queries and forward-confirmed
reverse DNS. What the answers mean is decided in ``core/reputation.py`` (pure)."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.resolver
import dns.reversename

from relay_milter.config import DnsSettings
from relay_milter.core.reputation import Answer


def resolver(settings: DnsSettings) -> dns.resolver.Resolver:
    if settings.nameservers:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = list(settings.nameservers)
        r.port = settings.port
    else:
        r = dns.resolver.Resolver()
    r.lifetime = settings.timeout
    r.timeout = settings.timeout
    return r


def lookup(res: dns.resolver.Resolver, name: str, zone: str) -> Answer:
    """The A records at ``name`` (a blocklist query); NXDOMAIN/no answer: not listed."""
    try:
        answer = res.resolve(name, "A")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Answer(zone)
    except dns.exception.DNSException as exc:
        return Answer(zone, error=f"lookup of {name} failed: {exc.__class__.__name__}")
    return Answer(zone, tuple(sorted(r.address for r in answer)))


def fcrdns(res: dns.resolver.Resolver, address: str, helo: str) -> tuple[str, str]:
    """Forward-confirmed reverse DNS of a source address against its HELO name.

    Returns (status, detail); status is ``ok``, ``mismatch`` or ``error``."""
    rev = dns.reversename.from_address(address)
    try:
        names = sorted(str(r.target).rstrip(".").lower() for r in res.resolve(rev, "PTR"))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return "mismatch", f"no PTR record for {address} (HELO {helo})"
    except dns.exception.DNSException as exc:
        return "error", f"PTR lookup of {address} failed: {exc.__class__.__name__}"
    if helo not in names:
        return "mismatch", f"PTR of {address} is {','.join(names)}, HELO name is {helo}"
    rdtype = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
    try:
        forward = {str(ipaddress.ip_address(r.address)) for r in res.resolve(helo, rdtype)}
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return "mismatch", f"HELO name {helo} has no {rdtype} record"
    except dns.exception.DNSException as exc:
        return "error", f"{rdtype} lookup of {helo} failed: {exc.__class__.__name__}"
    if address not in forward:
        return "mismatch", f"{helo} resolves to {','.join(sorted(forward))}, not {address}"
    return "ok", f"{address} <-> {helo}"
