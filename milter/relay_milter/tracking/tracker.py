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

import hashlib
import logging
import os
import re
import signal
import stat
import threading
import time
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from relay_milter import logs
from relay_milter.core.addresses import AddressError, decode_local
from relay_milter.config import ConfigError, Settings, Tenant, TenantSet
from relay_milter.defaults import MINIMAL_BACKOFF
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.webhooks import record_event
from relay_milter.tracking.logparse import MilterRecord, PostfixRecord, parse_milter, parse_postfix

log = logging.getLogger("relay.tracker")

STREAM_MAILLOG = "maillog"
STREAM_MILTER = "milter"
# Lines per stream per transaction: large enough for throughput, small enough that a
# SIGTERM is honoured quickly and a failed transaction repeats little work.
BATCH_LINES = 2000
READ_BYTES = 1 << 20
# Bytes at the start of a file remembered (as a hash) to recognise a file that was
# truncated and written again past our offset before we looked (copytruncate).
HEAD_BYTES = 256
# A deferred queue file's mtime is Postfix's next attempt, but only while the line is fresh.
FRESH_LINE = 60.0
# State that is never completed is dropped after these many seconds of log time.
UNQUEUED_TTL = 3600.0  # smtpd client= without a queued message (client went away)
TLS_TTL = 3600.0  # a TLS line never followed by a delivery of that process
PURGE_EVERY = 60.0
PROGRESS_EVERY = 60.0
ROTATED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z")

_TLS_KEY = "tls "  # state keys for TLS sessions; queue ids never contain a space


class _Store(Protocol):
    def transaction(self) -> Any: ...


# -- following a file ----------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    text: str
    end: int  # offset just after this line in the file it came from


def _head_digest(fd: int, length: int) -> str:
    return hashlib.sha256(os.pread(fd, length, 0)).hexdigest()


class Follower:
    """Follows one log file across rotations by inode and offset.

    Rename rotation: the old inode is drained to its end, then the new file is read from 0
    (only once the new file has data: until then the writer may still append to the old one).
    Truncation (copytruncate): read again from 0; if the copy is found among the siblings it
    is finished first. On restore, a checkpointed inode that is no longer at the path is looked
    for among ``<path>.*`` and ``<path>-*`` and finished first, followed by any newer rotated
    files, then the path itself.

    Position changes only through :meth:`advance` (the tracker consumed the line) and file
    switches; both show up in :meth:`checkpoint`, which the tracker commits with the events.
    """

    def __init__(self, path: Path, stream: str):
        self.path = Path(path)
        self.stream = stream
        self._fd: int | None = None
        self.current: Path | None = None
        self.inode: int | None = None
        self.offset = 0
        self._head: tuple[int, str] | None = None  # (length, sha256) of the file's first bytes
        self._queue: list[int] = []  # inodes of rotated files to read before the path

    # -- setup --
    def restore(self, checkpoint: dict | None, from_start: bool = False) -> None:
        """Position at the checkpoint; without one at the end of the file (or its start)."""
        self.close()
        if checkpoint is None:
            if self._open(self.path) and not from_start:
                self.offset = os.fstat(self._fd).st_size  # type: ignore[arg-type]
                self._remember_head()
            return
        inode, offset = int(checkpoint.get("inode") or 0), int(checkpoint.get("offset") or 0)
        head = checkpoint.get("head")
        found = self._find_inode(inode)
        if found is None:
            copy = self._find_copy(head, offset) if head else None
            if copy is not None:
                found = copy
            else:
                if inode:
                    self._problem(
                        "tracker_file_gone",
                        file=checkpoint.get("path"),
                        inode=inode,
                        offset=offset,
                        action=f"reading {self.path} from the start; lines written to the old file after the checkpoint are lost",
                    )
                self._open(self.path)
                return
        if not self._open(found):
            return
        self.offset = offset
        self._head = (int(head[0]), str(head[1])) if head else None
        if found != self.path:
            self._queue = self._newer_siblings(found)
            logs.event(log, logging.INFO, None, "tracker_resume_rotated", stream=self.stream, file=found, offset=offset, then=len(self._queue) + 1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.current, self.inode, self.offset, self._head, self._queue = None, None, None, 0, None, []

    def checkpoint(self) -> dict:
        return {
            "path": str(self.current or self.path),
            "inode": self.inode,
            "offset": self.offset,
            "head": list(self._head) if self._head else None,
        }

    # -- reading --
    def read(self, max_lines: int) -> list[Line]:
        """Complete lines from the current position (all from one file). A partial last line
        waits for its newline, unless the file was rotated away and will not grow again."""
        for _ in range(len(self._queue) + 3):
            if self._fd is None and not self._open(self.path):
                return []
            self._check_truncation()
            rotated = self._successor_ready()
            lines = self._read_lines(max_lines, final=rotated)
            if lines or not rotated:
                return lines
            self._switch()
        return []

    def advance(self, end: int) -> None:
        self.offset = end
        if self._head is None or self._head[0] < HEAD_BYTES:
            self._remember_head()

    def behind(self) -> int:
        """Bytes not read yet in the current file (a lag measure for the progress log)."""
        if self._fd is None:
            return 0
        return max(0, os.fstat(self._fd).st_size - self.offset)

    # -- internals --
    def _open(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._problem("tracker_file_unreadable", file=path, error=exc.strerror or str(exc))
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._problem("tracker_file_unreadable", file=path, error="not a regular file")
            return False
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.current, self.inode, self.offset, self._head = fd, Path(path), st.st_ino, 0, None
        return True

    def _remember_head(self) -> None:
        if self._fd is None:
            return
        length = min(self.offset, HEAD_BYTES)
        self._head = (length, _head_digest(self._fd, length)) if length else None

    def _check_truncation(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        rewritten = False
        if self._head and size >= self._head[0]:
            rewritten = _head_digest(self._fd, self._head[0]) != self._head[1]
        if size >= self.offset and not rewritten:
            return
        old_head, old_offset = self._head, self.offset
        copy = self._find_copy(list(old_head), old_offset) if old_head else None
        if copy is not None and self._open(copy):
            self.offset, self._head = old_offset, old_head
            logs.event(log, logging.WARNING, None, "tracker_truncated", stream=self.stream, file=self.path, offset=old_offset, action=f"finishing the copy {copy} first")
            return
        self.offset, self._head = 0, None
        self._problem("tracker_truncated", file=self.current, offset=old_offset, action="reading from the start")

    def _successor_ready(self) -> bool:
        """Is there a newer file to go on with once this one is drained?"""
        if self._queue:
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return st.st_ino != self.inode and st.st_size > 0

    def _switch(self) -> None:
        while self._queue:
            inode = self._queue.pop(0)
            path = self._find_inode(inode)
            if path is not None and self._open(path):
                logs.event(log, logging.INFO, None, "tracker_rotated", stream=self.stream, file=path)
                return
        done = self.current
        if self._open(self.path):
            logs.event(log, logging.INFO, None, "tracker_rotated", stream=self.stream, file=self.path, finished=done)

    def _read_lines(self, max_lines: int, final: bool) -> list[Line]:
        assert self._fd is not None
        data = os.pread(self._fd, READ_BYTES, self.offset)
        if not data:
            return []
        at_eof = len(data) < READ_BYTES
        cut = data.rfind(b"\n") + 1
        if final and at_eof:
            cut = len(data)  # the writer moved on: a last line without newline is complete
        elif cut == 0 and not at_eof:
            cut = len(data)  # one line longer than READ_BYTES: not a log line, skip it whole
            self._problem("tracker_overlong_line", file=self.current, offset=self.offset)
        lines: list[Line] = []
        pos = 0
        while pos < cut and len(lines) < max_lines:
            nl = data.find(b"\n", pos, cut)
            stop = cut if nl < 0 else nl + 1
            text = data[pos:stop].rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(Line(text, self.offset + stop))
            pos = stop
        return lines

    def _siblings(self) -> list[Path]:
        name = self.path.name
        try:
            entries = list(self.path.parent.iterdir())
        except OSError:
            return []
        return [
            p
            for p in entries
            if (p.name.startswith(name + ".") or p.name.startswith(name + "-")) and not p.name.endswith(ROTATED_SUFFIXES)
        ]

    def _find_inode(self, inode: int) -> Path | None:
        if not inode:
            return None
        for path in [self.path, *sorted(self._siblings())]:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino == inode and stat.S_ISREG(st.st_mode):
                return path
        return None

    def _find_copy(self, head: list | None, offset: int) -> Path | None:
        """A rotated copy (copytruncate) of the file we were reading: same first bytes, and
        at least as long as our position."""
        if not head or not head[0]:
            return None
        for path in sorted(self._siblings()):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_size >= offset and _head_digest(fd, int(head[0])) == head[1]:
                    return path
            finally:
                os.close(fd)
        return None

    def _newer_siblings(self, found: Path) -> list[int]:
        """Rotated files written after ``found`` (read before the path itself), oldest first."""
        try:
            base = os.stat(found)
            live = os.stat(self.path).st_ino if self.path.exists() else None
        except OSError:
            return []
        newer = []
        for path in self._siblings():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino not in (base.st_ino, live) and st.st_mtime >= base.st_mtime:
                newer.append((st.st_mtime, st.st_ino))
        return [ino for _, ino in sorted(newer)]

    def _problem(self, name: str, **fields: Any) -> None:
        logs.event(log, logging.WARNING, None, name, stream=self.stream, **fields)


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
        store: _Store,
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
        self.state: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._loaded = False
        self._committed: dict[str, dict] = {}
        self._log_now = 0.0  # timestamp of the newest maillog line processed
        self._last_purge = 0.0
        self._stop: threading.Event | None = None
        self._stats = {"maillog_lines": 0, "milter_lines": 0, "events": 0}
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

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set. The batch in progress is finished and committed first.
        Store or file errors are logged and retried with a growing pause."""
        self._stop = stop
        failures = 0
        interval = self.settings.tracking.poll_interval
        logs.event(log, logging.INFO, None, "tracker_start", node=self.node, maillog=self.maillog.path, milter_log=self.milter.path)
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                    failures = 0
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
            self.state = tx.all_state(self.node)
        self.maillog.restore(maillog_cp, self.from_start)
        self.milter.restore(milter_cp, self.from_start)
        self._committed = {STREAM_MAILLOG: maillog_cp or {}, STREAM_MILTER: milter_cp or {}}
        self._dirty, self._deleted = set(), set()
        self._loaded = True

    def _reset(self) -> None:
        self.close()
        self.state, self._dirty, self._deleted = {}, set(), set()

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
                if self._must_wait(record, milter_eof, now):
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
        if not events and not self._dirty and not self._deleted and checkpoints == self._committed:
            return
        with self.store.transaction() as tx:
            for ev in events:
                record_event(tx, ev, webhook=self._has_webhook(ev.tenant))
            for key in sorted(self._deleted):
                tx.delete_state(self.node, key)
            for key in sorted(self._dirty):
                tx.put_state(self.node, key, self.state[key])
            for stream, value in checkpoints.items():
                if value != self._committed.get(stream):
                    tx.set_checkpoint(self.node, stream, value)
        self._committed = checkpoints
        self._dirty, self._deleted = set(), set()

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
            in_flight=sum(1 for k in self.state if not k.startswith(_TLS_KEY)),
        )
        self._stats = dict.fromkeys(self._stats, 0)
        self._last_progress = now

    # -- state helpers --
    def _put(self, key: str, value: dict) -> None:
        self.state[key] = value
        self._dirty.add(key)
        self._deleted.discard(key)

    def _touch(self, key: str) -> None:
        self._dirty.add(key)

    def _drop(self, key: str) -> None:
        if self.state.pop(key, None) is not None:
            self._deleted.add(key)
        self._dirty.discard(key)

    def _purge(self) -> None:
        """Drop state that can no longer complete (client went away, a TLS session without
        delivery, a message we never saw removed), by log time so a replay purges alike."""
        now = self._log_now
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        for key, value in list(self.state.items()):
            age = now - float(value.get("ts") or now)
            if key.startswith(_TLS_KEY):
                ttl = TLS_TTL
            else:
                ttl = self.queue_ttl if value.get("received") else UNQUEUED_TTL
            if age > ttl:
                if value.get("received"):
                    logs.event(log, logging.WARNING, key, "tracker_state_expired", tenant=value.get("tenant"), age=f"{age:.0f}s")
                self._drop(key)

    # -- milter records --
    def _on_milter(self, rec: MilterRecord) -> None:
        qid = rec.queue_id
        if qid is None:
            return
        if rec.event == "accepted":
            st = dict(self.state.get(qid) or {})
            st.update(
                milter=True,
                tenant=rec.get("tenant") or st.get("tenant"),
                sender=rec.get("sender") if rec.get("sender") is not None else st.get("sender"),
                upstream_id=rec.get("upstream_id"),
                rcpts=rec.rcpts,
                orig=dict(zip(rec.rcpts, rec.orig_rcpts)) if len(rec.orig_rcpts) == len(rec.rcpts) else {},
            )
            if rec.get("message_id"):
                st["message_id"] = rec.get("message_id")
            st.setdefault("ts", rec.ts)
            if rec.truncated:
                logs.event(log, logging.WARNING, qid, "tracker_rcpts_truncated", known=len(rec.rcpts), action="RECEIVED is recorded for the listed recipients only")
            self._put(qid, st)
        elif rec.event == "reject" and rec.get("stage") == "eom":
            # Postfix's own END-OF-MESSAGE line lacks the reply code; the milter's has it.
            st = dict(self.state.get(qid) or {})
            st["reject"] = {"code": rec.get("code"), "tenant": rec.get("tenant"), "message_id": rec.get("message_id")}
            st.setdefault("ts", rec.ts)
            self._put(qid, st)

    # -- Postfix records --
    def _must_wait(self, rec: PostfixRecord, milter_eof: bool, now: float) -> bool:
        """Hold the maillog at a message's first qmgr line until the milter's record is in."""
        if rec.kind != "queued" or rec.queue_id is None:
            return False
        st = self.state.get(rec.queue_id)
        if not st or "client" not in st or st.get("received") or st.get("milter"):
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
        handler = getattr(self, f"_pf_{rec.kind}", None)
        if handler is None:
            return []
        return handler(rec) or []

    def _pf_client(self, rec: PostfixRecord) -> None:
        qid = rec.queue_id
        assert qid is not None
        st = dict(self.state.get(qid) or {})
        if "client" in st:  # a queue id reused by Postfix after a message whose end we never saw
            logs.event(log, logging.WARNING, qid, "tracker_stale_state", tenant=st.get("tenant"), action="starting over for the new message")
            st = {}
        st.update(client=rec.client, ts=rec.ts)
        self._put(qid, st)

    def _pf_requeued(self, rec: PostfixRecord) -> None:
        """``postsuper -r``: the message is the same, its queue id is new. Its history moves
        along, so later attempts are its events (and no second RECEIVED is written)."""
        old = self.state.get(rec.orig_queue_id or "")
        if old is None or not old.get("received"):
            return
        st = dict(old)
        st["requeued_from"] = rec.orig_queue_id
        self._put(rec.queue_id, st)  # type: ignore[arg-type]
        self._drop(rec.orig_queue_id)  # type: ignore[arg-type]
        logs.event(log, logging.INFO, rec.queue_id, "tracker_requeued", orig_id=rec.orig_queue_id, tenant=st.get("tenant") or st.get("route_tenant"))

    def _pf_message_id(self, rec: PostfixRecord) -> None:
        st = self.state.get(rec.queue_id or "")
        if st is not None and "client" in st and not st.get("message_id"):
            st["message_id"] = rec.message_id
            self._touch(rec.queue_id)  # type: ignore[arg-type]

    def _pf_route(self, rec: PostfixRecord) -> None:
        st = self.state.get(rec.queue_id or "")
        if st is not None and "client" in st:
            st.update(route_tenant=rec.tenant, route_to=rec.recipient)
            self._touch(rec.queue_id)  # type: ignore[arg-type]

    def _pf_queued(self, rec: PostfixRecord) -> list[Event]:
        qid = rec.queue_id
        st = self.state.get(qid or "")
        if st is None or "client" not in st:
            return []  # relay-generated (bounce notice) or submitted locally
        st.update(size=rec.size, pf_sender=rec.sender, ts=rec.ts)
        self._touch(qid)  # type: ignore[arg-type]
        if st.get("received"):
            return []  # a later delivery attempt of the same message
        st["received"] = True
        rcpts = st.get("rcpts") or []
        if not rcpts:
            # No milter record: what the route line showed (the first recipient) is all we know.
            encoded = st.get("route_to")
            return [self._event(Kind.RECEIVED, rec.ts, qid, st, recipient=_decode(encoded), original_recipient=encoded)]
        return [self._event(Kind.RECEIVED, rec.ts, qid, st, recipient=r, original_recipient=_original(st, r)) for r in rcpts]

    def _pf_tls(self, rec: PostfixRecord) -> None:
        self._put(
            f"{_TLS_KEY}{rec.service}[{rec.pid}]",
            {"ts": rec.ts, "qid": None, "level": rec.tls_level, "protocol": rec.tls_protocol, "cipher": rec.tls_cipher},
        )

    def _pf_delivery(self, rec: PostfixRecord) -> list[Event]:
        qid = rec.queue_id
        st = self.state.get(qid or "")
        if st is None or not st.get("received"):
            return []  # not upstream mail (bounce notices), or started after it was queued
        assert qid is not None and rec.recipient is not None and rec.status is not None
        final = st.setdefault("final", [])
        if rec.recipient in final:
            return []  # e.g. an "expired" line after qmgr already bounced it
        seen = st.setdefault("seen", [])
        if rec.recipient not in seen:
            seen.append(rec.recipient)
        kind = _STATUS_KIND[rec.status]
        if kind is Kind.DEFERRED:
            st.setdefault("last", {})[rec.recipient] = {
                "dsn": rec.dsn, "code": rec.response_code, "relay": rec.relay, "reason": rec.reason,
            }
        else:
            final.append(rec.recipient)
        st["ts"] = rec.ts
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
            tls=self._tls_for(rec, qid, st),
            next_retry=self._next_retry(qid, rec.ts) if kind is Kind.DEFERRED else None,
        )
        if ev.tenant is None:
            ev.tenant = rec.transport_tenant
        return [ev]

    def _pf_expired(self, rec: PostfixRecord) -> list[Event]:
        qid = rec.queue_id
        st = self.state.get(qid or "")
        if st is None or not st.get("received"):
            return []
        assert qid is not None
        final = st.setdefault("final", [])
        known = list(dict.fromkeys([*(st.get("rcpts") or []), *(st.get("seen") or [])]))
        pending = [r for r in known if r not in final] if known else [None]
        events = []
        for rcpt in pending:
            last = (st.get("last") or {}).get(rcpt) or {}
            reason = "expired, returned to sender"
            if last.get("reason"):
                reason += f" (last attempt: {last['reason']})"
            events.append(
                self._event(
                    Kind.BOUNCED,
                    rec.ts,
                    qid,
                    st,
                    recipient=rcpt,
                    original_recipient=_original(st, rcpt) if rcpt else st.get("route_to"),
                    relay=last.get("relay"),
                    response_code=last.get("code"),
                    dsn=last.get("dsn"),
                    reason=reason,
                )
            )
            if rcpt:
                final.append(rcpt)
        st["ts"] = rec.ts
        self._touch(qid)
        return events

    def _pf_removed(self, rec: PostfixRecord) -> None:
        self._drop(rec.queue_id or "")

    def _pf_reject(self, rec: PostfixRecord) -> list[Event]:
        qid = rec.queue_id
        st = self.state.get(qid or "") or {}
        milter_reject = st.get("reject") or {}
        code = rec.response_code or milter_reject.get("code") or _code_for(rec.dsn)
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
                message_id=st.get("message_id") or milter_reject.get("message_id"),
                upstream_id=st.get("upstream_id"),
                sender=rec.sender,
                recipient=decoded or rec.recipient,
                original_recipient=rec.recipient if decoded else None,
                response_code=code,
                dsn=rec.dsn,
                reason=rec.text,
                client=rec.client,
            )
        ]

    # -- event building --
    def _event(self, kind: Kind, ts: float, qid: str | None, st: dict, **fields: Any) -> Event:
        return Event(
            kind=kind,
            ts=ts,
            node=self.node,
            tenant=st.get("tenant") or st.get("route_tenant"),
            queue_id=qid,
            message_id=st.get("message_id"),
            upstream_id=st.get("upstream_id"),
            sender=st["sender"] if st.get("sender") is not None else st.get("pf_sender"),
            size=st.get("size"),
            client=st.get("client"),
            **fields,
        )

    def _tenant(self, tenant_id: str | None) -> Tenant | None:
        return self.tenants.by_id(tenant_id) if tenant_id else None

    def _has_webhook(self, tenant_id: str | None) -> bool:
        tenant = self._tenant(tenant_id)
        return bool(tenant and tenant.webhook)

    def _tls_for(self, rec: PostfixRecord, qid: str, st: dict) -> dict:
        """TLS of this delivery: the last TLS line of the same process, if it belongs to this
        queue id (a process delivers one message per connection on tenant transports)."""
        tenant = self._tenant(st.get("tenant") or st.get("route_tenant") or rec.transport_tenant)
        info: dict[str, Any] = {"requested": tenant.smarthost.tls if tenant else None, "established": False}
        key = f"{_TLS_KEY}{rec.service}[{rec.pid}]"
        session = self.state.get(key)
        if session is None or rec.ts - float(session.get("ts") or 0) > TLS_TTL:
            return info
        if session.get("qid") not in (None, qid):
            self._drop(key)  # that connection belonged to an earlier message
            return info
        if session.get("qid") is None:
            session["qid"] = qid
            self._touch(key)
        info.update(established=True, level=session.get("level"), protocol=session.get("protocol"), cipher=session.get("cipher"))
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

    def _reject_tenant(self, rec: PostfixRecord, st: dict) -> str | None:
        """Relay domain of the refused recipient, else what the message's state says, else the
        sender's domain when exactly one tenant sends from it."""
        if rec.recipient and "@" in rec.recipient:
            tenant = self.tenants.by_relay_domain(rec.recipient.rpartition("@")[2])
            if tenant:
                return tenant.id
        known = st.get("tenant") or st.get("route_tenant") or (st.get("reject") or {}).get("tenant")
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


def _original(st: dict, recipient: str) -> str | None:
    """The encoded address a recipient arrived as: from the milter's orig_rcpts, else from
    Postfix's route line when that names this recipient (it shows the first one only)."""
    found = (st.get("orig") or {}).get(recipient)
    if found:
        return found
    route_to = st.get("route_to")
    return route_to if route_to and _decode(route_to) == recipient else None


def _code_for(dsn: str | None) -> str | None:
    """Postfix's END-OF-MESSAGE milter line has no reply code; without the milter's own
    record the class of the DSN is all there is."""
    if not dsn:
        return None
    return {"5": "550", "4": "451"}.get(dsn[0])


# -- entry point for relayctl track ------------------------------------------------------


def main_loop(
    settings: Settings,
    tenants: TenantSet,
    store: _Store,
    stop: threading.Event,
    *,
    once: bool = False,
    from_start: bool = False,
    workers: Iterable[Callable[[threading.Event], None]] = (),
    on_start: Callable[[], None] | None = None,
) -> int:
    """Run the tracker until SIGTERM/SIGINT (or ``stop``); return the exit status (0).

    The first pass positions both followers and commits their checkpoints before
    ``on_start`` is called, so a tracker killed right after it announced itself resumes
    without a gap. The signal only sets ``stop``: the batch in progress is finished and
    committed, so a restart continues exactly there. ``workers`` (the webhook sender, the
    metrics writer) run on their own threads with ``stop`` and are joined on the way out.
    ``once`` processes what is in the files now and returns (workers are not started).
    """
    tracker = Tracker(settings, tenants, store, from_start=from_start)
    try:
        written = tracker.run_once()
    except BaseException:
        tracker.close()
        raise
    if once:
        tracker.close()
        logs.event(log, logging.INFO, None, "tracker_once", events=written)
        return 0
    previous = _install_signals(stop)
    threads = [threading.Thread(target=w, args=(stop,), name=getattr(w, "__name__", "worker"), daemon=True) for w in workers]
    for t in threads:
        t.start()
    if on_start is not None:
        on_start()
    try:
        tracker.run(stop)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        _restore_signals(previous)
    return 0


def _install_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT set ``stop`` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        logs.event(log, logging.INFO, None, "tracker_signal", signal=signal.Signals(signum).name, action="finishing the batch")
        stop.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


__all__: Iterable[str] = ["Tracker", "Follower", "Line", "main_loop", "STREAM_MAILLOG", "STREAM_MILTER"]
