"""Typed, validated tenant definitions and relay settings.

Tenant files are YAML: one tenant per file (a mapping) or several (a list of
mappings, or a mapping with a ``tenants:`` list). Every error names the file,
the tenant and the field, so an operator can fix it without reading code.
"""

from __future__ import annotations

import base64
import hashlib
import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay_milter import defaults
from relay_milter.syntax import DOMAIN_RE, LABEL, LOCAL_RE

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,30}$")
_USER_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""


# A quoted fragment of a YAML parser message that is safe to repeat: a token name
# ('<scalar>', '<block end>') or one character ('@', '\\t'). Anything else in quotes
# (an alias or tag name, a scalar) may be part of a secret.
_SAFE_QUOTED = re.compile(r"^'(<[a-z ]+>|[^'\\]|\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[a-z]))'$")


def _redact_quoted(text: str) -> str:
    return re.sub(r"'[^'\n]*'", lambda m: m.group(0) if _SAFE_QUOTED.match(m.group(0)) else "'...'", text)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as "<problem> at line L, column C", never the parser's snippet.

    PyYAML's str() of an error quotes the offending lines of the file; for the secrets
    file (and relay.yaml with a database password in events_dsn) that is the secret
    itself. Only the parser's description, with quoted names redacted, and the position
    are kept."""
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"unacceptable character #x{char:04x} ({exc.reason}) at character {exc.position + 1}"
    problem = getattr(exc, "problem", None) or "invalid YAML"
    context = getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    text = _redact_quoted(str(problem))
    if context:
        text = f"{text} ({_redact_quoted(str(context))})"
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    return text


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path, what: str) -> Any:
    """Read one YAML file the relay uses (tenants, settings, secrets). Raises ConfigError
    naming the file, the problem and its line and column, never the file's content."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 (byte offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        # libyaml when PyYAML has it: about 20 times faster, which matters with thousands of
        # tenant files (docs/scale.md). Same types out; an error is reported by the pure-Python
        # parser below, so its wording does not depend on how PyYAML was built.
        return yaml.load(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({what}): {yaml_problem(exc)}") from None


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if len(value) > 253 or not DOMAIN_RE.match(value):
        raise ValueError(f"not a valid DNS domain name: {value!r}")
    return value


def _address(value: str) -> str:
    value = value.strip()
    local, sep, domain = value.rpartition("@")
    if not sep or not LOCAL_RE.match(local) or ".." in local or local.startswith(".") or local.endswith("."):
        raise ValueError(f"not a plain mailbox address (local@domain): {value!r}")
    return f"{local}@{_domain(domain)}"


def _header_name(value: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError(f"not a valid header field name: {value!r}")
    return value


Domain = Annotated[str, AfterValidator(_domain)]
Address = Annotated[str, AfterValidator(_address)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR network: {exc}") from None


Network = Annotated[
    Union[ipaddress.IPv4Network, ipaddress.IPv6Network], PlainValidator(_network), PlainSerializer(str)
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# -- sender reputation: source addresses, blocklists, pacing, ingress limits (issue 14) --------


def _ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {value!r}") from None


IPAddress = Annotated[str, PlainValidator(_ip)]


class SmarthostRate(_Strict):
    """Outbound pacing towards the smarthost: ``"10/s"``, ``"300/m"`` or ``"3600/h"``."""

    messages: int = Field(ge=1, le=100000)
    per: Literal["s", "m", "h"]

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = re.match(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$", v)
            if not m:
                raise ValueError(f"not a rate (N/s, N/m or N/h): {v!r}")
            return {"messages": int(m.group(1)), "per": m.group(2)}
        return v

    @property
    def per_second(self) -> float:
        return self.messages / {"s": 1, "m": 60, "h": 3600}[self.per]

    @property
    def delay(self) -> str:
        """Postfix destination_rate_delay: the pause between two deliveries, in whole seconds
        (Postfix takes no fractions), rounded up so the rate is never exceeded. Faster than
        1/s cannot be written as a delay: 0s, and concurrency caps the pace instead."""
        import math

        return f"{math.ceil(1 / self.per_second)}s" if self.per_second < 1 else "0s"


class TenantLimits(_Strict):
    """Ingress limits and backpressure, enforced by the milter per node (452, mail kept by the platform)."""

    messages_per_minute: int | None = Field(None, ge=1)
    messages_per_day: int | None = Field(None, ge=1)
    recipients_per_message: int | None = Field(None, ge=1, le=1000)
    # Backpressure: the tenant's queue (messages) or its oldest deferred message (seconds).
    max_queued: int | None = Field(None, ge=1)
    max_queue_age: float | None = Field(None, gt=0)


class SourceAddress(_Strict):
    """One outbound address of the pool: the tenants bound to it leave from it and say HELO as ``helo``."""

    address: IPAddress
    helo: Domain
    role: Literal["active", "standby"] = "active"
    # Tenants this address is dedicated to (a tenant may also name it in its source_address).
    tenants: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


class BlocklistZone(_Strict):
    """A DNS blocklist: ``zone`` is queried as ``<reversed address>.<zone>`` (or ``<domain>.<zone>``)."""

    zone: Domain
    # Answers (127.x.y.z) that mean "listed". Empty: every answer except the error codes.
    listed: tuple[IPAddress, ...] = ()
    # Answers that mean "the list refused the query" (open/public resolver, over quota):
    # an error, never a listing. Default: Spamhaus' 127.255.255.252/254/255.
    errors: tuple[IPAddress, ...] = ("127.255.255.252", "127.255.255.254", "127.255.255.255")


class ReputationSettings(_Strict):
    """The source address pool and its blocklist monitoring (relayctl ip, relayctl reputation)."""

    pool: tuple[SourceAddress, ...] = ()
    # IP blocklists for the pool addresses; domain blocklists for relay, signing and HELO domains.
    dnsbls: tuple[BlocklistZone, ...] = ()
    domain_lists: tuple[BlocklistZone, ...] = ()
    # auto: a listed active address is replaced by a healthy standby at once;
    # manual: only `relayctl ip failover ADDR` does it.
    failover: Literal["auto", "manual"] = "manual"
    # Listing states, FCrDNS results and failovers in force (JSON, written by relayctl).
    state_file: Path = Path(defaults.REPUTATION_STATE_FILE)
    # Prometheus textfile written by `relayctl reputation check` (None: off).
    metrics_file: Path | None = None
    # POST each reputation event here as JSON (an operator alert; none: log lines and metrics only).
    alert_webhook: str | None = None
    # How often `relayctl reputation watch` checks.
    interval: float = Field(defaults.REPUTATION_INTERVAL, ge=10, le=86400)
    # Backpressure (tenant limits.max_queued, max_queue_age): the tracker writes a per-tenant
    # queue summary to queue_summary_file every queue_refresh seconds and the milter re-reads
    # it as often. Older than queue_summary_max_age (or missing): backpressure fails open.
    queue_refresh: float = Field(defaults.QUEUE_SUMMARY_INTERVAL, ge=0.2, le=300)
    queue_summary_file: Path = Path(defaults.QUEUE_SUMMARY_FILE)
    queue_summary_max_age: float = Field(defaults.QUEUE_SUMMARY_MAX_AGE, ge=1, le=86400)
    # Prometheus textfile the milter writes with the summary's age and backpressure state (None: off).
    milter_metrics_file: Path | None = None

    @model_validator(mode="after")
    def _unique(self) -> "ReputationSettings":
        if self.queue_summary_max_age < 2 * self.queue_refresh:
            raise ValueError(
                f"queue_summary_max_age ({self.queue_summary_max_age:g}) must be at least twice queue_refresh "
                f"({self.queue_refresh:g}): a summary would expire between two writes"
            )
        seen = [a.address for a in self.pool]
        dup = sorted({a for a in seen if seen.count(a) > 1})
        if dup:
            raise ValueError(f"pool: address {', '.join(dup)} listed twice")
        owners: dict[str, str] = {}
        for a in self.pool:
            for t in a.tenants:
                if owners.setdefault(t, a.address) != a.address:
                    raise ValueError(f"pool: tenant {t} is dedicated to both {owners[t]} and {a.address}")
        return self

    @field_validator("alert_webhook")
    @classmethod
    def _alert_url(cls, v: str | None) -> str | None:
        return None if v is None else Webhook._url(v)

    def entry(self, address: str) -> SourceAddress | None:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return None
        return next((a for a in self.pool if a.address == address), None)


class SmarthostAuth(_Strict):
    """SMTP AUTH towards the smarthost. The password is not here: it is the tenant's
    ``smarthost_password`` in the secrets file (settings ``secrets_file``, mode 0600)."""

    username: str = Field(min_length=1, max_length=256)

    @field_validator("username")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.match(r"^[\x21-\x7e]+$", v):
            raise ValueError("must be printable ASCII without spaces")
        return v


class Smarthost(_Strict):
    """The customer's own last-mile SMTP server."""

    host: str
    port: int = Field(25, ge=1, le=65535)
    # none: plaintext only; may: opportunistic STARTTLS; encrypt: TLS required;
    # verify: TLS required and the certificate must verify against ca_file (or the system CAs).
    tls: Literal["none", "may", "encrypt", "verify"] = "may"
    ca_file: Path | None = None
    # With tls: verify, the name the certificate must carry (default: host). Needed
    # when host is an IP address: Postfix matches DNS names only.
    tls_match: str | None = None
    # Log in to the smarthost (only over verified TLS: tls must be verify).
    auth: SmarthostAuth | None = None
    # Parallel deliveries to this smarthost (Postfix destination concurrency and maxproc).
    concurrency: int = Field(defaults.SMARTHOST_CONCURRENCY, ge=1, le=100)
    # Pace deliveries: "10/s", "300/m", "3600/h" (Postfix destination_rate_delay per transport).
    rate: SmarthostRate | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.strip().lower().rstrip(".")
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            pass
        if not re.match(rf"^{LABEL}(\.{LABEL})*$", v):
            raise ValueError(f"not a host name or IP address: {v!r}")
        return v

    @field_validator("tls_match")
    @classmethod
    def _match(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().lower().rstrip(".")
        if not re.match(rf"^(\*\.)?{LABEL}(\.{LABEL})*$", v):
            raise ValueError(f"not a host name: {v!r}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> "Smarthost":
        if self.ca_file is not None and self.tls != "verify":
            raise ValueError("ca_file is only used with tls: verify")
        if self.tls_match is not None and self.tls != "verify":
            raise ValueError("tls_match is only used with tls: verify")
        if self.auth is not None and self.tls != "verify":
            raise ValueError(
                f"auth needs tls: verify, not {self.tls} (without a verified certificate an active "
                "attacker between relay and smarthost collects the password)"
            )
        return self

    @property
    def tls_policy(self) -> str:
        """The smtp_tls_policy_maps entry for this smarthost."""
        if self.tls != "verify":
            return self.tls
        # The CA (ca_file) is the transport's smtp_tls_CAfile; see master.cf.j2.
        return f"verify match={self.tls_match or self.host}"

    @property
    def nexthop(self) -> str:
        """Postfix nexthop: brackets suppress MX lookups, IPv6 needs the ipv6: form."""
        host = self.host
        if ":" in host:
            host = f"ipv6:{host}"
        return f"[{host}]:{self.port}"


class HeaderRules(_Strict):
    # Hop-only headers the platform adds for the relay; removed before the last mile.
    strip: tuple[HeaderName, ...] = ()
    # Replace (or add) Reply-To with this address.
    reply_to: Address | None = None
    # Replace the envelope sender (MAIL FROM) with this address; bounces go there.
    envelope_sender: Address | None = None


class Webhook(_Strict):
    """Where the tracker POSTs this tenant's delivery events (docs/tracking.md). The HMAC
    secret is not here: it is the tenant's ``webhook_secret`` in the secrets file."""

    url: str
    timeout: float = Field(defaults.WEBHOOK_TIMEOUT, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c in v for c in " \r\n\t"):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v


# -- bounce tracking (issue 15 A): VERP return paths, DSN and ARF ingestion ----------------


class BounceTracking(_Strict):
    """Opt-in asynchronous bounce and complaint tracking: the envelope sender becomes a VERP
    return path under ``domain`` (an MX pointing at the relays), whose DSNs and ARF reports
    become BOUNCED/DELAYED/COMPLAINED events. ``forward_to``: a copy of each report goes there,
    through the tenant's smarthost."""

    domain: Domain
    forward_to: Address | None = None


# -- end bounce tracking --


def _selector(v: str) -> str:
    v = v.strip().lower()
    if not re.match(rf"^{LABEL}(\.{LABEL})*$", v):
        raise ValueError(f"not a valid DKIM selector: {v!r}")
    return v


def _utc(v: datetime.datetime | None) -> datetime.datetime | None:
    if v is not None and v.tzinfo is None:
        return v.replace(tzinfo=datetime.timezone.utc)
    return v


class HopKey(_Strict):
    """One accepted hop key: the tenant's current one (``selector``/``public_key``), or an
    entry of ``keys`` (a previous or an upcoming key, for rotation with overlap)."""

    selector: Annotated[str, AfterValidator(_selector)]
    # Pinned like the tenant's public_key; without it the key is looked up in DNS.
    public_key: str | None = None
    # Accepted from / until (ISO 8601; no zone means UTC). None: no limit.
    not_before: Annotated[datetime.datetime | None, AfterValidator(_utc)] = None
    not_after: Annotated[datetime.datetime | None, AfterValidator(_utc)] = None

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else dkim_txt_record(v)

    @model_validator(mode="after")
    def _window(self) -> "HopKey":
        if self.not_before and self.not_after and self.not_before >= self.not_after:
            raise ValueError("not_before must be before not_after")
        return self

    def refused_at(self, now: float) -> str | None:
        """Why a signature by this key is not accepted at ``now`` (epoch seconds), or None."""
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        if self.not_after is not None and now >= self.not_after.timestamp():
            return f"the key of selector s={self.selector} expired at {self.not_after.strftime(fmt)} (not_after)"
        if self.not_before is not None and now < self.not_before.timestamp():
            return f"the key of selector s={self.selector} is not valid before {self.not_before.strftime(fmt)} (not_before)"
        return None


# -- engagement tracking: opens and clicks (issue 15, part B; opt-in) ---------------------


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EngagementTracking(_Strict):
    """Opt-in opens and clicks (docs/tracking.md, "Opens and clicks"). The milter rewrites
    the links of the tenant's HTML parts to ``base_url/c/<token>`` and adds an open pixel
    ``base_url/o/<token>``; ``relayctl web`` serves both. Off unless the tenant sets it."""

    # Where `relayctl web` is reached from the internet (behind a TLS reverse proxy):
    # https://, no query or fragment. http:// only for a loopback host (labs, tests).
    base_url: str
    opens: bool = True
    clicks: bool = True

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if not re.fullmatch(r"[A-Za-z0-9._~:/\[\]%-]+", v):
            raise ValueError(f"not a plain http(s) URL (letters, digits, . _ ~ : / - only): {v!r}")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or parts.username:
            raise ValueError(f"not an https URL without user, query or fragment: {v!r}")
        if parts.scheme == "http" and not _loopback_host(parts.hostname):
            raise ValueError(f"must be https (tracking links carry recipients' clicks); http only for loopback: {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _something(self) -> "EngagementTracking":
        if not (self.opens or self.clicks):
            raise ValueError("opens and clicks are both off: leave engagement_tracking out instead")
        return self


class EngagementSettings(_Strict):
    """`relayctl web` and the milter's engagement key (settings ``engagement:``)."""

    # 64 hex digits (256 bits), created by `relayctl web --create-key` (the role runs it at install).
    key_file: Path = Path(defaults.ENGAGEMENT_KEY_FILE)
    # Where `relayctl web` listens (plain HTTP; put a TLS reverse proxy in front): host:port.
    listen: str = defaults.ENGAGEMENT_LISTEN

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[0-9A-Za-z.\-]+):\d{1,5}", v) or not 0 < int(v.rpartition(":")[2]) < 65536:
            raise ValueError(f"not host:port: {v!r}")
        return v


class Tenant(_Strict):
    id: str
    description: str = ""
    relay_domain: Domain
    # The dedicated hop DKIM identity: d= and s= of the signature the platform adds.
    signing_domain: Domain
    selector: str
    # Pinned key: PEM (SubjectPublicKeyInfo) or a DKIM TXT record / bare p= value.
    # Without one the key is looked up in DNS at <selector>._domainkey.<signing_domain>.
    public_key: str | None = None
    # Further accepted keys, for rotation with overlap: the previous key until its
    # not_after, or the next one from its not_before. A signature by any key valid now passes.
    keys: tuple[HopKey, ...] = ()
    required_signed_headers: tuple[str, ...] = defaults.REQUIRED_SIGNED_HEADERS
    # Headers the signature must cover whenever the message has them (every instance).
    signed_headers_if_present: tuple[str, ...] = defaults.SIGNED_HEADERS_IF_PRESENT
    # Reject signatures older than this many seconds (by t=); 0 disables the check.
    max_signature_age: int = Field(defaults.MAX_SIGNATURE_AGE, ge=0)
    # Signed ingress: every decoded envelope recipient must be in the signed To/Cc, so a
    # captured message cannot be replayed to new recipients. true allows Bcc-style sending.
    allow_bcc: bool = False
    allowed_sender_domains: tuple[Domain, ...] = Field(min_length=1)
    # Optional exact sender addresses (header From). Empty means any address in the domains.
    allowed_senders: tuple[Address, ...] = ()
    # Client IPs allowed to submit for this tenant (both ingress modes). Empty means any client.
    allowed_client_ips: tuple[Network, ...] = ()
    # SASL user names that submit for this tenant on the submission port (SMTP AUTH
    # under STARTTLS). Passwords live in the SASL database: `relayctl user add`.
    submission_users: tuple[str, ...] = ()
    # Signed ingress (port 25) only under STARTTLS: RCPT without TLS gets 530 5.7.0.
    # Submission always requires TLS.
    require_tls: bool = False
    smarthost: Smarthost
    headers: HeaderRules = HeaderRules()
    # Push delivery events to this tenant (relayctl track): RECEIVED, RELAYED, DEFERRED, ...
    webhook: Webhook | None = None
    # Sender reputation (issue 14): the pool address this tenant leaves from, and its ingress limits.
    source_address: IPAddress | None = None
    limits: TenantLimits = TenantLimits()
    # Opens and clicks (issue 15 part B), off unless set: see EngagementTracking.
    engagement_tracking: EngagementTracking | None = None
    # Bounce tracking (issue 15 A): VERP return paths under a bounce domain; off by default.
    bounce_tracking: BounceTracking | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(
                "must be 1-31 characters of a-z, 0-9 and _, starting with a letter or digit "
                "(it names a Postfix transport)"
            )
        return v

    @field_validator("submission_users")
    @classmethod
    def _users(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for user in v:
            if not _USER_RE.match(user):
                raise ValueError(f"not a valid submission user name (a-z, 0-9, . _ - +, 1-64): {user!r}")
        if len(set(v)) != len(v):
            raise ValueError("listed twice")
        return v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.match(rf"^{LABEL}(\.{LABEL})*$", v):
            raise ValueError(f"not a valid DKIM selector: {v!r}")
        return v

    @field_validator("required_signed_headers")
    @classmethod
    def _signed(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(_header_name(h).lower() for h in v))
        if "from" not in names:
            names = ("from",) + names
        return names

    @field_validator("signed_headers_if_present")
    @classmethod
    def _signed_if_present(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_header_name(h).lower() for h in v))

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is None:
            return None
        return dkim_txt_record(v)

    @model_validator(mode="after")
    def _keys(self) -> "Tenant":
        selectors = [self.selector] + [k.selector for k in self.keys]
        dup = sorted({x for x in selectors if selectors.count(x) > 1})
        if dup:
            raise ValueError(f"keys: selector {', '.join(dup)} listed twice (selectors name keys)")
        return self

    @property
    def hop_keys(self) -> tuple[HopKey, ...]:
        """Every accepted key, the current one (selector/public_key) first.

        Built without validating again (read for every message; validating would parse the
        pinned key each time): this tenant's validators already normalised both values the
        way HopKey's do."""
        return (HopKey.model_construct(selector=self.selector, public_key=self.public_key), *self.keys)

    def hop_key(self, selector: str) -> HopKey | None:
        return next((k for k in self.hop_keys if k.selector == selector), None)

    @model_validator(mode="after")
    def _senders(self) -> "Tenant":
        for addr in self.allowed_senders:
            if addr.rpartition("@")[2] not in self.allowed_sender_domains:
                raise ValueError(f"allowed_senders: {addr} is not in allowed_sender_domains")
        if self.relay_domain in self.allowed_sender_domains:
            raise ValueError("relay_domain must not also be an allowed sender domain")
        if self.bounce_tracking is not None:
            bd = self.bounce_tracking.domain
            if bd in (self.relay_domain, self.signing_domain) or bd in self.allowed_sender_domains:
                raise ValueError(
                    f"bounce_tracking.domain: {bd} must be a domain of its own (not the relay, signing or a sender domain)"
                )
            fwd = self.bounce_tracking.forward_to
            if fwd and fwd.rpartition("@")[2] in (bd, self.relay_domain):
                raise ValueError(f"bounce_tracking.forward_to: {fwd} would loop back into the relay")
        return self

    def sender_allowed(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        if domain not in self.allowed_sender_domains:
            return False
        if not self.allowed_senders:
            return True
        return f"{local}@{domain}" in self.allowed_senders

    def envelope_sender_allowed(self, address: str) -> bool:
        """The envelope sender may also be a bounce address in the hop signing domain."""
        return self.sender_allowed(address) or address.rpartition("@")[2].lower() == self.signing_domain

    def client_allowed(self, ip: str | None) -> bool:
        if not self.allowed_client_ips:
            return True
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.allowed_client_ips)

    @property
    def bounce_domains(self) -> tuple[str, ...]:
        """Domains whose mail (bounces the relay itself generates) goes to this tenant's smarthost."""
        domains = list(self.allowed_sender_domains)
        if self.headers.envelope_sender:
            domains.append(self.headers.envelope_sender.rpartition("@")[2])
        return tuple(dict.fromkeys(domains))


def dkim_txt_record(key: str) -> str:
    """Normalise a pinned key (PEM, TXT record or bare base64) to a DKIM TXT record."""
    text = key.strip()
    if text.startswith("-----BEGIN"):
        body = re.sub(r"-----[^-]+-----", "", text)
        der = re.sub(r"\s+", "", body)
        try:
            base64.b64decode(der, validate=True)
        except ValueError as exc:
            raise ValueError(f"PEM body is not valid base64: {exc}") from None
        if "RSA PUBLIC KEY" in text:
            raise ValueError("PKCS#1 'RSA PUBLIC KEY' PEM is not supported; use SubjectPublicKeyInfo ('PUBLIC KEY')")
        return _pem_record(der)
    flat = re.sub(r"\s+", "", text)
    if "p=" in flat:
        tags = dict(t.split("=", 1) for t in flat.split(";") if "=" in t)
        if not tags.get("p"):
            raise ValueError("DKIM record has an empty p= (revoked key)")
        try:
            base64.b64decode(tags["p"], validate=True)
        except ValueError as exc:
            raise ValueError(f"p= is not valid base64: {exc}") from None
        record = "; ".join(f"{k}={v}" for k, v in tags.items())
        public_key_info(record)
        return record
    try:
        base64.b64decode(flat, validate=True)
    except ValueError:
        raise ValueError("public_key must be PEM, a DKIM TXT record, or base64 p= data") from None
    record = f"v=DKIM1; k=rsa; p={flat}"
    public_key_info(record)
    return record


def _pem_record(der_b64: str) -> str:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        key = serialization.load_der_public_key(base64.b64decode(der_b64))
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("PEM body is valid base64 but not a public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return f"v=DKIM1; k=rsa; p={der_b64}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    raise ValueError(f"PEM holds a {type(key).__name__} key; DKIM keys are RSA or Ed25519")


@dataclass(frozen=True)
class KeyInfo:
    """What a DKIM key record really holds: its type and size, checked by parsing it."""

    type: str  # rsa | ed25519
    bits: int


def public_key_info(record: str) -> KeyInfo:
    """Parse the key in a DKIM TXT record; ValueError (phrased for the operator) if ``p=``
    is not a key of the declared type ``k=`` (default rsa). Valid base64 that is not a key
    must never go live: every message of the tenant would then be refused."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    tags = dict(t.strip().split("=", 1) for t in record.split(";") if "=" in t)
    k = tags.get("k", "rsa").strip().lower()
    data = base64.b64decode(re.sub(r"\s+", "", tags.get("p", "")))
    if k == "rsa":
        try:
            key = load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError("p= is valid base64 but not a public key (DER SubjectPublicKeyInfo)") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"k=rsa but p= holds a {type(key).__name__.removesuffix('PublicKey').lstrip('_')} key")
        return KeyInfo("rsa", key.key_size)
    if k == "ed25519":
        if len(data) != 32:
            raise ValueError(f"k=ed25519 but p= holds {len(data)} bytes, not a 32-byte Ed25519 key")
        ed25519.Ed25519PublicKey.from_public_bytes(data)
        return KeyInfo("ed25519", 256)
    raise ValueError(f"unsupported key type k={k} (rsa or ed25519)")


class DnsSettings(_Strict):
    """The resolver for every lookup the relay's own code makes: DKIM keys (the milter),
    and smarthost names and published keys (`relayctl check`/`apply`)."""

    # Empty: use /etc/resolv.conf (the resolver Postfix uses too).
    nameservers: tuple[str, ...] = ()
    port: int = Field(53, ge=1, le=65535)
    timeout: float = Field(defaults.DNS_TIMEOUT, gt=0, le=60)

    def resolver(self) -> Any:
        """A ``dns.resolver.Resolver`` for these settings."""
        import dns.resolver

        if self.nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = list(self.nameservers)
            r.port = self.port
        else:
            r = dns.resolver.Resolver()
        r.lifetime = r.timeout = self.timeout
        return r


class TrackingSettings(_Strict):
    """Delivery tracking (relayctl track): where events go and how webhooks are retried."""

    # sqlite:////absolute/path.db (default, embedded) or postgresql://user@host/db (shared by nodes).
    events_dsn: str = defaults.EVENTS_DSN
    # This relay's name in a shared store (default: myhostname).
    node: str | None = None
    # The milter's own log (relayctl milter --log-file): tenant, Message-ID, upstream id, recipients.
    milter_log_file: Path = Path(defaults.MILTER_LOG_FILE)
    # Prometheus node-exporter textfile, rewritten every metrics_interval seconds (None: off).
    metrics_file: Path | None = None
    metrics_interval: float = Field(15, gt=0, le=3600)
    poll_interval: float = Field(defaults.TRACK_POLL_INTERVAL, gt=0, le=60)
    # How long a queued message waits for the milter's record before it is recorded without it.
    record_wait: float = Field(defaults.TRACK_RECORD_WAIT, ge=0, le=600)
    webhook_backoff_base: float = Field(defaults.WEBHOOK_BACKOFF_BASE, gt=0, le=3600)
    webhook_backoff_max: float = Field(defaults.WEBHOOK_BACKOFF_MAX, gt=0, le=86400)
    # relayctl prune's default --older-than: a duration (30d, 12w, 90d).
    retention: str = Field(defaults.TRACK_RETENTION, pattern=r"^[1-9]\d*[hdw]$")
    # Webhook URLs must resolve to public addresses; these networks are allowed besides
    # (e.g. [10.20.0.0/16] for a receiver on the internal network). Loopback, link-local
    # (cloud metadata at 169.254.169.254), private, multicast and reserved addresses are
    # refused unless listed here. Checked on the address actually connected to.
    webhook_allow_networks: tuple[Network, ...] = ()

    def dsn(self) -> str:
        """The store in use: RELAY_EVENTS_DSN (keeps a database password out of relay.yaml)
        wins over events_dsn."""
        import os

        return os.environ.get("RELAY_EVENTS_DSN") or self.events_dsn

    @field_validator("events_dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if v.startswith("sqlite:///") or v.startswith(("postgresql://", "postgres://")):
            return v
        raise ValueError("use sqlite:////absolute/path.db or postgresql://user@host/database")


NOTIFY_CLASSES = ("bounce", "2bounce", "data", "delay", "policy", "protocol", "resource", "software")
NOTIFY_TRANSPORT = "relay_notices_"  # cannot clash with relay_<tenant>: tenant ids have no trailing _


class Notify(_Strict):
    """Where Postfix's own notices go: postmaster mail (notify_classes), double bounces,
    delay and error notices, delivered to ``address`` over the operator's ``smarthost``.
    Without this setting they wait on the deferred ``unrouted`` transport."""

    address: Address
    smarthost: Smarthost
    classes: tuple[Literal[NOTIFY_CLASSES], ...] = ("2bounce", "resource", "software")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _no_auth(self) -> "Notify":
        if self.smarthost.auth is not None:
            raise ValueError("smarthost.auth is not supported for notices (use a smarthost that accepts the relay by IP)")
        return self


def _extra(v: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in v.items():
        if not re.match(r"^[a-z0-9_]{1,100}$", str(name)):
            raise ValueError(f"{name!r} is not a Postfix parameter name")
        text = str(value).strip() if not isinstance(value, bool) else ("yes" if value else "no")
        if any(c in text for c in "\r\n\0"):
            raise ValueError(f"{name}: the value must be one line")
        out[str(name)] = text
    return out


class Settings(_Strict):
    """Relay-wide settings (relay.yaml). Every field has a production default."""

    myhostname: Domain = "relay.localdomain"
    # authserv-id in Authentication-Results; defaults to myhostname.
    authserv_id: str | None = None
    config_directory: Path = Path(defaults.CONFIG_DIRECTORY)
    queue_directory: Path = Path(defaults.QUEUE_DIRECTORY)
    data_directory: Path = Path(defaults.DATA_DIRECTORY)
    mail_owner: str = defaults.MAIL_OWNER
    setgid_group: str = defaults.SETGID_GROUP
    # Postfix master.cf service names for the upstream SMTP listener ("25", "127.0.0.1:2525").
    smtpd_listen: tuple[str, ...] = ("25",)
    inet_interfaces: str = "all"
    inet_protocols: Literal["all", "ipv4", "ipv6"] = "all"
    # Submission listeners (SMTP AUTH after STARTTLS), e.g. ["587", "2525"]. Needs tls_cert_file.
    submission_listen: tuple[str, ...] = ()
    # The relay's own certificate (PEM, chain first) and key, for STARTTLS on every listener.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Cyrus SASL database of submission users (relayctl user add|remove|list).
    # Default: <config_directory>/sasl/sasldb2, next to the smtpd.conf Debian's Postfix reads.
    sasl_database: Path | None = None
    # Per-tenant secrets (YAML: tenant id -> {smarthost_password: ...}), root-only.
    secrets_file: Path = Path(defaults.SECRETS_FILE)
    # "" logs to syslog instead of a file.
    maillog_file: str = defaults.MAILLOG_FILE
    # An inet: milter socket lets any local user connect to the milter and pose as Postfix,
    # with a forged {auth_authen} (any tenant's submission login). Refused unless set.
    milter_socket_allow_inet: bool = False
    milter_socket: str = defaults.MILTER_SOCKET
    milter_socket_group: str = defaults.MILTER_SOCKET_GROUP
    milter_socket_mode: int = defaults.MILTER_SOCKET_MODE
    # Worker processes serving the milter socket (relayctl milter --workers overrides it).
    # None: one per CPU the milter may run on.
    milter_workers: int | None = Field(None, ge=1, le=256)
    milter_connect_timeout: str = defaults.MILTER_CONNECT_TIMEOUT
    milter_command_timeout: str = defaults.MILTER_COMMAND_TIMEOUT
    milter_content_timeout: str = defaults.MILTER_CONTENT_TIMEOUT
    maximal_queue_lifetime: str = defaults.MAXIMAL_QUEUE_LIFETIME
    message_size_limit: int = Field(defaults.MESSAGE_SIZE_LIMIT, ge=1024)
    # Hop signatures (tenant's d= and s=) examined per message; more get 550 5.7.21.
    max_hop_signatures: int = Field(defaults.MAX_HOP_SIGNATURES, ge=1, le=1000)
    # AUTH commands one client may send per anvil_rate_time_unit (60 s); 0 disables the limit.
    # Clients in mynetworks (loopback) are exempt (smtpd_client_event_limit_exceptions).
    smtpd_client_auth_rate_limit: int = Field(defaults.SMTPD_CLIENT_AUTH_RATE_LIMIT, ge=0)
    # Local users besides root allowed to list the queue (postqueue -p/-j), e.g. the
    # tracker's service account for its queue metrics. Flushing stays root-only.
    queue_readers: tuple[str, ...] = ()
    dns: DnsSettings = DnsSettings()
    tracking: TrackingSettings = TrackingSettings()
    reputation: ReputationSettings = ReputationSettings()
    # Opens and clicks (relayctl web, the milter's link tokens): see EngagementSettings.
    engagement: EngagementSettings = EngagementSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Postfix's notices to the operator (postmaster mail, double bounces): see Notify.
    notify: Notify | None = None
    # Extra main.cf parameters, appended last. `relayctl check` refuses names Postfix does not
    # know (postconf -d) and any parameter the relay sets itself (relay-critical).
    postfix_extra: Annotated[dict[str, str], BeforeValidator(_extra)] = {}

    @field_validator("authserv_id")
    @classmethod
    def _authserv(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[!#$%&'*+\-.0-9A-Za-z^_`{|}~]{1,255}$", v):
            raise ValueError("not an RFC 8601 authserv-id (a domain name, or a token without spaces or ()<>@,;:\\\"/[]?=)")
        return v

    @field_validator("milter_socket")
    @classmethod
    def _socket(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith("unix:") and v[5:].startswith("/"):
            return v
        if not (re.match(r"^inet6?:[^:]+:\d+$", v) or re.match(r"^inet6?:\[[0-9a-fA-F:]+\]:\d+$", v)):
            raise ValueError("use unix:/absolute/path or inet:host:port")
        if not info.data.get("milter_socket_allow_inet"):
            raise ValueError(
                "an inet: socket lets any local user connect to the milter, pose as Postfix and "
                "forge a submission login; use unix:/path, or set milter_socket_allow_inet: true"
            )
        return v

    @field_validator("queue_readers")
    @classmethod
    def _queue_readers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for user in v:
            if not re.match(r"^[a-z_][a-z0-9_.-]{0,31}$", user):
                raise ValueError(f"not a local user name: {user!r}")
        return v

    @field_validator("maximal_queue_lifetime", "milter_connect_timeout", "milter_command_timeout", "milter_content_timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        if not re.match(r"^\d+[smhdw]?$", v):
            raise ValueError(f"not a Postfix time value (e.g. 30s, 48h, 5d): {v!r}")
        return v

    @field_validator("smtpd_listen", "submission_listen")
    @classmethod
    def _listen(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not re.match(r"^([0-9a-zA-Z.\-]+:|\[[0-9a-fA-F:]+\]:)?\d+$", item):
                raise ValueError(f"not a master.cf inet service name ([host:]port): {item!r}")
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.submission_listen and self.tls_cert_file is None:
            raise ValueError("submission_listen needs tls_cert_file and tls_key_file (AUTH only under STARTTLS)")
        clash = set(self.submission_listen) & set(self.smtpd_listen)
        if clash:
            raise ValueError(f"listener(s) {', '.join(sorted(clash))} in both smtpd_listen and submission_listen")
        return self

    @property
    def node(self) -> str:
        return self.tracking.node or self.myhostname

    @property
    def sasldb(self) -> Path:
        return self.sasl_database or self.config_directory / "sasl" / "sasldb2"

    @property
    def authserv(self) -> str:
        return self.authserv_id or self.myhostname

    def libmilter_socket(self) -> str:
        """libmilter spells inet sockets port@host; Postfix spells them host:port."""
        s = self.milter_socket
        if s.startswith("unix:"):
            return s
        family, _, rest = s.partition(":")
        host, _, port = rest.rpartition(":")
        return f"{family}:{port}@{host.strip('[]')}"


@dataclass(frozen=True)
class TenantSet:
    """All tenants, indexed the ways the milter looks them up."""

    tenants: tuple[Tenant, ...]
    sources: dict[str, Path]
    # tenant id -> SHA-256 of the file it was read from (load_tenants): recorded in the
    # applied set, so the next apply re-parses only files that changed.
    digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_relay", {t.relay_domain: t for t in self.tenants})
        object.__setattr__(self, "_by_id", {t.id: t for t in self.tenants})
        object.__setattr__(self, "_by_user", {u: t for t in self.tenants for u in t.submission_users})
        object.__setattr__(self, "_by_bounce", {t.bounce_tracking.domain: t for t in self.tenants if t.bounce_tracking})

    def by_relay_domain(self, domain: str) -> Tenant | None:
        return self._by_relay.get(domain.lower().rstrip("."))  # type: ignore[attr-defined]

    def by_id(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)  # type: ignore[attr-defined]

    def by_bounce_domain(self, domain: str) -> Tenant | None:
        """The tenant whose bounce_tracking.domain this is (issue 15 A)."""
        return self._by_bounce.get(domain.lower().rstrip("."))  # type: ignore[attr-defined]

    @property
    def bounce_domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_bounce))  # type: ignore[attr-defined]

    def by_submission_user(self, user: str) -> Tenant | None:
        return self._by_user.get(user)  # type: ignore[attr-defined]

    def __iter__(self):
        return iter(self.tenants)

    def __len__(self) -> int:
        return len(self.tenants)


def _format_validation(path: Path, tenant: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(tenant)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{path}: tenant {tenant}: field {field}: {msg}")
    return "\n".join(lines)


def _documents(path: Path) -> list[Any]:
    data = load_yaml(path, "tenant file")
    if data is None:
        return []
    if isinstance(data, dict) and set(data) == {"tenants"}:
        data = data["tenants"]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise ConfigError(f"{path}: expected a tenant mapping or a list of tenants, got {type(data).__name__}")


def tenant_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: tenant directory does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _file_tenants(path: Path, reuse: dict[str, tuple[str, list]] | None = None) -> tuple[list[Tenant], list[str], str | None]:
    """The tenants one file defines, validated alone, the errors (file, tenant, field) and
    the file's SHA-256. ``reuse``: source path -> (SHA-256, tenant documents) from the
    applied set: a file whose content did not change is not parsed again (YAML parsing was
    most of apply's time with 10,000 tenant files); its documents are validated again."""
    digest = None
    docs: list[Any] | None = None
    if reuse is not None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            digest = None
        known = reuse.get(str(path))
        if digest is not None and known is not None and known[0] == digest:
            docs = known[1]
    if docs is None:
        try:
            docs = _documents(path)
        except ConfigError as exc:
            return [], [str(exc)], digest
    tenants: list[Tenant] = []
    errors: list[str] = []
    for n, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            errors.append(f"{path}: entry {n}: expected a mapping, got {type(doc).__name__}")
            continue
        try:
            tenants.append(Tenant.model_validate(doc))
        except ValidationError as exc:
            errors.append(_format_validation(path, str(doc.get("id", f"#{n}")), exc))
    return tenants, errors, digest


def _applied_documents(path: Path | None) -> dict[str, tuple[str, list]] | None:
    """source path -> (file SHA-256, its tenants as applied), from an applied set that
    recorded the digests; None when there is none."""
    import json

    if path is None:
        return None
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["tenants"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found: dict[str, tuple[str, list]] = {}
    mixed: set[str] = set()
    for e in entries:
        if not isinstance(e, dict) or not e.get("sha256") or not isinstance(e.get("tenant"), dict):
            continue
        source, digest = str(e.get("source", "")), e["sha256"]
        if source in found and found[source][0] != digest:
            mixed.add(source)
        found.setdefault(source, (digest, []))[1].append(e["tenant"])
    return {k: v for k, v in found.items() if k not in mixed}


def check_tenant_files(paths: list[Path]) -> tuple[list[Tenant], list[str]]:
    """Validate some tenant files each on its own (no cross-checks between tenants: apply
    does those): the milter's quick look at files edited since the last apply."""
    tenants: list[Tenant] = []
    errors: list[str] = []
    for path in paths:
        found, problems, _ = _file_tenants(path)
        tenants += found
        errors += problems
    return tenants, errors


def load_tenants(directory: Path | str, applied: Path | None = None) -> TenantSet:
    """Load and cross-check every tenant file in a directory. Raises ConfigError.

    ``applied``: the applied set; files whose SHA-256 it records unchanged are not parsed
    again (their tenants are validated again, and cross-checked with all the others)."""
    directory = Path(directory)
    errors: list[str] = []
    tenants: list[Tenant] = []
    sources: dict[str, Path] = {}
    digests: dict[str, str] = {}
    reuse = _applied_documents(applied)
    if applied is not None and reuse is None:
        reuse = {}  # no usable applied set: parse everything, record the digests
    for path in tenant_files(directory):
        found, problems, digest = _file_tenants(path, reuse)
        errors += problems
        for tenant in found:
            if digest:
                digests[tenant.id] = digest
            if tenant.id in sources:
                errors.append(f"{path}: tenant {tenant.id}: field id: duplicate, already defined in {sources[tenant.id]}")
                continue
            tenants.append(tenant)
            sources[tenant.id] = path
    errors.extend(_cross_check(tenants, sources))
    if errors:
        raise ConfigError("\n".join(errors))
    if not tenants:
        raise ConfigError(f"{directory}: no tenants defined (*.yaml)")
    return TenantSet(tuple(tenants), sources, digests)


def _cross_check(tenants: list[Tenant], sources: dict[str, Path]) -> list[str]:
    """Uniqueness that keeps tenants apart: one relay domain, one hop identity and
    one sender domain belong to exactly one tenant."""
    errors = []
    seen: dict[tuple[str, str], str] = {}
    all_relay = {t.relay_domain for t in tenants}

    def claim(kind: str, value: str, tenant: Tenant, field: str) -> None:
        owner = seen.setdefault((kind, value), tenant.id)
        if owner != tenant.id:
            errors.append(
                f"{sources[tenant.id]}: tenant {tenant.id}: field {field}: {value} is already used by tenant {owner}"
            )

    for t in tenants:
        claim("relay", t.relay_domain, t, "relay_domain")
        claim("signing", t.signing_domain, t, "signing_domain")
        for u in t.submission_users:
            claim("user", u, t, "submission_users")
        for d in t.bounce_domains:
            claim("sender", d, t, "allowed_sender_domains")
            if d in all_relay:
                errors.append(f"{sources[t.id]}: tenant {t.id}: field allowed_sender_domains: {d} is a relay domain")
    # Bounce domains (issue 15 A): each belongs to one tenant and is no other tenant's relay,
    # signing or sender domain (mail to it is taken as a report, never relayed).
    taken = {d: ("relay", t.id) for t in tenants for d in (t.relay_domain,)}
    taken |= {t.signing_domain: ("signing", t.id) for t in tenants}
    taken |= {d: ("sender", t.id) for t in tenants for d in t.bounce_domains}
    for t in tenants:
        if t.bounce_tracking is None:
            continue
        d = t.bounce_tracking.domain
        claim("bounce", d, t, "bounce_tracking.domain")
        kind, owner = taken.get(d, (None, None))
        if owner is not None and owner != t.id:
            errors.append(
                f"{sources[t.id]}: tenant {t.id}: field bounce_tracking.domain: {d} is the {kind} domain of tenant {owner}"
            )
    return errors


class TenantSecrets(_Strict):
    """One tenant's entry in the secrets file."""

    smarthost_password: str | None = None
    # HMAC-SHA256 key for the tenant's webhook signatures (X-Relay-Signature).
    webhook_secret: str | None = Field(None, min_length=16)

    @field_validator("smarthost_password", "webhook_secret")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "\r\n\0")):
            raise ValueError("must be a non-empty single line")
        return v


def check_secret_file(path: Path) -> None:
    """A secrets file must belong to root (or to the identity reading it, e.g. a service
    account given the file by systemd's LoadCredential=) and have no group or other
    permission bits. Raises ConfigError."""
    st = path.stat()
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        raise ConfigError(
            f"{path}: owned by uid {st.st_uid}: secrets must belong to root (chown root:root; chmod 0600)"
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: mode {st.st_mode & 0o777:04o}: secrets must not be readable by others (chmod 0600)"
        )


def load_secrets(path: Path, tenants: TenantSet, *, webhooks_only: bool = False) -> dict[str, TenantSecrets]:
    """Read the root-only secrets file. Only needed when a tenant uses one, so a
    missing file is an error only then. ``webhooks_only``: the tracker's own file,
    which holds the webhook secrets and no smarthost password."""
    needs = [t for t in tenants if (t.smarthost.auth and not webhooks_only) or t.webhook]
    if not path.exists():
        if needs:
            raise ConfigError(
                f"{path}: missing; tenant {needs[0].id}: field "
                + ("smarthost.auth needs its smarthost_password there" if needs[0].smarthost.auth and not webhooks_only else "webhook needs its webhook_secret there")
            )
        return {}
    check_secret_file(path)
    data = load_yaml(path, "secrets file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of tenant id -> secrets")
    errors: list[str] = []
    out: dict[str, TenantSecrets] = {}
    invalid: set[str] = set()
    for tid, entry in data.items():
        if tenants.by_id(str(tid)) is None:
            errors.append(f"{path}: tenant {tid}: no such tenant")
            continue
        try:
            out[str(tid)] = TenantSecrets.model_validate(entry or {})
        except ValidationError as exc:
            invalid.add(str(tid))
            # Never echo a secret value back: name the field only.
            errors += [
                f"{path}: tenant {tid}: field {'.'.join(map(str, e['loc'])) or '(entry)'}: "
                f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors(include_input=False)
            ]
    for t in needs:
        if t.id in invalid:
            continue
        if t.smarthost.auth and not webhooks_only and not (t.id in out and out[t.id].smarthost_password):
            errors.append(f"{path}: tenant {t.id}: field smarthost_password: required by the tenant's smarthost.auth")
        if t.webhook and not (t.id in out and out[t.id].webhook_secret):
            errors.append(f"{path}: tenant {t.id}: field webhook_secret: required by the tenant's webhook")
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def load_settings(path: Path | str | None) -> Settings:
    if path is None:
        return Settings()
    path = Path(path)
    data = load_yaml(path, "settings") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(
                f"{path}: settings: field {'.'.join(map(str, e['loc']))}: "
                f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()
            )
        ) from None


# -- the applied tenant set ----------------------------------------------------------------
#
# Tenant changes take effect in two phases: an operator edits the tenant files, then
# `relayctl apply` checks everything and, only if every check passed, writes this snapshot
# next to the Postfix configuration it installs. The milter serves the snapshot, never the
# files being edited, and the operator commands fall back to it when a tenant file is broken.

APPLIED_TENANTS = "relay/tenants.applied.json"


def applied_tenants_path(settings: "Settings") -> Path:
    return settings.config_directory / APPLIED_TENANTS


def dump_tenant_set(tenants: TenantSet) -> str:
    """The checked tenant set as stable JSON (same set, same text: apply stays idempotent)."""
    import json

    entries = [
        {"source": str(tenants.sources.get(t.id, "")), "tenant": t.model_dump(mode="json")}
        | ({"sha256": tenants.digests[t.id]} if t.id in tenants.digests else {})
        for t in sorted(tenants, key=lambda t: t.id)
    ]
    # One tenant per line, each in json's C encoder (indent= would use the pure-Python one,
    # seconds at 10,000 tenants): still one line of diff per changed tenant.
    lines = ",\n".join(json.dumps(e, sort_keys=True) for e in entries)
    return '{"format": 1, "tenants": [\n' + lines + ("\n" if lines else "") + "]}\n"


def changed_since_applied(tenants: TenantSet, path: Path) -> set[str] | None:
    """Ids of the tenants that are new or differ from the applied set at ``path`` (None:
    there is no readable applied set, so every tenant counts as changed)."""
    import json

    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["tenants"]
        applied = {e["tenant"]["id"]: json.dumps(e["tenant"], sort_keys=True) for e in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {t.id for t in tenants if applied.get(t.id) != json.dumps(t.model_dump(mode="json"), sort_keys=True)}


def _applied_lines(text: str) -> list[str] | None:
    """The entry lines of an applied set in dump_tenant_set's layout (one tenant per line),
    or None when the text is not laid out so (the caller parses it whole)."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) < 2 or lines[0] != '{"format": 1, "tenants": [' or lines[-1] != "]}":
        return None
    return [line.removesuffix(",") for line in lines[1:-1]]


def load_applied_tenants(path: Path, cache: dict[str, tuple["Tenant", str]] | None = None) -> TenantSet:
    """Read a snapshot written by ``dump_tenant_set``; ConfigError names the file.

    ``cache`` (the milter's reloader keeps one): the text of an entry's line -> the Tenant
    validated from it last time and its source. Lines that did not change are neither
    parsed nor validated again, so a reload after adding one tenant to 10,000 validates one
    (Tenant is frozen); the cache is refilled with this set's lines only."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
        lines = _applied_lines(text) if cache is not None else None
        if lines is not None and len(set(lines)) != len(lines):
            lines = None  # the same entry twice: parsed whole, as without a cache
        if lines is None:
            entries = json.loads(text)["tenants"]
            tenants = tuple(Tenant.model_validate(e["tenant"]) for e in entries)
            sources = {t.id: Path(e["source"]) for t, e in zip(tenants, entries)}
        else:
            fresh: dict[str, tuple[Tenant, str]] = {}
            for line in lines:
                if line not in cache:
                    e = json.loads(line)
                    cache[line] = (Tenant.model_validate(e["tenant"]), str(e["source"]))
                fresh[line] = cache[line]
            cache.clear()
            cache.update(fresh)
            tenants = tuple(t for t, _ in fresh.values())
            sources = {t.id: Path(src) for t, src in fresh.values()}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no applied tenant set (run `relayctl apply`)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable applied tenant set: {exc}") from None
    if not tenants:
        raise ConfigError(f"{path}: the applied tenant set is empty")
    return TenantSet(tenants, sources)
