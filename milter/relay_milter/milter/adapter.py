"""The pymilter adapter: collects facts, asks the policy core, carries out the answer.

Nothing here decides anything. Any exception tempfails the transaction
(``milter.set_exception_policy(TEMPFAIL)`` plus our own guard at end of
message), and Postfix's ``milter_default_action = tempfail`` covers a milter
that is gone or too slow.

Round trips (issue 16): Postfix is told not to send DATA, end-of-headers and unknown
commands (``@Milter.nocallback``: nothing here needs them) and not to wait for a reply to
each header field (``@Milter.noreply``: a header never decides anything on its own). A
header that cannot be taken in is remembered and the message tempfails at end of message.
"""

from __future__ import annotations

import grp
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import Milter
import milter as _milter

from relay_milter import logs
from relay_milter import defaults
from relay_milter.core import engagement, route
from relay_milter.core.addresses import dsn_params, strip_brackets
from relay_milter.defaults import UPSTREAM_ID_HEADER
from relay_milter.core.policy import Action, Disposition, EditOp, HeaderEdit, Message, Policy, Transaction, Verdict

log = logging.getLogger("relay.milter")

FLAGS = (Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.ADDRCPT_PAR | Milter.DELRCPT | Milter.CHGFROM
         | Milter.CHGBODY)  # CHGBODY: engagement tracking replaces the body of tenants that opt in
# A body up to this size stays in memory; a larger one is spooled to a temporary file as it
# arrives (the milter's memory per transaction stays bounded while the body is received).
SPOOL_MEMORY = 1024 * 1024
# A stopping worker lets the transactions in progress finish for this long (systemd's
# TimeoutStopSec is 30 s); idle Postfix sessions are closed at once.
DRAIN_SECONDS = 20.0


def load_route_key(config_directory: Path) -> bytes | None:
    """The route-seal key `relayctl apply` installed (postfix.render, core.route)."""
    try:
        return route.parse_route_key((Path(config_directory) / defaults.ROUTE_KEY_FILE).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return None


def load_engagement_key(path: Path) -> bytes | None:
    """The engagement key (`relayctl web --create-key`), or None when missing or invalid."""
    try:
        return engagement.parse_key(Path(path).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return None


def _reply_text(text: str) -> str:
    """libmilter treats % specially and the reply must be one printable line."""
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return text.replace("%", "%%")[:400]


@Milter.header_leading_space
class RelayMilter(Milter.Base):
    # Set by serve() (or a test) before any connection: a Policy, or a
    # ReloadingPolicy; either way .current() gives the policy for a transaction.
    source: Policy
    # The route-seal key (core/route.py), the one `relayctl apply` rendered the requeue
    # table with. serve() loads it, or sets route_key_dir so that a key `relayctl apply`
    # creates later is picked up. Until then (and in tests) a key of this process: new mail
    # is routed as always, but if requeued it finds no route and waits on "unrouted"
    # (never another tenant's smarthost).
    route_key: bytes = os.urandom(32)
    route_key_dir: Path | None = None
    # Transactions in progress in this process (MAIL accepted, end of message not yet
    # answered): a stopping worker waits for them (drain()).
    _in_flight = 0
    _in_flight_lock = threading.Lock()
    _idle = threading.Condition(_in_flight_lock)
    # Engagement tracking (opt-in per tenant): the key of the link tokens (settings
    # engagement.key_file), read when first needed and again while it is missing.
    engagement_key: bytes | None = None

    def __init__(self) -> None:
        self.policy = self.source.current()
        self.tx = Transaction()
        self._in_tx = False
        self._headers: list[tuple[str, str]] = []
        self._new_body()
        self._rcpt_args: dict[str, tuple[str, ...]] = {}
        self._header_error: str | None = None

    def _new_body(self) -> None:
        self._body = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, prefix="relay-milter-body-")

    # -- helpers --------------------------------------------------------------

    def _macro(self, name: str) -> str | None:
        value = self.getsymval(name)
        return value or None

    def _answer(self, verdict: Verdict, stage: str, **fields) -> int:
        if verdict.ok:
            return Milter.CONTINUE
        logs.event(
            log,
            logging.WARNING,
            self.tx.queue_id,
            "reject" if verdict.action is Action.REJECT else "tempfail",
            stage=stage,
            code=verdict.code,
            dsn=verdict.dsn,
            reason=verdict.reason,
            client=self.tx.client_ip,
            tenant=self.tx.tenant.id if self.tx.tenant else None,
            **fields,
        )
        self.setreply(verdict.code, verdict.dsn, _reply_text(verdict.reason))
        return Milter.REJECT if verdict.action is Action.REJECT else Milter.TEMPFAIL

    # -- callbacks ------------------------------------------------------------

    def connect(self, hostname, family, hostaddr):
        ip = hostaddr[0] if isinstance(hostaddr, tuple) else None
        self.tx = Transaction(client_ip=ip, client_name=hostname or "")
        return Milter.CONTINUE

    def hello(self, heloname):
        self.tx.helo = heloname or ""
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.policy = self.source.current()  # one policy for the whole transaction
        self._headers = []
        self._header_error = None
        self._new_body()
        self._rcpt_args = {}
        self.tx.queue_id = self._macro("i")
        self.tx.auth_user = self._macro("{auth_authen}")
        self.tx.tls_version = self._macro("{tls_version}")
        answer = self._answer(self.policy.on_mail(self.tx, mailfrom), "mail", sender=mailfrom)
        if answer == Milter.CONTINUE:
            self._begin()
        return answer

    def _begin(self) -> None:
        if not self._in_tx:
            self._in_tx = True
            with self._in_flight_lock:
                RelayMilter._in_flight += 1

    def _end(self) -> None:
        if self._in_tx:
            self._in_tx = False
            with self._idle:
                RelayMilter._in_flight -= 1
                self._idle.notify_all()

    @classmethod
    def drain(cls, timeout: float) -> int:
        """Wait until no transaction is in progress (at most ``timeout`` seconds); the
        number still in progress."""
        with cls._idle:
            cls._idle.wait_for(lambda: cls._in_flight == 0, timeout)
            return cls._in_flight

    def envrcpt(self, to, *params):
        if self.tx.queue_id is None:
            self.tx.queue_id = self._macro("i")
        self._rcpt_args[to] = tuple(params)  # NOTIFY=, ORCPT=: carried to the decoded recipient
        return self._answer(self.policy.on_rcpt(self.tx, to), "rcpt", sender=self.tx.mail_from, rcpt=to)

    @Milter.nocallback
    def data(self):
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self):
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, cmd):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        # No reply is sent for a header (Postfix does not wait for one): never fail here.
        try:
            if isinstance(value, bytes):  # undecodable: keep the bytes through surrogates
                value = value.decode("utf-8", "surrogateescape")
            if not self._leading_space():
                value = " " + value
            self._headers.append((name, value))
        except Exception as exc:  # noqa: BLE001 - eom tempfails the message
            self._header_error = self._header_error or f"{exc.__class__.__name__} in header {name!r}"
        return Milter.CONTINUE

    def _leading_space(self) -> bool:
        return bool(getattr(self, "_protocol", 0) & Milter.P_HDR_LEADSPC)

    def body(self, chunk):
        self._body.write(chunk)
        return Milter.CONTINUE

    def _body_bytes(self) -> bytes:
        self._body.seek(0)
        return self._body.read()

    def eom(self):
        self.tx.queue_id = self._macro("i") or self.tx.queue_id
        if self._header_error is not None:
            self._body.close()
            logs.event(log, logging.ERROR, self.tx.queue_id, "error", stage="header", reason=self._header_error)
            return self._answer(
                Verdict.tempfail("451", "4.3.0", "relay policy error (header), try again later"), "eom"
            )
        try:
            disposition = self.policy.on_eom(self.tx, Message(tuple(self._headers), self._body_bytes()))
            if not disposition.verdict.ok:
                return self._answer(
                    disposition.verdict,
                    "eom",
                    sender=self.tx.mail_from,
                    header_from=disposition.header_from,
                    message_id=disposition.message_id,
                )
            if disposition.report_kind:
                return self._apply_report(disposition)
            self._apply(disposition)
        except _milter.error as exc:
            # libmilter refused an edit: the MTA closed the session (Postfix stopped or the
            # client went away mid-transaction). Nothing was accepted; no traceback needed.
            logs.event(log, logging.WARNING, self.tx.queue_id, "error", stage="eom", reason="mta_gone", detail=str(exc))
            return self._answer(
                Verdict.tempfail("451", "4.3.0", "relay could not finish the message, try again later"),
                "eom",
            )
        except Exception as exc:  # fail closed, never accept unverified mail
            log.exception("%s: event=error stage=eom", self.tx.queue_id or "NOQUEUE")
            return self._answer(
                Verdict.tempfail("451", "4.3.0", f"relay policy error ({exc.__class__.__name__}), try again later"),
                "eom",
            )
        finally:
            self._body.close()
            self._end()
        return Milter.CONTINUE

    def _header_edit(self, edit: HeaderEdit) -> Callable[[], object]:
        """The libmilter call for one header edit; an unknown edit raises (eom tempfails)."""
        match edit.op:
            case EditOp.DELETE:
                return lambda: self.chgheader(edit.name, edit.index, "")
            case EditOp.CHANGE:
                return lambda: self.chgheader(edit.name, edit.index, edit.value)
            case EditOp.INSERT:
                return lambda: self.addheader(edit.name, edit.value, edit.index)
            case EditOp.ADD:
                return lambda: self.addheader(edit.name, edit.value)
            case _:
                raise ValueError(f"unknown header edit {edit.op!r} for {edit.name}")

    def _apply(self, d: Disposition) -> None:
        # Every edit is resolved before the first is applied: an unknown one changes nothing.
        for apply in [self._header_edit(edit) for edit in d.header_edits]:
            apply()
        for old, new in d.recipient_changes:
            self.delrcpt(old)
            self.addrcpt(new, dsn_params(self._rcpt_args.get(old, ()), strip_brackets(new)))
        if d.new_sender:
            self.chgfrom(d.new_sender)
        # The seal next to the route marker (the last header edit): it routes the message
        # again if an operator requeues it with postsuper -r (core/route.py).
        # No space after the colon: the requeue table is exact-match (core/route.py).
        self.addheader(defaults.ROUTE_SEAL_HEADER, route.tenant_seal(self._route_key(), d.tenant.id))
        self._engagement(d)
        logs.event(
            log,
            logging.INFO,
            self.tx.queue_id,
            "accepted",
            tenant=d.tenant.id,
            smarthost=d.tenant.smarthost.nexthop,
            client=self.tx.client_ip,
            sender=self.tx.mail_from,
            new_sender=d.new_sender,
            header_from=d.header_from,
            message_id=d.message_id,
            upstream_id=self._upstream_id(),
            rcpts=",".join(f"<{dec.address}>" for _, dec in self.tx.recipients),
            # The address each recipient arrived as (encoded under the relay domain), same order.
            orig_rcpts=",".join(f"<{strip_brackets(orig)}>" for orig, _ in self.tx.recipients),
            dkim=f"pass d={d.dkim.domain} s={d.dkim.selector} a={d.dkim.algorithm} key={d.dkim.key_source}" if d.dkim else None,
            auth=self.tx.auth_user,
        )

    def _engagement(self, d: Disposition) -> None:
        """Opens and clicks (tenant option engagement_tracking): rewrite the HTML parts
        (core/engagement.py) and replace the body. After the policy accepted the message:
        the hop signature was verified on the body as it arrived. What the rewriter cannot
        handle is passed through untouched, with the reason in the log."""
        options = d.tenant.engagement_tracking
        if options is None:
            return
        key = self._engagement_key()
        qid = self.tx.queue_id
        if key is None or not qid:
            logs.event(log, logging.WARNING, qid, "engagement_skipped", tenant=d.tenant.id,
                       reason="no engagement key" if key is None else "no queue id",
                       path=str(self.policy.settings.engagement.key_file))
            return
        rcpts = [dec.address for _, dec in self.tx.recipients]
        recipient = rcpts[0] if len(rcpts) == 1 else None  # several recipients: per-message tokens
        issued, base, tenant = int(time.time()), options.base_url, d.tenant.id

        def link(url: str) -> str:
            return f"{base}/c/{engagement.make_token(key, engagement.CLICK, tenant, qid, recipient, url, issued)}"

        pixel = f"{base}/o/{engagement.make_token(key, engagement.OPEN, tenant, qid, recipient, None, issued)}"
        result = engagement.rewrite_message(
            self._headers, self._body_bytes(), link if options.clicks else (lambda url: None), pixel if options.opens else None
        )
        if result.body is not None:
            self.replacebody(result.body)
            if result.transfer_encoding:
                present = any(n.lower() == "content-transfer-encoding" for n, _ in self._headers)
                if present:
                    self.chgheader("Content-Transfer-Encoding", 1, " " + result.transfer_encoding)
                else:
                    self.addheader("Content-Transfer-Encoding", " " + result.transfer_encoding)
        logs.event(
            log, logging.INFO if result.reason is None else logging.WARNING, qid,
            "engagement" if result.reason is None else "engagement_passthrough",
            tenant=tenant, links=result.links, pixel=result.pixels, per_message="yes" if recipient is None else None,
            reason=result.reason, skipped="; ".join(result.skipped) or None,
        )

    @classmethod
    def _engagement_key(cls) -> bytes | None:
        if cls.engagement_key is None:
            cls.engagement_key = load_engagement_key(cls.source.current().settings.engagement.key_file)
        return cls.engagement_key

    # -- bounce tracking (issue 15 A) --
    def _apply_report(self, d: Disposition) -> int:
        """A report to a VERP return path: one ``bounce_report`` line per recipient it names
        (the tracker turns them into BOUNCED/DELAYED/COMPLAINED events of the original
        message), then forward it to the tenant's forward_to through its smarthost, or
        discard it (accepted with 250, nothing queued)."""
        for token, r in d.reports:
            logs.event(
                log,
                logging.INFO,
                self.tx.queue_id,
                "bounce_report",
                tenant=d.tenant.id,
                orig_queue_id=token.queue_id,
                kind=r.kind,
                rcpt=r.recipient,
                status=r.status,
                action=r.action,
                code=r.code,
                diagnostic=r.diagnostic,
                remote_mta=r.remote_mta,
                reporting_mta=r.reporting_mta,
                source=r.source,
                scope="message" if token.per_message else "recipient",
                client=self.tx.client_ip,
                message_id=d.message_id,
            )
        for edit in d.header_edits:
            self._header_edit(edit)()
        for old, new in d.recipient_changes:
            self.delrcpt(old)
            if new:
                self.addrcpt(new)
        forward = d.tenant.bounce_tracking.forward_to if d.tenant.bounce_tracking else None
        if forward:
            self.addheader(defaults.ROUTE_SEAL_HEADER, route.tenant_seal(self._route_key(), d.tenant.id))  # exact-match table: no space
        logs.event(
            log,
            logging.INFO,
            self.tx.queue_id,
            "bounce_accepted",
            tenant=d.tenant.id,
            report=d.report_kind,
            reports=len(d.reports),
            dropped=d.dropped_reports or None,
            client=self.tx.client_ip,
            sender=self.tx.mail_from,
            forward_to=forward,
            message_id=d.message_id,
        )
        return Milter.DISCARD if d.bounce_discard else Milter.CONTINUE

    # -- end bounce tracking --

    @classmethod
    def _route_key(cls) -> bytes:
        if cls.route_key_dir is not None:  # serve() found no key at start: look again
            key = load_route_key(cls.route_key_dir)
            if key is not None:
                logs.event(log, logging.INFO, None, "route_key_loaded", path=str(cls.route_key_dir / defaults.ROUTE_KEY_FILE))
                cls.route_key, cls.route_key_dir = key, None
        return cls.route_key

    def _upstream_id(self) -> str | None:
        """The platform's own reference for the message (header X-Upstream-ID), for tracking."""
        wanted = UPSTREAM_ID_HEADER.lower()
        for name, value in self._headers:
            if name.lower() == wanted:
                return value.strip()[:200] or None
        return None

    def abort(self):
        self._headers = []
        self._body.close()
        self._end()
        return Milter.CONTINUE

    def close(self):
        self._end()
        return Milter.CONTINUE


def serve(source, socket: str, socket_group: str | None, socket_mode: int, timeout: int = 600,
          workers: int = 1, child_init: Callable[[], None] = lambda: None) -> bool:
    """Run the milter until SIGTERM/SIGINT; False if the socket file was lost meanwhile.

    ``source`` is a Policy or a ReloadingPolicy (anything with ``.current()``).
    ``workers`` processes serve the socket (milter/workers.py): this process binds it,
    forks them, and supervises; each runs ``child_init`` (its own threads) first.
    """
    from relay_milter.milter.workers import WorkerPool, make_nonblocking, socket_path

    RelayMilter.source = source
    settings = source.current().settings
    key = load_route_key(settings.config_directory)
    if key is None:
        logs.event(
            log, logging.ERROR, None, "route_key_missing",
            path=str(settings.config_directory / defaults.ROUTE_KEY_FILE),
            effect="until relayctl apply creates it, mail accepted now waits unrouted if requeued with postsuper -r",
        )
        RelayMilter.route_key_dir = settings.config_directory
    else:
        RelayMilter.route_key = key
    Milter.factory = RelayMilter
    _milter.set_flags(FLAGS)
    _milter.set_exception_policy(Milter.TEMPFAIL)

    path = socket_path(socket)
    original_open = _milter.opensocket

    def opensocket(rmsock):  # libmilter creates the socket here: fix its owner and mode
        result = original_open(rmsock)
        if path:
            gid = grp.getgrnam(socket_group).gr_gid if socket_group else -1
            if os.geteuid() == 0 and gid != -1:
                os.chown(path, -1, gid)
            os.chmod(path, socket_mode)
        make_nonblocking()  # several workers accept on it (milter/workers.py)
        return result

    original_main = _milter.main

    def worker_main() -> None:
        original_main()  # until libmilter stops (SIGTERM): it accepts no more sessions
        left = RelayMilter.drain(DRAIN_SECONDS)
        if left:
            logs.event(log, logging.WARNING, None, "drain_timeout", in_flight=left, waited=DRAIN_SECONDS)

    pool = WorkerPool(workers, serve=worker_main, child_init=child_init, socket_path=path)
    intact = True

    def main():  # Milter.runmilter calls it once the socket is open: fork the workers here
        nonlocal intact
        intact = pool.run()

    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    _milter.opensocket = opensocket
    _milter.main = main
    try:
        logs.event(log, logging.INFO, None, "start", socket=socket, tenants=len(source.current().tenants), workers=workers)
        Milter.runmilter("relay-milter", socket, timeout)
    finally:
        _milter.opensocket, _milter.main = original_open, original_main
    logs.event(log, logging.INFO, None, "stop", socket_lost=None if intact else "yes")
    return intact
