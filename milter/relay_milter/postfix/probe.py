"""`relayctl check --probe`: talk to a tenant's smarthost the way Postfix will.

Connects to ``smarthost.host:port``, reads the banner, says EHLO, and reports whether
STARTTLS is offered; under the tenant's TLS policy it then starts TLS and verifies the
certificate the way the tenant transport does (``verify``: against ``ca_file`` or the
system CAs, for the name ``tls_match`` or ``host``; ``encrypt``/``may``: the result is
reported, not required), and reports the AUTH mechanisms offered (required when the tenant
logs in; with the password at hand the login itself is tried). Nothing is sent: the probe
ends with QUIT before MAIL FROM.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from dataclasses import dataclass, field

from relay_milter.config import DnsSettings, Tenant
from relay_milter.postfix.preflight import lookup_addresses


@dataclass
class ProbeResult:
    tenant: str
    target: str
    findings: list[tuple[str, str]] = field(default_factory=list)  # (ok|warning|error, text)

    @property
    def ok(self) -> bool:
        return not any(level == "error" for level, _ in self.findings)

    def add(self, level: str, text: str) -> None:
        self.findings.append((level, text))

    def to_json(self) -> dict:
        return {"tenant": self.tenant, "target": self.target, "ok": self.ok,
                "findings": [{"level": lv, "text": tx} for lv, tx in self.findings]}


def _context(t: Tenant) -> tuple[ssl.SSLContext, str]:
    """The context that verifies as the tenant's policy would, and the name to verify."""
    sh = t.smarthost
    ctx = ssl.create_default_context(cafile=str(sh.ca_file) if sh.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx, sh.tls_match or sh.host


def probe(
    t: Tenant,
    password: str | None = None,
    timeout: float = 10.0,
    helo: str = "relay.localdomain",
    dns: DnsSettings | None = None,
) -> ProbeResult:
    """``dns``: the resolver for the smarthost's name (settings ``dns``; default: /etc/resolv.conf)."""
    sh = t.smarthost
    res = ProbeResult(t.id, f"{sh.host}:{sh.port}")
    need_tls = sh.tls in ("encrypt", "verify")
    addresses, why = lookup_addresses(sh.host, dns or DnsSettings())
    if not addresses:
        res.add("error", f"cannot connect to {sh.host}:{sh.port}: {why} (mail for {t.id} waits deferred)")
        return res
    try:
        smtp = smtplib.SMTP(timeout=timeout, local_hostname=helo)
        code, banner = smtp.connect(addresses[0], sh.port)  # the name is kept for TLS below
    except (OSError, smtplib.SMTPException) as exc:
        res.add("error", f"cannot connect to {sh.host}:{sh.port}: {exc} (mail for {t.id} waits deferred)")
        return res
    try:
        text = banner.decode(errors="replace")
        if code != 220:
            res.add("error", f"banner {code} {text} (not ready to accept mail)")
            return res
        res.add("ok", f"banner: {code} {text}")
        code, _ = smtp.ehlo()
        if code != 250:
            res.add("error", f"EHLO answered {code}")
            return res
        starttls = smtp.has_extn("starttls")
        if not starttls:
            res.add("error" if need_tls else ("warning" if sh.tls == "may" else "ok"),
                    f"STARTTLS not offered (tls: {sh.tls}{': mail would wait deferred' if need_tls else ''})")
        elif sh.tls == "none":
            res.add("ok", "STARTTLS offered (not used: tls: none)")
        else:
            ctx, name = _context(t)
            try:
                smtp._host = name  # the name smtplib gives the TLS layer (SNI and hostname check)
                smtp.starttls(context=ctx)
                res.add("ok", f"STARTTLS: {smtp.sock.version()} {smtp.sock.cipher()[0]}; certificate verified for {name}")
            except ssl.SSLCertVerificationError as exc:
                level = "error" if sh.tls == "verify" else "warning"
                res.add(level, f"STARTTLS: certificate does not verify for {name}: {exc.verify_message}"
                        + (" (tls: verify: mail would wait deferred)" if level == "error" else f" (accepted under tls: {sh.tls})"))
                return res  # the connection is gone after a failed handshake
            except (ssl.SSLError, smtplib.SMTPException, OSError) as exc:
                res.add("error" if need_tls else "warning", f"STARTTLS failed: {exc}")
                return res
            smtp.ehlo()
        auth = smtp.esmtp_features.get("auth", "").split()
        if sh.auth is None:
            if auth:
                res.add("ok", f"AUTH offered ({' '.join(auth)}); not used by this tenant")
        elif not auth:
            res.add("error", "AUTH not offered, but the tenant logs in (smarthost.auth)")
        else:
            res.add("ok", f"AUTH offered: {' '.join(auth)}")
            if password is not None:
                try:
                    smtp.login(sh.auth.username, password)
                    res.add("ok", f"AUTH as {sh.auth.username}: accepted")
                except smtplib.SMTPAuthenticationError as exc:
                    res.add("error", f"AUTH as {sh.auth.username}: refused ({exc.smtp_code})")
                except smtplib.SMTPException as exc:
                    res.add("error", f"AUTH as {sh.auth.username}: {exc}")
    except (OSError, socket.timeout, smtplib.SMTPException) as exc:
        res.add("error", f"session failed: {exc}")
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()
    return res
