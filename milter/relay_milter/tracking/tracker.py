"""Delivery tracking: follow Postfix's maillog and the milter's log, write events to the store.

``relayctl track`` runs :func:`main_loop`. Each poll cycle reads the milter log first (its
record of a message is written before Postfix queues the message), then the maillog, and
turns a batch of lines into events (events.py). One store transaction holds the events, their
webhook outbox rows, the per-queue-id correlation state and the new position (inode + offset)
of both files. A crash or restart therefore resumes exactly after the last committed batch:
nothing is lost and nothing is recorded twice.

Correlation (one message = one Postfix queue id):

- smtpd ``client=`` marks a queue id as upstream mail; relay-generated mail (bounce notices,
  local submissions) never has one and produces no tenant events.
- the milter's ``event=accepted`` record gives the tenant, the Message-ID, the upstream id,
  the envelope sender as received and the decoded and original recipients.
- qmgr's first ``from=`` line is RECEIVED (one event per recipient). If the milter's record has
  not been read yet, the maillog waits (the milter log is re-read every cycle) until the line is
  ``record_wait`` seconds old, then the message is recorded without it and a warning is logged.
- delivery lines are RELAYED / DEFERRED / BOUNCED; a "TLS connection established" line applies
  to the next delivery lines of the same delivery process (service + pid) for one queue id
  (the tenant transports do not cache connections).
- qmgr ``status=expired`` bounces every recipient that is not final yet; ``removed`` drops the
  state. NOQUEUE and milter rejects are REJECTED, attributed by relay domain or sender domain.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from datetime import tzinfo
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from relay_milter import logs
from relay_milter.core.addresses import AddressError, decode_local
from relay_milter.config import ConfigError, Settings, Tenant, TenantSet
from relay_milter.defaults import MINIMAL_BACKOFF
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.follower import Follower
from relay_milter.tracking.logparse import (
    BounceNotice,
    Client,
    Delivery,
    Expired,
    MessageId,
    MilterRecord,
    PostfixRecord,
    Queued,
    Reject,
    Removed,
    Requeued,
    Route,
    Tls,
    parse_milter,
    parse_postfix,
)
from relay_milter.tracking.state import TLS_KEY, Attempt, MessageState, MilterReject, TlsSession
from relay_milter.tracking.webhooks import record_event

log = logging.getLogger("relay.tracker")

STREAM_MAILLOG = "maillog"
STREAM_MILTER = "milter"
# Lines per stream per transaction: large enough for throughput, small enough that a
# SIGTERM is honoured quickly and a failed transaction repeats little work.
BATCH_LINES = 2000
# A deferred queue file's mtime is Postfix's next attempt, but only while the line is fresh.
FRESH_LINE = 60.0
# State that is never completed is dropped after these many seconds of log time.
UNQUEUED_TTL = 3600.0  # smtpd client= without a queued message (client went away)
TLS_TTL = 3600.0  # a TLS line never followed by a delivery of that process
PURGE_EVERY = 60.0
PROGRESS_EVERY = 60.0


class TrackerStore(Protocol):
    """What the tracker needs of the event store (tracking.store.Store is one)."""

    def transaction(self) -> Any: ...


# -- correlation -----------------------------------------------------------------------


def _duration(value: str) -> float:
    """Postfix time value ("48h", "5d", bare number = days) in seconds."""
    m = re.match(r"^(\d+)([smhdw]?)$", value.strip())
    if not m:
        return 5 * 86400.0
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}[m.group(2)]


_STATUS_KIND = {"sent": Kind.RELAYED, "deferred": Kind.DEFERRED, "bounced": Kind.BOUNCED, "expired": Kind.BOUNCED}


class Tracker:
    """Turns the two logs into events, one committed batch at a time.

    ``clock`` is injectable for tests (record_wait, next-retry freshness, the year of
    Postfix timestamps). ``tz`` is the zone of Postfix's zone-less timestamps (None: the
    host's local time, which is what Postfix writes).
    """

    def __init__(
        self,
        settings: Settings,
        tenants: TenantSet,
        store: TrackerStore,
        clock: Callable[[], float] = time.time,
        *,
        from_start: bool = False,
        tz: tzinfo | None = None,
        batch_lines: int = BATCH_LINES,
    ):
        if not settings.maillog_file:
            raise ConfigError("settings: field maillog_file: empty (Postfix logs to syslog); the tracker needs Postfix's maillog_file")
        self.settings = settings
        self.tenants = tenants
        self.store = store
        self.clock = clock
        self.node = settings.node
        self.tz = tz
        self.from_start = from_start
        self.batch_lines = batch_lines
        self.record_wait = settings.tracking.record_wait
        self.queue_ttl = _duration(settings.maximal_queue_lifetime) + 86400.0
        self.maillog = Follower(Path(settings.maillog_file), STREAM_MAILLOG)
        self.milter = Follower(Path(settings.tracking.milter_log_file), STREAM_MILTER)
        self.messages: dict[str, MessageState] = {}  # queue id -> what is known of it
        self.sessions: dict[str, TlsSession] = {}  # delivery process (service[pid]) -> its TLS
        # store keys (queue id, or TLS_KEY + process) written / deleted since the last commit
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._loaded = False
        self._committed: dict[str, dict] = {}
        self._log_now = 0.0  # timestamp of the newest maillog line processed
        self._last_purge = 0.0
        self._stop: threading.Event | None = None
        self._stats = {"maillog_lines": 0, "milter_lines": 0, "events": 0}
        self._reports: list[MilterRecord] = []  # bounce_report records of this batch (issue 15 A)
        self._last_progress = clock()
        self._waiting: str | None = None

    # -- public --
    def run_once(self) -> int:
        """Process everything that is in the files now; return the number of events written.
        On any error nothing of the failed batch is kept: the next call starts again from
        the store's checkpoints and state (exactly like a restart)."""
        if not self._loaded:
            self._load()
        total = 0
        try:
            while True:
                written, more = self._batch()
                total += written
                if not more or (self._stop is not None and self._stop.is_set()):
                    break
        except BaseException:
            self._reset()
            raise
        self._progress()
        return total

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """Poll until ``stop`` is set. The batch in progress is finished and committed first.
        Store or file errors are logged and retried with a growing pause. ``heartbeat`` is
        called after every completed pass."""
        self._stop = stop
        failures = 0
        interval = self.settings.tracking.poll_interval
        logs.event(log, logging.INFO, None, "tracker_start", node=self.node, maillog=self.maillog.path, milter_log=self.milter.path)
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                    failures = 0
                    if heartbeat is not None:
                        heartbeat()
                    pause = interval
                except Exception as exc:
                    failures += 1
                    pause = min(interval * 2**failures, 60.0)
                    logs.event(log, logging.ERROR, None, "tracker_error", error=f"{exc.__class__.__name__}: {exc}", failures=failures, retry_in=f"{pause:g}s")
                stop.wait(pause)
        finally:
            self.close()
            logs.event(log, logging.INFO, None, "tracker_stop", node=self.node)

    def close(self) -> None:
        self.maillog.close()
        self.milter.close()
        self._loaded = False

    # -- batches --
    def _load(self) -> None:
        with self.store.transaction() as tx:
            maillog_cp = tx.get_checkpoint(self.node, STREAM_MAILLOG)
            milter_cp = tx.get_checkpoint(self.node, STREAM_MILTER)
            stored = tx.all_state(self.node)
        self.messages = {k: MessageState.from_dict(v) for k, v in stored.items() if not k.startswith(TLS_KEY)}
        self.sessions = {k[len(TLS_KEY):]: TlsSession.from_dict(v) for k, v in stored.items() if k.startswith(TLS_KEY)}
        self.maillog.restore(maillog_cp, self.from_start)
        self.milter.restore(milter_cp, self.from_start)
        self._committed = {STREAM_MAILLOG: maillog_cp or {}, STREAM_MILTER: milter_cp or {}}
        self._dirty, self._deleted = set(), set()
        self._loaded = True

    def _reset(self) -> None:
        self.close()
        self.messages, self.sessions, self._dirty, self._deleted = {}, {}, set(), set()
        self._reports = []

    def _batch(self) -> tuple[int, bool]:
        milter_lines = self.milter.read(self.batch_lines)
        for line in milter_lines:
            record = parse_milter(line.text)
            if record is not None:
                self._on_milter(record)
            self.milter.advance(line.end)
        milter_eof = len(milter_lines) < self.batch_lines
        now = self.clock()
        events: list[Event] = []
        lines = self.maillog.read(self.batch_lines)
        consumed = 0
        for line in lines:
            record = parse_postfix(line.text, now, self.tz)
            if record is not None:
                if isinstance(record, Queued) and self._must_wait(record, milter_eof, now):
                    break
                events.extend(self._on_postfix(record))
                self._log_now = max(self._log_now, record.ts)
            self.maillog.advance(line.end)
            consumed += 1
        self._purge()
        self._commit(events)
        self._stats["maillog_lines"] += consumed
        self._stats["milter_lines"] += len(milter_lines)
        self._stats["events"] += len(events)
        # Go on while lines flow and nothing waits: a drained file may be followed by its
        # successor (rotation), which the next read switches to.
        more = not milter_eof or (consumed == len(lines) > 0)
        return len(events), more

    def _commit(self, events: list[Event]) -> None:
        checkpoints = {STREAM_MAILLOG: self.maillog.checkpoint(), STREAM_MILTER: self.milter.checkpoint()}
        if not events and not self._reports and not self._dirty and not self._deleted and checkpoints == self._committed:
            return
        with self.store.transaction() as tx:
            tx.lock_sequences(ev.tenant for ev in events if ev.tenant)
            for ev in events:
                record_event(tx, ev, webhook=self._has_webhook(ev.tenant))
            for rec in self._reports:
                report = self._report_event(tx, rec)
                if report is not None:
                    record_event(tx, report, webhook=self._has_webhook(report.tenant))
                    events.append(report)
            for key in sorted(self._deleted):
                tx.delete_state(self.node, key)
            for key in sorted(self._dirty):
                tx.put_state(self.node, key, self._stored(key))
            for stream, value in checkpoints.items():
                if value != self._committed.get(stream):
                    tx.set_checkpoint(self.node, stream, value)
        self._committed = checkpoints
        self._dirty, self._deleted = set(), set()
        self._reports = []

    def _progress(self) -> None:
        now = self.clock()
        if now - self._last_progress < PROGRESS_EVERY:
            return
        lag = f"{max(0.0, now - self._log_now):.1f}s" if self._log_now else None
        logs.event(
            log,
            logging.INFO,
            None,
            "tracker_progress",
            **self._stats,
            lag=lag,
            behind_bytes=self.maillog.behind() + self.milter.behind(),
            in_flight=len(self.messages),
        )
        self._stats = dict.fromkeys(self._stats, 0)
        self._last_progress = now

    # -- state helpers --
    def _stored(self, key: str) -> dict:
        """The JSON object the store keeps under ``key``."""
        if key.startswith(TLS_KEY):
            return self.sessions[key[len(TLS_KEY):]].to_dict()
        return self.messages[key].to_dict()

    def _put(self, qid: str, st: MessageState) -> None:
        self.messages[qid] = st
        self._touch(qid)

    def _put_session(self, process: str, session: TlsSession) -> None:
        self.sessions[process] = session
        self._touch(TLS_KEY + process)

    def _touch(self, key: str) -> None:
        self._dirty.add(key)
        self._deleted.discard(key)

    def _forget(self, key: str) -> None:
        self._deleted.add(key)
        self._dirty.discard(key)

    def _drop(self, qid: str) -> None:
        if self.messages.pop(qid, None) is not None:
            self._forget(qid)
        else:
            self._dirty.discard(qid)

    def _drop_session(self, process: str) -> None:
        if self.sessions.pop(process, None) is not None:
            self._forget(TLS_KEY + process)

    def _purge(self) -> None:
        """Drop state that can no longer complete (client went away, a TLS session without
        delivery, a message we never saw removed), by log time so a replay purges alike."""
        now = self._log_now
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        for process, session in list(self.sessions.items()):
            if now - (session.ts or now) > TLS_TTL:
                self._drop_session(process)
        for qid, st in list(self.messages.items()):
            age = now - (st.ts or now)
            if age > (self.queue_ttl if st.received else UNQUEUED_TTL):
                if st.received:
                    logs.event(log, logging.WARNING, qid, "tracker_state_expired", tenant=st.tenant, age=f"{age:.0f}s")
                self._drop(qid)

    # -- milter records --
    def _on_milter(self, rec: MilterRecord) -> None:
        qid = rec.queue_id
        if qid is None:
            return
        if rec.event == "accepted":
            st = self.messages.get(qid) or MessageState()
            st.milter = True
            st.tenant = rec.get("tenant") or st.tenant
            sender = rec.get("sender")
            st.sender = sender if sender is not None else st.sender
            st.upstream_id = rec.get("upstream_id")
            st.rcpts = rec.rcpts
            st.orig = dict(zip(rec.rcpts, rec.orig_rcpts)) if len(rec.orig_rcpts) == len(rec.rcpts) else {}
            if rec.get("message_id"):
                st.message_id = rec.get("message_id")
            if st.ts is None:
                st.ts = rec.ts
            if rec.truncated:
                logs.event(log, logging.WARNING, qid, "tracker_rcpts_truncated", known=len(rec.rcpts), action="RECEIVED is recorded for the listed recipients only")
            self._put(qid, st)
        elif rec.event in ("bounce_report", "bounce_accepted"):
            # Bounce tracking (issue 15 A): the report message itself gets no events; each
            # report line becomes an event of the original message when the batch commits.
            st = self.messages.get(qid) or MessageState()
            st.milter = st.bounce = True
            st.tenant = rec.get("tenant") or st.tenant
            if st.ts is None:
                st.ts = rec.ts
            self._put(qid, st)
            if rec.event == "bounce_report":
                self._reports.append(rec)
        elif rec.event == "reject" and rec.get("stage") == "eom":
            # Postfix's own END-OF-MESSAGE line lacks the reply code; the milter's has it.
            st = self.messages.get(qid) or MessageState()
            st.reject = MilterReject(code=rec.get("code"), tenant=rec.get("tenant"), message_id=rec.get("message_id"))
            if st.ts is None:
                st.ts = rec.ts
            self._put(qid, st)

    # -- Postfix records --
    def _must_wait(self, rec: Queued, milter_eof: bool, now: float) -> bool:
        """Hold the maillog at a message's first qmgr line until the milter's record is in."""
        st = self.messages.get(rec.queue_id)
        if st is None or not st.upstream or st.received or st.milter:
            return False
        if not milter_eof or now - rec.ts < self.record_wait:
            if self._waiting != rec.queue_id:
                self._waiting = rec.queue_id
                logs.event(log, logging.DEBUG, rec.queue_id, "tracker_wait_record", wait=f"{self.record_wait:g}s")
            return True
        logs.event(
            log,
            logging.WARNING,
            rec.queue_id,
            "tracker_no_milter_record",
            waited=f"{self.record_wait:g}s",
            milter_log=self.milter.path,
            action="recorded without the milter's details (recipients, upstream id); is the milter logging to this file?",
        )
        return False

    def _on_postfix(self, rec: PostfixRecord) -> list[Event]:
        match rec:
            case Client():
                self._pf_client(rec)
            case Requeued():
                self._pf_requeued(rec)
            case MessageId():
                self._pf_message_id(rec)
            case Route():
                self._pf_route(rec)
            case Queued():
                return self._pf_queued(rec)
            case Tls():
                self._put_session(rec.process, TlsSession(ts=rec.ts, level=rec.level, protocol=rec.protocol, cipher=rec.cipher))
            case Delivery():
                return self._pf_delivery(rec)
            case Expired():
                return self._pf_expired(rec)
            case Removed():
                self._drop(rec.queue_id)
            case Reject():
                return self._pf_reject(rec)
            case BounceNotice():
                pass  # the notice is relay-generated mail: it never gets tenant events
        return []

    def _pf_client(self, rec: Client) -> None:
        qid = rec.queue_id
        st = self.messages.get(qid) or MessageState()
        if st.upstream:  # a queue id reused by Postfix after a message whose end we never saw
            logs.event(log, logging.WARNING, qid, "tracker_stale_state", tenant=st.tenant, action="starting over for the new message")
            st = MessageState()
        st.client, st.ts = rec.client, rec.ts
        self._put(qid, st)

    def _pf_requeued(self, rec: Requeued) -> None:
        """``postsuper -r``: the message is the same, its queue id is new. Its history moves
        along, so later attempts are its events (and no second RECEIVED is written)."""
        st = self.messages.get(rec.orig_queue_id)
        if st is None or not st.received:
            return
        st.requeued_from = rec.orig_queue_id
        self._drop(rec.orig_queue_id)
        self._put(rec.queue_id, st)
        logs.event(log, logging.INFO, rec.queue_id, "tracker_requeued", orig_id=rec.orig_queue_id, tenant=st.any_tenant)

    def _pf_message_id(self, rec: MessageId) -> None:
        st = self.messages.get(rec.queue_id)
        if st is not None and st.upstream and not st.message_id:
            st.message_id = rec.message_id
            self._touch(rec.queue_id)

    def _pf_route(self, rec: Route) -> None:
        st = self.messages.get(rec.queue_id)
        if st is not None and st.upstream:
            st.route_tenant, st.route_to = rec.tenant, rec.recipient
            self._touch(rec.queue_id)

    def _pf_queued(self, rec: Queued) -> list[Event]:
        qid = rec.queue_id
        st = self.messages.get(qid)
        if st is None or not st.upstream:
            return []  # relay-generated (bounce notice) or submitted locally
        if st.bounce:
            self._drop(qid)  # a report being forwarded: its events are the original's
            return []
        st.size, st.pf_sender, st.ts = rec.size, rec.sender, rec.ts
        self._touch(qid)
        if st.received:
            return []  # a later delivery attempt of the same message
        st.received = True
        if not st.rcpts:
            # No milter record: what the route line showed (the first recipient) is all we know.
            encoded = st.route_to
            return [self._event(Kind.RECEIVED, rec.ts, qid, st, recipient=_decode(encoded), original_recipient=encoded)]
        return [self._event(Kind.RECEIVED, rec.ts, qid, st, recipient=r, original_recipient=_original(st, r)) for r in st.rcpts]

    def _pf_delivery(self, rec: Delivery) -> list[Event]:
        qid = rec.queue_id
        st = self.messages.get(qid)
        if st is None or not st.received:
            return []  # not upstream mail (bounce notices), or started after it was queued
        if rec.recipient in st.final:
            return []  # e.g. an "expired" line after qmgr already bounced it
        if rec.recipient not in st.seen:
            st.seen.append(rec.recipient)
        kind = _STATUS_KIND[rec.status]
        if kind is Kind.DEFERRED:
            st.last[rec.recipient] = Attempt(dsn=rec.dsn, code=rec.response_code, relay=rec.relay, reason=rec.reason)
        else:
            st.final.append(rec.recipient)
        st.ts = rec.ts
        self._touch(qid)
        ev = self._event(
            kind,
            rec.ts,
            qid,
            st,
            recipient=rec.recipient,
            original_recipient=rec.orig_recipient or _original(st, rec.recipient),
            relay=rec.relay,
            response_code=rec.response_code,
            dsn=rec.dsn,
            reason=rec.reason,
            tls=self._tls_for(rec, st),
            next_retry=self._next_retry(qid, rec.ts) if kind is Kind.DEFERRED else None,
            delay=rec.delay,
            delays=rec.delays,
        )
        if ev.tenant is None:
            ev.tenant = rec.transport_tenant
        return [ev]

    def _pf_expired(self, rec: Expired) -> list[Event]:
        qid = rec.queue_id
        st = self.messages.get(qid)
        if st is None or not st.received:
            return []
        known = list(dict.fromkeys([*st.rcpts, *st.seen]))
        pending: list[str | None] = [r for r in known if r not in st.final] if known else [None]
        events = []
        for rcpt in pending:
            last = st.last.get(rcpt) if rcpt else None
            reason = "expired, returned to sender"
            if last and last.reason:
                reason += f" (last attempt: {last.reason})"
            events.append(
                self._event(
                    Kind.BOUNCED,
                    rec.ts,
                    qid,
                    st,
                    recipient=rcpt,
                    original_recipient=_original(st, rcpt) if rcpt else st.route_to,
                    relay=last.relay if last else None,
                    response_code=last.code if last else None,
                    dsn=last.dsn if last else None,
                    reason=reason,
                )
            )
            if rcpt:
                st.final.append(rcpt)
        st.ts = rec.ts
        self._touch(qid)
        return events

    def _pf_reject(self, rec: Reject) -> list[Event]:
        qid = rec.queue_id
        st = (self.messages.get(qid) if qid else None) or MessageState()
        milter_reject = st.reject or MilterReject()
        code = rec.response_code or milter_reject.code or _code_for(rec.dsn)
        tenant = self._reject_tenant(rec, st)
        # A refused encoded address is shown decoded (trace finds it by the real recipient),
        # with the address as given kept as the original; an undecodable one stays as given.
        decoded = _decode(rec.recipient) if tenant and rec.recipient and self.tenants.by_relay_domain(rec.recipient.rpartition("@")[2]) else None
        if qid and rec.stage in ("DATA", "END-OF-MESSAGE", "BDAT"):
            self._drop(qid)  # the whole transaction was refused: no queue file remains
        return [
            Event(
                kind=Kind.REJECTED,
                ts=rec.ts,
                node=self.node,
                tenant=tenant,
                queue_id=qid,
                message_id=st.message_id or milter_reject.message_id,
                upstream_id=st.upstream_id,
                sender=rec.sender,
                recipient=decoded or rec.recipient,
                original_recipient=rec.recipient if decoded else None,
                response_code=code,
                dsn=rec.dsn,
                reason=rec.text,
                client=rec.client,
            )
        ]

    # -- bounce tracking (issue 15 A) --
    def _report_event(self, tx: Any, rec: MilterRecord) -> Event | None:
        """The event of one ``bounce_report`` line: BOUNCED (async), DELAYED or COMPLAINED of
        the original message (by the queue id of its VERP token), for the recipient the
        report names, which must be one of the message's recipients."""
        orig_qid, tenant = rec.get("orig_queue_id"), rec.get("tenant")
        try:
            kind = Kind(rec.get("kind") or "")
        except ValueError:
            return None
        if not orig_qid or kind not in (Kind.BOUNCED, Kind.DELAYED, Kind.COMPLAINED):
            return None
        received = [e for e in tx.received_events(orig_qid) if e.tenant == tenant]
        rcpt = rec.get("rcpt")
        known = {e.recipient: e for e in received if e.recipient}
        if rcpt is None and len(known) == 1:
            rcpt = next(iter(known))
        if received and rcpt is not None and rcpt not in known:
            logs.event(log, logging.WARNING, rec.queue_id, "tracker_report_unmatched", tenant=tenant, orig_queue_id=orig_qid, rcpt=rcpt, kind=kind.value, action="not one of the message's recipients: no event")
            return None
        orig = known.get(rcpt) if rcpt else (received[0] if received else None)
        detail = {
            "async": True,
            "source": rec.get("source"),
            "action": rec.get("action"),
            "reportingMta": rec.get("reporting_mta"),
            "remoteMta": rec.get("remote_mta"),
            "reportQueueId": rec.queue_id,
            "reportMessageId": rec.get("message_id"),
            "scope": rec.get("scope"),
        }
        return Event(
            kind=kind,
            ts=rec.ts,
            node=self.node,
            tenant=tenant,
            queue_id=orig_qid,
            message_id=orig.message_id if orig else None,
            upstream_id=orig.upstream_id if orig else None,
            sender=orig.sender if orig else None,
            recipient=rcpt,
            original_recipient=orig.original_recipient if orig and rcpt else None,
            relay=rec.get("remote_mta") or rec.get("reporting_mta"),
            response_code=rec.get("code"),
            dsn=rec.get("status"),
            reason=rec.get("diagnostic"),
            client=rec.get("client"),
            detail={k: v for k, v in detail.items() if v is not None},
        )

    # -- event building --
    def _event(self, kind: Kind, ts: float, qid: str | None, st: MessageState, **fields: Any) -> Event:
        return Event(
            kind=kind,
            ts=ts,
            node=self.node,
            tenant=st.any_tenant,
            queue_id=qid,
            message_id=st.message_id,
            upstream_id=st.upstream_id,
            sender=st.sender if st.sender is not None else st.pf_sender,
            size=st.size,
            client=st.client,
            **fields,
        )

    def _tenant(self, tenant_id: str | None) -> Tenant | None:
        return self.tenants.by_id(tenant_id) if tenant_id else None

    def _has_webhook(self, tenant_id: str | None) -> bool:
        tenant = self._tenant(tenant_id)
        return bool(tenant and tenant.webhook)

    def _tls_for(self, rec: Delivery, st: MessageState) -> dict:
        """TLS of this delivery: the last TLS line of the same process, if it belongs to this
        queue id (a process delivers one message per connection on tenant transports)."""
        tenant = self._tenant(st.any_tenant or rec.transport_tenant)
        info: dict[str, Any] = {"requested": tenant.smarthost.tls if tenant else None, "established": False}
        session = self.sessions.get(rec.process)
        if session is None or rec.ts - session.ts > TLS_TTL:
            return info
        if session.qid not in (None, rec.queue_id):
            self._drop_session(rec.process)  # that connection belonged to an earlier message
            return info
        if session.qid is None:
            session.qid = rec.queue_id
            self._touch(TLS_KEY + rec.process)
        info.update(established=True, level=session.level, protocol=session.protocol, cipher=session.cipher)
        return info

    def _next_retry(self, qid: str, ts: float) -> float:
        """Postfix sets a deferred queue file's mtime to its next attempt; trust it only for
        a fresh line (an old line's file may already have been retried)."""
        if self.clock() - ts < FRESH_LINE:
            deferred = Path(self.settings.queue_directory) / "deferred"
            for path in (deferred / qid[0] / qid, deferred / qid, *deferred.glob(f"*/{qid}")):
                try:
                    return os.stat(path).st_mtime
                except OSError:
                    continue
        return ts + MINIMAL_BACKOFF

    def _reject_tenant(self, rec: Reject, st: MessageState) -> str | None:
        """Relay domain of the refused recipient, else what the message's state says, else the
        sender's domain when exactly one tenant sends from it."""
        if rec.recipient and "@" in rec.recipient:
            tenant = self.tenants.by_relay_domain(rec.recipient.rpartition("@")[2])
            if tenant:
                return tenant.id
        known = st.any_tenant or (st.reject.tenant if st.reject else None)
        if known:
            return known
        if rec.sender and "@" in rec.sender:
            domain = rec.sender.rpartition("@")[2].lower()
            owners = [t.id for t in self.tenants if domain in t.bounce_domains]
            if len(owners) == 1:
                return owners[0]
        return None


def _decode(encoded: str | None) -> str | None:
    if not encoded or "@" not in encoded:
        return None
    try:
        return decode_local(encoded.rpartition("@")[0])
    except AddressError:
        return None


def _original(st: MessageState, recipient: str) -> str | None:
    """The encoded address a recipient arrived as: from the milter's orig_rcpts, else from
    Postfix's route line when that names this recipient (it shows the first one only)."""
    found = st.orig.get(recipient)
    if found:
        return found
    route_to = st.route_to
    return route_to if route_to and _decode(route_to) == recipient else None


def _code_for(dsn: str | None) -> str | None:
    """Postfix's END-OF-MESSAGE milter line has no reply code; without the milter's own
    record the class of the DSN is all there is."""
    if not dsn:
        return None
    return {"5": "550", "4": "451"}.get(dsn[0])


__all__: Iterable[str] = ["Tracker", "STREAM_MAILLOG", "STREAM_MILTER", "BATCH_LINES"]
