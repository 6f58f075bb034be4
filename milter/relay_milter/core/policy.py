"""The decision core: facts + tenant -> verdict (and, at end of message, the edits).

No pymilter here. The adapter collects facts from the MTA, calls these
functions and carries out what they return; tests call them directly.
"""

from __future__ import annotations

import email.utils
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from relay_milter import defaults
from relay_milter.core import authresults, bounces, headerchecks, limits, route
from relay_milter.core.addresses import (
    AddressError,
    Decoded,
    decode_recipient,
    plain_recipient,
    rewrite_address_header,
    strip_brackets,
)
from relay_milter.config import Settings, Tenant, TenantSet
from relay_milter.core.dkimverify import DkimResult, KeyResolver, verify_hop_signature
from relay_milter.core.quota import IngressGate


# Python 3.11.4+ parses addresses strictly (CVE-2023-27043) when asked to.
_GETADDRESSES_STRICT = "strict" in inspect.signature(email.utils.getaddresses).parameters


class Action(Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Verdict:
    action: Action
    code: str = ""
    dsn: str = ""
    reason: str = ""

    @classmethod
    def reject(cls, code: str, dsn: str, reason: str) -> "Verdict":
        return cls(Action.REJECT, code, dsn, reason)

    @classmethod
    def tempfail(cls, code: str, dsn: str, reason: str) -> "Verdict":
        return cls(Action.TEMPFAIL, code, dsn, reason)

    @property
    def ok(self) -> bool:
        return self.action in (Action.CONTINUE, Action.ACCEPT)

    def __str__(self) -> str:
        if self.ok:
            return self.action.value
        return f"{self.code} {self.dsn} {self.reason}"


CONTINUE = Verdict(Action.CONTINUE)


@dataclass
class Transaction:
    """Facts about one SMTP transaction, as the adapter learned them."""

    client_ip: str | None = None
    client_name: str = ""
    helo: str = ""
    # SASL login name ({auth_authen}); set only on the submission listeners.
    auth_user: str | None = None
    # TLS protocol of the session ({tls_version}), None without STARTTLS.
    tls_version: str | None = None
    queue_id: str | None = None
    mail_from: str | None = None  # envelope sender without brackets; "" is the null sender
    recipients: list[tuple[str, Decoded]] = field(default_factory=list)
    tenant: Tenant | None = None
    # Bounce tracking (issue 15 A): recipients that are VERP return paths of ``tenant``.
    bounce_tokens: list[tuple[str, bounces.Token]] = field(default_factory=list)


class EditOp(Enum):
    """What a :class:`HeaderEdit` does to the header block."""

    DELETE = "delete"
    CHANGE = "change"
    INSERT = "insert"
    ADD = "add"


@dataclass(frozen=True)
class HeaderEdit:
    """One change to the header block.

    DELETE/CHANGE: ``index`` is the 1-based occurrence among fields with
    this name (smfi_chgheader). INSERT: ``index`` is the 0-based position
    from the top (smfi_insheader). ADD: appended at the end.
    """

    op: EditOp
    name: str
    value: str = ""
    index: int = 0


@dataclass(frozen=True)
class Disposition:
    verdict: Verdict
    tenant: Tenant | None = None
    header_edits: tuple[HeaderEdit, ...] = ()
    # (recipient as given in RCPT TO, new recipient) pairs: delrcpt old, addrcpt new.
    recipient_changes: tuple[tuple[str, str], ...] = ()
    new_sender: str | None = None
    dkim: DkimResult | None = None
    header_from: str = ""
    message_id: str = ""
    # Bounce tracking (issue 15 A): a report to a VERP return path. ``reports``: (token, report)
    # pairs to log for the tracker; ``bounce_discard``: nothing to forward, discard once logged.
    reports: tuple[tuple[bounces.Token, bounces.Report], ...] = ()
    report_kind: str = ""
    bounce_discard: bool = False
    dropped_reports: int = 0


@dataclass(frozen=True)
class Message:
    """The message as the MTA handed it over: header fields in order, and the body.

    Header values are exactly what followed the colon on the wire (including
    the leading space and any folding).
    """

    headers: tuple[tuple[str, str], ...]
    body: bytes

    def values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def raw(self) -> bytes:
        """Canonical wire form (CRLF) for DKIM verification."""
        out = bytearray()
        for name, value in self.headers:
            line = f"{name}:{value}".encode("utf-8", "surrogateescape")
            out += re.sub(rb"\r?\n", b"\r\n", line) + b"\r\n"
        out += b"\r\n"
        body = self.body
        if body.count(b"\n") != body.count(b"\r\n"):  # Postfix sends CRLF; skip the regex then
            body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
        return b"".join((out, body))  # one copy of the body (a large one is most of the message)


class Policy:
    """Stateless across transactions; safe to share between milter threads."""

    def __init__(self, tenants: TenantSet, settings: Settings, keys: KeyResolver | None = None, gate: IngressGate | None = None):
        self.tenants = tenants
        self.settings = settings
        self.keys = keys or KeyResolver(settings.dns)
        # Ingress limits and backpressure (core/quota.py); shared across reloads by the reloader.
        self.gate = gate or IngressGate()
        self._relay_domains = frozenset(t.relay_domain for t in tenants)
        self._signing_domains = frozenset(t.signing_domain for t in tenants)


    def _below_relay_domain(self, domain: str) -> bool:
        """Whether ``domain`` is a subdomain of a relay domain: one set lookup per parent
        domain (a tuple of suffixes for endswith() cost a comparison per tenant)."""
        parts = domain.split(".")
        return any(".".join(parts[i:]) in self._relay_domains for i in range(1, len(parts)))
    def current(self) -> "Policy":
        """A fixed policy is its own source (see reloader.ReloadingPolicy)."""
        return self

    # -- envelope -------------------------------------------------------------

    def on_mail(self, tx: Transaction, sender: str) -> Verdict:
        addr = strip_brackets(sender)
        if addr and (not re.match(r"^[\x21-\x7e]+$", addr) or addr.count("@") != 1):
            return Verdict.reject("553", "5.1.7", "malformed envelope sender")
        tx.mail_from = addr
        tx.recipients.clear()
        tx.bounce_tokens.clear()
        tx.tenant = None
        if tx.auth_user is None:
            return CONTINUE  # signed ingress: the tenant comes from the recipients
        # Authenticated submission: the login decides the tenant, for the whole transaction.
        tenant = self.tenants.by_submission_user(self._login_name(tx.auth_user))
        if tenant is None:
            return Verdict.reject("550", "5.7.1", f"user {tx.auth_user} is not a submission user of any tenant")
        if not tenant.client_allowed(tx.client_ip):
            return Verdict.reject("550", "5.7.1", f"client {tx.client_ip} is not allowed to submit for this tenant")
        if addr == "":
            return Verdict.reject("550", "5.7.1", "the null sender is not accepted by this relay")
        if not tenant.sender_allowed(addr):
            return Verdict.reject("550", "5.7.1", f"envelope sender {addr} is not allowed for user {tx.auth_user}")
        if refusal := self.gate.admit(tenant):
            return Verdict.tempfail(*refusal)
        tx.tenant = tenant
        return CONTINUE

    def on_rcpt(self, tx: Transaction, rcpt: str) -> Verdict:
        if tx.auth_user is not None:
            return self._submission_rcpt(tx, rcpt)
        bounce_tenant = self.tenants.by_bounce_domain(strip_brackets(rcpt).rpartition("@")[2])
        if bounce_tenant is not None or tx.bounce_tokens:
            return self._bounce_rcpt(tx, rcpt, bounce_tenant)
        try:
            decoded = decode_recipient(rcpt)
        except AddressError as exc:
            return Verdict.reject("550", "5.1.3", f"bad recipient address syntax: {exc.reason}")
        tenant = self.tenants.by_relay_domain(decoded.relay_domain)
        if tenant is None and self._below_relay_domain(decoded.relay_domain):
            # Postfix refuses these first (parent_domain_matches_subdomains has no relay_domains).
            return Verdict.reject("550", "5.1.2", f"{decoded.relay_domain} is not a relay domain (a relay domain covers no subdomains)")
        if tenant is None:
            # Postfix only lets relay domains through (reject_unauth_destination), so a
            # domain the milter does not know means the two configurations are out of
            # step for a moment (a tenant is being added): ask the client to retry.
            return Verdict.tempfail("451", "4.3.5", f"{decoded.relay_domain} is not configured on this relay yet")
        target_domain = decoded.address.rpartition("@")[2]
        if target_domain in self._relay_domains or self._below_relay_domain(target_domain):
            return Verdict.reject("550", "5.1.3", "encoded recipient points back at a relay domain")
        if tx.tenant is not None and tx.tenant.id != tenant.id:
            return Verdict.tempfail(
                "452", "4.5.3", "recipients of another tenant must be sent in a separate transaction"
            )
        if not tenant.client_allowed(tx.client_ip):
            return Verdict.reject("550", "5.7.1", f"client {tx.client_ip} is not allowed to relay for this tenant")
        if tenant.require_tls and not tx.tls_version:
            # RFC 3207's reply for a command that needs TLS first; permanent, like Postfix's own.
            return Verdict.reject("530", "5.7.0", "Must issue a STARTTLS command first (this tenant requires TLS)")
        if tx.mail_from is None:
            return Verdict.reject("503", "5.5.1", "MAIL FROM first")
        if tx.mail_from == "":
            return Verdict.reject("550", "5.7.1", "the null sender is not accepted by this relay")
        if not tenant.envelope_sender_allowed(tx.mail_from):
            return Verdict.reject("550", "5.7.1", f"envelope sender {tx.mail_from} is not allowed for this tenant")
        if refusal := (self.gate.admit(tenant) if tx.tenant is None else None) or self.gate.recipients(tenant, len(tx.recipients)):
            return Verdict.tempfail(*refusal)
        tx.tenant = tenant
        tx.recipients.append((rcpt, decoded))
        return CONTINUE

    # -- bounce tracking (issue 15 A) ------------------------------------------------

    def _bounce_rcpt(self, tx: Transaction, rcpt: str, tenant: Tenant | None) -> Verdict:
        """A recipient under a bounce domain: only a return path this relay made (HMAC), never
        mixed with relay recipients or another tenant's reports; no DKIM, no sender rules."""
        if tenant is None or (tx.tenant is not None and tx.tenant.id != tenant.id):
            return Verdict.tempfail("452", "4.5.3", "recipients of another kind or tenant must be sent in a separate transaction")
        if tx.recipients:
            return Verdict.tempfail("452", "4.5.3", "bounce reports must be sent in a separate transaction")
        addr = strip_brackets(rcpt)
        local, _, domain = addr.rpartition("@")
        keys = bounces.load_keys(self.settings.config_directory)
        if not keys:
            return Verdict.tempfail("451", "4.3.0", "bounce tracking key missing on this relay (run relayctl apply), try again later")
        token = bounces.verify(local, domain, tenant.id, keys)
        if token is None:
            return Verdict.reject("550", "5.1.1", f"<{addr}>: no such bounce address")
        tx.tenant = tenant
        tx.bounce_tokens.append((rcpt, token))
        return CONTINUE

    def _bounce_eom(self, tx: Transaction, msg: Message) -> Disposition:
        tenant = tx.tenant
        assert tenant is not None and tenant.bounce_tracking is not None
        if refusal := limits.check_message(msg.headers, msg.body):
            return Disposition(Verdict.reject(*refusal), tenant)
        raw = b"".join(f"{n}:{v}\r\n".encode("utf-8", "surrogateescape") for n, v in msg.headers) + b"\r\n" + msg.body
        parsed = bounces.parse_report(raw)
        pairs: list[tuple[bounces.Token, bounces.Report]] = []
        dropped = 0
        for report in parsed.reports:
            # A recipient-bound token counts only for its recipient; an unnamed recipient
            # (an ARF report without Original-Rcpt-To) is the token's one recipient.
            token = next(
                (t for _, t in tx.bounce_tokens if report.recipient is None or t.names(tenant.id, report.recipient)),
                None,
            )
            if token is None:
                dropped += 1
            else:
                pairs.append((token, report))
        forward = tenant.bounce_tracking.forward_to
        edits: tuple[HeaderEdit, ...] = ()
        changes: tuple[tuple[str, str], ...] = ()
        if forward:
            # A route marker or seal the sender wrote is removed, as on every relayed message.
            ours = {defaults.ROUTE_HEADER.lower(), defaults.ROUTE_SEAL_HEADER.lower()}
            seen: dict[str, int] = {}
            deletes = []
            for name, _ in msg.headers:
                n = seen[name.lower()] = seen.get(name.lower(), 0) + 1
                if name.lower() in ours:
                    deletes.append(HeaderEdit(EditOp.DELETE, name, index=n))
            edits = tuple(sorted(deletes, key=lambda e: (e.name.lower(), -e.index)))
            edits += (HeaderEdit(EditOp.ADD, defaults.ROUTE_HEADER, route.marker_value(tenant.id)),)  # exact-match table: no space
            changes = tuple((raw_rcpt, f"<{forward}>") for raw_rcpt, _ in tx.bounce_tokens[:1])
            changes += tuple((raw_rcpt, "") for raw_rcpt, _ in tx.bounce_tokens[1:])
        return Disposition(
            Verdict(Action.ACCEPT),
            tenant,
            header_edits=edits,
            recipient_changes=changes,
            message_id=(msg.values("message-id") or [""])[0].strip(),
            reports=tuple(pairs),
            report_kind=parsed.kind,
            bounce_discard=not forward,
            dropped_reports=dropped,
        )

    def verp_sender(self, tx: Transaction, tenant: Tenant) -> str | None:
        """The VERP return path of an accepted message of a tenant with bounce tracking, or
        None when the tenant has none. Raises LookupError without a key (the eom tempfails)."""
        if tenant.bounce_tracking is None or not tx.queue_id:
            return None
        keys = bounces.load_keys(self.settings.config_directory)
        if not keys:
            raise LookupError("bounce tracking key missing (run relayctl apply)")
        rcpts = [d.address for _, d in tx.recipients]
        return bounces.return_path(keys[0], tenant.id, tenant.bounce_tracking.domain, tx.queue_id, rcpts)

    # -- end bounce tracking --

    def _login_name(self, auth_user: str) -> str:
        """Cyrus reports "user@realm"; our users live in one realm, myhostname."""
        user, at, realm = auth_user.rpartition("@")
        if not at:
            return auth_user
        return user if realm.lower() == self.settings.myhostname else auth_user

    def _submission_rcpt(self, tx: Transaction, rcpt: str) -> Verdict:
        if tx.tenant is None:
            return Verdict.reject("503", "5.5.1", "MAIL FROM first")
        try:
            address = plain_recipient(rcpt)
        except AddressError as exc:
            return Verdict.reject("550", "5.1.3", f"bad recipient address syntax: {exc.reason}")
        domain = address.rpartition("@")[2]
        if domain in self._relay_domains or self._below_relay_domain(domain):
            # Encoded relay addresses belong to the signed ingress; here they could
            # only be an attempt to reach another tenant's route.
            return Verdict.reject("550", "5.7.1", "relay-domain recipients are not accepted on submission")
        if refusal := self.gate.recipients(tx.tenant, len(tx.recipients)):
            return Verdict.tempfail(*refusal)
        tx.recipients.append((rcpt, Decoded("", address)))
        return CONTINUE

    # -- content --------------------------------------------------------------

    def on_eom(self, tx: Transaction, msg: Message) -> Disposition:
        tenant = tx.tenant
        if tenant is not None and tx.bounce_tokens:
            return self._bounce_eom(tx, msg)
        if tenant is None or not tx.recipients:
            return Disposition(Verdict.tempfail("451", "4.3.0", "no accepted recipients in this transaction"))
        if refusal := limits.check_message(msg.headers, msg.body):
            return Disposition(Verdict.reject(*refusal), tenant)

        for name in defaults.SINGLETON_HEADERS:
            count = len(msg.values(name))
            if count > 1:
                return Disposition(
                    Verdict.reject("550", "5.6.0", f"message has {count} {name} header fields (at most one allowed)"),
                    tenant,
                )
        froms = msg.values("from")
        if not froms:
            return Disposition(Verdict.reject("550", "5.6.0", "message has no From header field"), tenant)
        author = _single_mailbox(froms[0])
        if author is None:
            return Disposition(
                Verdict.reject("550", "5.6.0", "From header field must hold exactly one valid mailbox"), tenant
            )
        message_id = (msg.values("message-id") or [""])[0].strip()
        if tx.auth_user is not None:
            return self._submission_eom(tx, tenant, msg, author, message_id)

        result = verify_hop_signature(
            msg.raw(),
            msg.values("dkim-signature"),
            tenant,
            self.keys,
            # Every tenant's signing domain (the tenant's own is skipped there): a set
            # difference here would copy all of them for every message.
            other_signing_domains=self._signing_domains,
            present=Counter(n.lower() for n, _ in msg.headers),
            max_candidates=self.settings.max_hop_signatures,
        )
        if not result.passed:
            if result.temporary:
                verdict = Verdict.tempfail("451", result.dsn, f"DKIM key lookup failed: {result.reason}")
            else:
                verdict = Verdict.reject("550", result.dsn, f"DKIM verification failed: {result.reason}")
            return Disposition(verdict, tenant, dkim=result, header_from=author, message_id=message_id)

        return self._accept(tx, tenant, msg, author, message_id, self.authentication_results(result), result)

    def _submission_eom(self, tx: Transaction, tenant: Tenant, msg: Message, author: str, message_id: str) -> Disposition:
        ar = authresults.header_value(self.settings.authserv, "auth", "pass", [("smtp.auth", tx.auth_user or "")])
        return self._accept(tx, tenant, msg, author, message_id, ar, None)

    def _accept(
        self, tx: Transaction, tenant: Tenant, msg: Message, author: str, message_id: str, auth_results: str, dkim: DkimResult | None
    ) -> Disposition:
        """The sender checks both ways in share, the recipient binding of signed
        ingress, then the transformation."""
        who = f"user {tx.auth_user}" if tx.auth_user else "this tenant"
        refusal = None
        if not tenant.sender_allowed(author):
            refusal = headerchecks.Refusal("550", "5.7.1", f"From address {author} is not allowed for {who}")
        refusal = refusal or headerchecks.sender_fields(msg.headers, tenant, who)
        if dkim is not None and refusal is None:
            recipients = [d.address for _, d in tx.recipients]
            refusal = headerchecks.recipient_binding(msg.headers, recipients, dkim.signed_headers, tenant)
        if refusal:
            return Disposition(
                Verdict.reject(*refusal), tenant, dkim=dkim, header_from=author, message_id=message_id
            )
        try:
            verp = self.verp_sender(tx, tenant)
        except LookupError as exc:
            return Disposition(Verdict.tempfail("451", "4.3.0", f"{exc}, try again later"), tenant, header_from=author, message_id=message_id)
        self.gate.accepted(tenant)  # counted once the message is ours
        return Disposition(
            Verdict(Action.ACCEPT),
            tenant,
            header_edits=tuple(self._header_edits(tenant, msg, auth_results)),
            # Encoded recipients are replaced by the decoded ones; submission recipients stay.
            recipient_changes=tuple((raw, f"<{d.address}>") for raw, d in tx.recipients if d.relay_domain),
            new_sender=f"<{verp}>" if verp else (f"<{tenant.headers.envelope_sender}>" if tenant.headers.envelope_sender else None),
            dkim=dkim,
            header_from=author,
            message_id=message_id,
        )

    def _header_edits(self, tenant: Tenant, msg: Message, auth_results: str):
        strip = {h.lower() for h in tenant.headers.strip} | {defaults.ROUTE_HEADER.lower(), defaults.ROUTE_SEAL_HEADER.lower()}
        occurrence: dict[str, int] = {}
        deletes: list[HeaderEdit] = []
        changes: list[HeaderEdit] = []
        have_reply_to = False
        for name, value in msg.headers:
            lname = name.lower()
            n = occurrence[lname] = occurrence.get(lname, 0) + 1
            if lname in strip:
                deletes.append(HeaderEdit(EditOp.DELETE, name, index=n))
            elif lname == "dkim-signature" and _signature_domain(value) == tenant.signing_domain:
                deletes.append(HeaderEdit(EditOp.DELETE, name, index=n))
            elif lname == "authentication-results" and authresults.claims(value, self.settings.authserv):
                # RFC 8601 section 5: remove forged results claiming to be ours.
                deletes.append(HeaderEdit(EditOp.DELETE, name, index=n))
            elif lname == "reply-to" and tenant.headers.reply_to:
                have_reply_to = True
                changes.append(HeaderEdit(EditOp.CHANGE, name, f" {tenant.headers.reply_to}", index=n))
            elif lname in ("to", "cc"):
                new = rewrite_address_header(value, tenant.relay_domain)
                if new is not None:
                    changes.append(HeaderEdit(EditOp.CHANGE, name, f" {new}", index=n))
        # Delete from the bottom up so earlier indexes stay valid whatever the MTA does.
        yield from sorted(deletes, key=lambda e: (e.name.lower(), -e.index))
        yield from changes
        if tenant.headers.reply_to and not have_reply_to:
            yield HeaderEdit(EditOp.ADD, "Reply-To", f" {tenant.headers.reply_to}")
        yield HeaderEdit(EditOp.INSERT, "Authentication-Results", " " + auth_results, index=0)
        # No space after the colon: the route table is exact-match (core/route.py).
        yield HeaderEdit(EditOp.ADD, defaults.ROUTE_HEADER, route.marker_value(tenant.id))

    def authentication_results(self, result: DkimResult) -> str:
        """Our Authentication-Results value. i= (and every other copied value) is
        attacker text: authresults emits it only as a valid, quoted-if-needed pvalue."""
        res = "pass" if result.passed else ("temperror" if result.temporary else "fail")
        props = [
            ("header.d", result.domain),
            ("header.i", result.identity),
            ("header.a", result.algorithm),
            ("header.s", result.selector),
            ("header.b", result.b_prefix),
        ]
        if not result.passed:
            props.insert(0, ("reason", result.reason))
        return authresults.header_value(self.settings.authserv, "dkim", res, [(n, v) for n, v in props if v])


def _single_mailbox(value: str) -> str | None:
    flat = re.sub(r"\r?\n[ \t]*", " ", value)
    if any(ord(c) < 32 and c != "\t" for c in flat):
        return None
    pairs = email.utils.getaddresses([flat], strict=True) if _GETADDRESSES_STRICT else email.utils.getaddresses([flat])
    if len(pairs) != 1:
        return None
    addr = pairs[0][1]
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not re.match(r"^[a-z0-9.-]+\.[a-z0-9-]+$", domain.lower()):
        return None
    return f"{local}@{domain.lower()}"


def _signature_domain(value: str) -> str:
    m = re.search(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", value)
    return m.group(1).lower().rstrip(".") if m else ""

