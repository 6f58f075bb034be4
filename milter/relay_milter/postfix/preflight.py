"""Everything the configuration points to, checked before anything goes live.

`relayctl check` and `relayctl apply` run these after the tenant files and settings
validated, next to the Postfix checks of the rendered configuration:

- the relay's own TLS certificate and key (settings ``tls_cert_file``/``tls_key_file``):
  they exist, are readable, parse, belong together and have not expired (days left);
- each tenant's ``smarthost.ca_file``: it exists and holds at least one certificate;
- each pinned DKIM key: its type and size (the type is already checked at load time;
  a key under 1024 bits is refused by the milter, so it is named here);
- a pinned key that is also published in DNS: the two agree (a warning if not);
- each smarthost host name resolves (a warning; an error with ``strict``).

Every lookup here asks the resolver configured in settings ``dns`` (the one the milter
uses for DKIM keys; with no ``nameservers``, /etc/resolv.conf, which Postfix uses too).

Findings are phrased for the operator: what, where (file, tenant, field), and why it matters.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from relay_milter.config import DnsSettings, Settings, Tenant, TenantSet, public_key_info

MIN_RSA_BITS = 1024  # the milter refuses signatures by smaller RSA keys (core.dkimverify)
CERT_WARN_DAYS = 21  # status: warning this many days before the relay certificate expires
CERT_CRIT_DAYS = 7


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning" | "ok"
    subject: str  # e.g. "settings tls_key_file", "tenant acme smarthost.host"
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.subject}: {self.text}"


@dataclass
class Preflight:
    findings: list[Finding] = field(default_factory=list)
    cert_days_left: int | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: str, subject: str, text: str) -> None:
        self.findings.append(Finding(level, subject, text))

    def to_json(self) -> dict:
        return {"findings": [asdict(f) for f in self.findings], "cert_days_left": self.cert_days_left}


# -- the relay's certificate ------------------------------------------------------------------


def _read(path: Path, what: str, pf: Preflight) -> bytes | None:
    if not path.exists():
        pf.add("error", what, f"{path} does not exist (Postfix would offer no STARTTLS: 454 4.7.0 TLS not available)")
        return None
    if not path.is_file():
        pf.add("error", what, f"{path} is not a regular file")
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        pf.add("error", what, f"{path} is not readable: {exc.strerror}")
        return None


def cert_days_left(cert_file: Path, now: datetime.datetime | None = None) -> int | None:
    """Whole days until the first certificate in ``cert_file`` expires; None if unreadable."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return int((cert.not_valid_after_utc - now).total_seconds() // 86400)


def check_relay_tls(settings: Settings, pf: Preflight, now: datetime.datetime | None = None) -> None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert_pem = _read(settings.tls_cert_file, "settings tls_cert_file", pf)
    key_pem = _read(settings.tls_key_file, "settings tls_key_file", pf)
    cert = key = None
    if cert_pem is not None:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            pf.add("error", "settings tls_cert_file", f"{settings.tls_cert_file}: not a PEM certificate: {exc}")
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            pf.add("error", "settings tls_key_file", f"{settings.tls_key_file}: not an unencrypted PEM private key: {exc}")
        else:
            mode = settings.tls_key_file.stat().st_mode & 0o777
            if mode & 0o004:
                pf.add("warning", "settings tls_key_file", f"{settings.tls_key_file}: mode {mode:04o}: the private key is world-readable (chmod 0600)")
    if cert is not None and key is not None:
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(serialization.Encoding.DER, pub):
            pf.add("error", "settings tls_key_file", f"{settings.tls_key_file} does not belong to the certificate in {settings.tls_cert_file}")
    if cert is not None:
        days = int((cert.not_valid_after_utc - now).total_seconds() // 86400)
        pf.cert_days_left = days
        until = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        if cert.not_valid_after_utc <= now:
            pf.add("error", "settings tls_cert_file", f"{settings.tls_cert_file} expired at {until}")
        elif cert.not_valid_before_utc > now:
            pf.add("error", "settings tls_cert_file", f"{settings.tls_cert_file} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
        elif days < CERT_WARN_DAYS:
            pf.add("warning", "settings tls_cert_file", f"{settings.tls_cert_file} expires in {days} day(s), at {until}")
        else:
            pf.add("ok", "settings tls_cert_file", f"valid until {until} ({days} days left)")


# -- tenants ---------------------------------------------------------------------------------


def check_ca_file(t: Tenant, source: Path, pf: Preflight) -> None:
    ca = t.smarthost.ca_file
    if ca is None:
        return
    subject = f"{source}: tenant {t.id}: field smarthost.ca_file"
    data = _read(ca, subject, pf)
    if data is None:
        return
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        pf.add("error", subject, f"{ca} holds no PEM certificate (tls: verify would defer every message)")


def _key_field(t: Tenant, n: int) -> str:
    return "public_key" if n == 0 else f"keys.{n - 1}.public_key"


def check_pinned_key(t: Tenant, source: Path, pf: Preflight) -> None:
    for n, key in enumerate(t.hop_keys):
        if not key.public_key:
            continue
        subject = f"{source}: tenant {t.id}: field {_key_field(t, n)}"
        try:
            info = public_key_info(key.public_key)
        except ValueError as exc:  # load_tenants refuses these already; kept for applied sets
            pf.add("error", subject, str(exc))
            continue
        if info.type == "rsa" and info.bits < MIN_RSA_BITS:
            pf.add("warning", subject, f"RSA key of {info.bits} bits: the milter refuses signatures by keys under {MIN_RSA_BITS} bits")


def _txt(name: str, settings: Settings) -> tuple[str | None, str | None]:
    """(record, None) or (None, why not), asked of the resolver in settings ``dns``."""
    import dns.exception
    import dns.resolver

    r = settings.dns.resolver()
    try:
        answer = r.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None, "not published"
    except dns.exception.DNSException as exc:
        return None, f"lookup failed: {exc.__class__.__name__}"
    records = [b"".join(rr.strings).decode("ascii", "replace") for rr in answer]
    return (records[0], None) if len(records) == 1 else (None, f"{len(records)} TXT records")


def _p(record: str) -> str:
    tags = dict(t.strip().split("=", 1) for t in record.split(";") if "=" in t)
    return "".join(tags.get("p", "").split())


def check_pinned_vs_dns(t: Tenant, source: Path, settings: Settings, pf: Preflight) -> None:
    """Pinned keys agree with DNS where published; keys taken from DNS are published."""
    import time

    now = time.time()
    for n, key in enumerate(t.hop_keys):
        if key.not_after is not None and key.not_after.timestamp() <= now:
            continue  # expired: refused anyway
        name = f"{key.selector}._domainkey.{t.signing_domain}"
        record, why = _txt(name, settings)
        subject = f"{source}: tenant {t.id}: field {'selector' if n == 0 else f'keys.{n - 1}'}"
        if key.public_key is None:
            if record is None:
                pf.add("warning", subject, f"no usable key at {name} ({why}): signatures by s={key.selector} would be refused")
            continue
        if record is not None and _p(record) != _p(key.public_key):
            pf.add("warning", f"{source}: tenant {t.id}: field {_key_field(t, n)}",
                   f"the pinned key differs from the one published at {name}; the pinned one is used "
                   "(check which one the platform signs with)")


def lookup_addresses(host: str, dns_settings: DnsSettings) -> tuple[list[str], str | None]:
    """The addresses of ``host`` (A, then AAAA) from the resolver in settings ``dns``, and
    None; or ([], why not). An IP address is returned as is.

    Like Postfix's smtp client (``smtp_host_lookup = dns``, its default), this asks DNS
    only, never /etc/hosts. The resolver is the one configured in settings ``dns``: with
    no ``nameservers`` that is /etc/resolv.conf, the one Postfix uses.
    """
    import dns.exception
    import dns.resolver

    try:
        ipaddress.ip_address(host)
        return [host], None
    except ValueError:
        pass
    r = dns_settings.resolver()
    for rdtype in ("A", "AAAA"):
        try:
            answer = r.resolve(host, rdtype)
        except dns.resolver.NXDOMAIN:
            return [], f"{host} does not resolve: the name does not exist (NXDOMAIN)"
        except dns.resolver.NoAnswer:
            continue
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            return [], f"lookup of {host} timed out after {dns_settings.timeout:g}s"
        except dns.exception.DNSException as exc:
            return [], f"lookup of {host} failed temporarily: {exc.__class__.__name__}"
        return [rr.address for rr in answer], None
    return [], f"{host} does not resolve: it has no A or AAAA record"


def resolve_host(host: str, dns_settings: DnsSettings) -> str | None:
    """None if ``host`` resolves (see lookup_addresses), else why not."""
    return lookup_addresses(host, dns_settings)[1]


def check_smarthost_name(t: Tenant, source: Path, settings: Settings, strict: bool, pf: Preflight) -> None:
    why = resolve_host(t.smarthost.host, settings.dns)
    if why:
        pf.add("error" if strict else "warning", f"{source}: tenant {t.id}: field smarthost.host",
               f"{why} (mail for this tenant would wait in the deferred queue)")


# Tenants checked at once: their DNS lookups wait on the network, one after another they
# would take minutes with thousands of tenants (docs/scale.md).
WORKERS = 32


def _tenant_findings(t: Tenant, source: Path, settings: Settings, strict: bool, dns: bool) -> list[Finding]:
    pf = Preflight()
    check_ca_file(t, source, pf)
    check_pinned_key(t, source, pf)
    if dns:
        check_smarthost_name(t, source, settings, strict, pf)
        check_pinned_vs_dns(t, source, settings, pf)
    return pf.findings


def run(
    tenants: TenantSet, settings: Settings, strict: bool = False, dns: bool = True, dns_for: set[str] | None = None
) -> Preflight:
    """Every check above. ``dns=False`` skips the network lookups (smarthost names, keys in DNS);
    ``dns_for``: only for these tenant ids (apply: the tenants that changed since the last
    apply; their lookups were done then). Tenants are checked in parallel threads; findings
    come out in tenant order."""
    from concurrent.futures import ThreadPoolExecutor

    pf = Preflight()
    check_relay_tls(settings, pf)
    sources = [(t, tenants.sources.get(t.id, Path(f"tenant {t.id}"))) for t in tenants]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        # Only tenants with DNS lookups wait on the network: the others are checked here
        # (a thread per check would cost more than the check).
        lookups = {t.id for t, _ in sources if dns and (dns_for is None or t.id in dns_for)}
        pending = {t.id: pool.submit(_tenant_findings, t, src, settings, strict, True) for t, src in sources if t.id in lookups}
        for t, src in sources:
            pf.findings += pending[t.id].result() if t.id in pending else _tenant_findings(t, src, settings, strict, False)
    return pf



def known_parameters() -> set[str]:
    """Every main.cf parameter this Postfix knows (``postconf -d``)."""
    from relay_milter.postfix.runner import run_postfix

    r = run_postfix(["postconf", "-d"])
    return {line.split(" = ", 1)[0].strip() for line in r.stdout.splitlines() if " = " in line}


def check_postfix_extra(settings: Settings, main_cf: str, marker: str, pf: Preflight) -> None:
    """settings postfix_extra: known names only, and none the relay sets itself."""
    if not settings.postfix_extra:
        return
    own_text = main_cf.split(marker, 1)[0]
    own = {line.split("=", 1)[0].strip() for line in own_text.splitlines() if "=" in line and not line.startswith(("#", " ", "\t"))}
    known = known_parameters()
    for name in settings.postfix_extra:
        subject = f"settings postfix_extra.{name}"
        if name in own:
            pf.add("error", subject, "the relay sets this parameter itself (relay-critical); it cannot be overridden here")
        elif name not in known:
            pf.add("error", subject, "not a Postfix parameter (postconf -d does not list it)")
