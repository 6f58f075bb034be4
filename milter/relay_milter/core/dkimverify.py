"""Hop-signature verification: the tenant's own d=/s=, its pinned (or DNS) key, strict tags.

dkimpy does the cryptography. This module decides which signature counts and
what a failure means for the SMTP client (permanent vs temporary).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import dkim
import dkim.util
import dns.exception
import dns.resolver

from relay_milter.core import fastcanon
from relay_milter.config import DnsSettings, HopKey, Tenant

fastcanon.install()  # output-identical, faster dkimpy canonicalization helpers

log = logging.getLogger("relay.dkim")

ACCEPTED_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
# Clock slack for x= (expiry) and t= (age) checks. dkimpy allows 10 h; we allow 5 min.
CLOCK_SLACK = 300
MIN_RSA_BITS = 1024
DNS_CACHE_SECONDS = 300


class KeyUnavailable(Exception):
    """The key could not be fetched. ``temporary`` tells tempfail from reject."""

    def __init__(self, message: str, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


class KeyResolver:
    """Returns the DKIM TXT record for a tenant: pinned if set, else DNS (cached)."""

    def __init__(self, dns_settings: DnsSettings | None = None):
        dns_settings = dns_settings or DnsSettings()
        if dns_settings.nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = list(dns_settings.nameservers)
            self._resolver.port = dns_settings.port
        else:
            self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = dns_settings.timeout
        self._resolver.timeout = dns_settings.timeout
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def record(self, tenant: Tenant, key: HopKey | None = None) -> bytes:
        """The record of ``key`` (default: the tenant's current key)."""
        key = key or tenant.hop_keys[0]
        if key.public_key:
            return key.public_key.encode("ascii")
        name = f"{key.selector}._domainkey.{tenant.signing_domain}."
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
        if hit and hit[0] > now:
            return hit[1]
        try:
            answer = self._resolver.resolve(name, "TXT")
        except dns.resolver.NXDOMAIN:
            raise KeyUnavailable(f"no DKIM key in DNS at {name}", temporary=False) from None
        except dns.resolver.NoAnswer:
            raise KeyUnavailable(f"no TXT record at {name}", temporary=False) from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise KeyUnavailable(f"DNS lookup of {name} failed: {exc.__class__.__name__}", temporary=True) from None
        except dns.exception.DNSException as exc:
            raise KeyUnavailable(f"DNS lookup of {name} failed: {exc}", temporary=True) from None
        records = [b"".join(r.strings) for r in answer]
        if len(records) != 1:
            raise KeyUnavailable(f"{len(records)} TXT records at {name}, expected exactly one", temporary=False)
        ttl = min(answer.rrset.ttl if answer.rrset is not None else 0, DNS_CACHE_SECONDS)
        with self._lock:
            self._cache[name] = (now + ttl, records[0])
        return records[0]


@dataclass(frozen=True)
class DkimResult:
    passed: bool
    temporary: bool = False
    reason: str = ""
    # RFC 7372 enhanced status: 5.7.20 no passing signature, 5.7.21 no acceptable signature.
    dsn: str = "5.7.20"
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    b_prefix: str = ""
    key_source: str = ""

    @classmethod
    def fail(cls, reason: str, dsn: str = "5.7.20", temporary: bool = False) -> "DkimResult":
        return cls(False, temporary, reason, "4.7.5" if temporary else dsn)


def _tag(sig: dict[bytes, bytes], name: bytes) -> str:
    return sig.get(name, b"").decode("ascii", "replace")


def check_tags(sig: dict[bytes, bytes], tenant: Tenant, now: float) -> str | None:
    """Policy on the signature's tags, before any cryptography. Returns a reason or None."""
    if b"l" in sig:
        return "signature has a body length limit (l=), which is not accepted"
    alg = sig.get(b"a", b"")
    if alg not in ACCEPTED_ALGORITHMS:
        return f"signature algorithm a={alg.decode('ascii', 'replace')} is not accepted (rsa-sha256 or ed25519-sha256)"
    signed = {h.strip().lower() for h in sig.get(b"h", b"").decode("ascii", "replace").split(":")}
    missing = [h for h in tenant.required_signed_headers if h not in signed]
    if missing:
        return f"signature does not cover required header(s): {', '.join(missing)}"
    try:
        if b"x" in sig and int(sig[b"x"]) + CLOCK_SLACK < now:
            return "signature has expired (x=)"
        if b"t" in sig and int(sig[b"t"]) > now + CLOCK_SLACK:
            return "signature timestamp (t=) is in the future"
        if tenant.max_signature_age and b"t" in sig and int(sig[b"t"]) + tenant.max_signature_age < now:
            return f"signature is older than {tenant.max_signature_age}s (t=)"
    except ValueError:
        return "signature has a non-numeric t= or x="
    if tenant.max_signature_age and b"t" not in sig:
        return "signature has no timestamp (t=) but the tenant limits signature age"
    return None


def accepted_key(tenant: Tenant, selector: str, now: float) -> tuple[HopKey | None, str | None]:
    """Key selection for rotation: the tenant's key for ``selector`` if it is valid at
    ``now``; else (None, why it is refused), or (None, None) if the tenant has no such key."""
    key = tenant.hop_key(selector)
    if key is None:
        return None, None
    refused = key.refused_at(now)
    return (None, refused) if refused else (key, None)


def _key_mismatch(sig: dict[bytes, bytes], record: bytes) -> str | None:
    """RFC 6376 3.5: a= must name the key's type (dkimpy checks the hash only)."""
    try:
        k = dkim.util.parse_tag_value(record).get(b"k", b"rsa").decode("ascii", "replace")
    except dkim.util.InvalidTagValueList:
        return None  # dkimpy reports the unusable key
    alg = _tag(sig, b"a")
    return None if alg.startswith(k + "-") else f"signature algorithm a={alg} does not match the key type k={k}"


def verify_hop_signature(
    message: bytes,
    signatures: list[str],
    tenant: Tenant,
    keys: KeyResolver,
    other_signing_domains: frozenset[str] = frozenset(),
    now: float | None = None,
) -> DkimResult:
    """Verify the tenant's hop signature.

    ``signatures`` are the DKIM-Signature header values in message order, so
    index i here is dkimpy's idx=i.
    """
    now = time.time() if now is None else now
    if not signatures:
        return DkimResult.fail("message has no DKIM signature")
    reasons: list[str] = []
    candidates: list[tuple[int, dict[bytes, bytes], HopKey]] = []
    selectors = "|".join(k.selector for k in tenant.hop_keys)
    for idx, value in enumerate(signatures):
        try:
            sig = dkim.util.parse_tag_value(value.encode("utf-8", "surrogateescape"))
        except dkim.util.InvalidTagValueList:
            reasons.append(f"signature {idx + 1} is malformed")
            continue
        d = _tag(sig, b"d").lower().rstrip(".")
        s = _tag(sig, b"s").lower()
        key, refused = accepted_key(tenant, s, now) if d == tenant.signing_domain else (None, None)
        if key is not None:
            candidates.append((idx, sig, key))
        elif refused:
            reasons.append(refused)
        elif d in other_signing_domains:
            reasons.append(f"signed by d={d}, which belongs to another tenant")
        elif d == tenant.signing_domain:
            reasons.append(f"signed with selector s={s}, expected s={selectors}")
    if not candidates:
        why = "; ".join(reasons) or "no signature"
        return DkimResult.fail(
            f"no signature by d={tenant.signing_domain} s={selectors} ({why})", dsn="5.7.21"
        )

    verifier = dkim.DKIM(message, minkey=MIN_RSA_BITS, logger=_quiet)
    broken = False  # a candidate was acceptable but its cryptography failed
    for idx, sig, key in candidates:
        try:
            record = keys.record(tenant, key)
        except KeyUnavailable as exc:
            return DkimResult.fail(str(exc), temporary=exc.temporary, dsn="5.7.21")

        def dnsfunc(name: bytes, timeout: int = 5, record: bytes = record) -> bytes:
            return record

        problem = check_tags(sig, tenant, now) or _key_mismatch(sig, record)
        if problem:
            reasons.append(problem)
            continue
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.KeyFormatError as exc:
            reasons.append(f"key not acceptable: {exc}")
            continue
        except dkim.DKIMException as exc:
            text = str(exc)
            if text.startswith("body hash mismatch"):
                text = "body hash mismatch: the body was changed after signing"
            reasons.append(f"signature did not verify: {text}")
            broken = True
            continue
        if not ok:
            reasons.append("signature did not verify: signed headers changed, or signed with another key")
            broken = True
            continue
        return DkimResult(
            passed=True,
            reason="pinned key" if key.public_key else "key from DNS",
            dsn="2.7.0",
            domain=tenant.signing_domain,
            selector=key.selector,
            algorithm=_tag(sig, b"a"),
            identity=_tag(sig, b"i") or f"@{tenant.signing_domain}",
            b_prefix=_tag(sig, b"b").replace(" ", "")[:8],
            key_source="pinned" if key.public_key else "dns",
        )
    return DkimResult.fail("; ".join(reasons), dsn="5.7.20" if broken else "5.7.21")


class _QuietLogger(logging.LoggerAdapter):
    """dkimpy logs every failure at ERROR; we report failures ourselves, once."""

    def error(self, msg, *args, **kwargs):  # noqa: D401
        self.debug(msg, *args, **kwargs)


_quiet = _QuietLogger(logging.getLogger("relay.dkim.lib"), {})
