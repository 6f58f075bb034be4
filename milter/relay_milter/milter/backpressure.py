"""Backpressure: a background thread keeps the policy's ``IngressGate`` (core/quota.py)
supplied with a per-tenant summary of the Postfix queue. The milter never runs
``postqueue``: the hardened milter service has no ``postdrop`` group and cannot. The
tracker (``relayctl track``) runs ``postqueue -j`` every ``reputation.queue_refresh`` seconds
and replaces ``reputation.queue_summary_file`` atomically; this thread re-reads it as often.

What the milter does with the file:

- fresh (rewritten within 3 x ``queue_refresh``): used;
- stale (older, but not older than ``reputation.queue_summary_max_age``), or missing or
  unreadable after a good one that is still that young: the last summary stays in force,
  ``event=queue_summary_stale`` is logged once;
- missing, unreadable or older than ``queue_summary_max_age``: backpressure **fails open**
  (no tenant is held back for its queue; the ingress rate limits still apply), logged once
  as ``event=queue_summary_unavailable`` and exported as ``relay_backpressure_fail_open 1``.
  Backpressure is a fairness feature, not a security check: refusing every tenant because
  the tracker is down would turn a monitoring gap into an outage.

A tenant whose state changes is logged (``event=backpressure tenant=acme state=on|off``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from relay_milter import logs
from relay_milter.config import Settings
from relay_milter.core.quota import TenantQueue, freshness, parse_summary

log = logging.getLogger("relay.milter")


class QueueWatcher:
    def __init__(self, source, settings: Settings, clock=time.time):
        self.source = source  # ReloadingPolicy (or a Policy): .current().tenants, .gate
        self.settings = settings
        self.clock = clock
        self.stop = threading.Event()
        self._pressed: set[str] = set()
        self.status = "starting"  # fresh | stale | fail_open
        self.written: float | None = None  # when the summary in force was written
        self._last: dict[str, TenantQueue] = {}

    # -- reading the file ----------------------------------------------------------------

    def _read(self) -> tuple[float, dict[str, TenantQueue]] | str:
        """The file's summary, or why there is none ("missing", "unreadable: ...")."""
        path = self.settings.reputation.queue_summary_file
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        try:
            return parse_summary(json.loads(text))
        except ValueError as exc:
            return f"unreadable: {exc}"

    def _set_status(self, status: str, **fields) -> None:
        if status == self.status:
            return
        previous, self.status = self.status, status
        path = str(self.settings.reputation.queue_summary_file)
        if status == "fresh":
            if previous != "starting":
                logs.event(log, logging.INFO, None, "queue_summary_ok", file=path, **fields)
        elif status == "stale":
            logs.event(log, logging.WARNING, None, "queue_summary_stale", file=path, action="keeping the last summary", **fields)
        else:
            logs.event(log, logging.WARNING, None, "queue_summary_unavailable", file=path,
                       action="backpressure off (fail open) until the tracker writes it again", **fields)

    def refresh(self) -> None:
        policy = self.source.current()
        tenants = policy.tenants
        watched = [t for t in tenants if t.limits.max_queued is not None or t.limits.max_queue_age is not None]
        if not watched:
            self._write_metrics([])
            return
        rep = self.settings.reputation
        now = self.clock()
        got = self._read()
        if isinstance(got, tuple):
            written, summary = got
            state = freshness(written, now, rep.queue_refresh, rep.queue_summary_max_age)
            if state == "expired":
                self._fail_open(reason="too old", age=f"{now - written:.0f}s")
            else:
                self.written, self._last = written, summary
                self._set_status(state, age=f"{now - written:.0f}s")
                policy.gate.set_queues(summary)
        elif self.written is not None and now - self.written <= rep.queue_summary_max_age:
            self._set_status("stale", reason=got, age=f"{now - self.written:.0f}s")
            policy.gate.set_queues(self._last)
        else:
            self._fail_open(reason=got)
        self._log_changes(policy, watched)
        self._write_metrics(watched)

    def _fail_open(self, **fields) -> None:
        self.written, self._last = None, {}
        self.source.current().gate.set_queues({})
        self._set_status("fail_open", **fields)

    def _log_changes(self, policy, watched) -> None:
        for t in watched:
            refusal = policy.gate.backpressure(t)
            q = policy.gate.queue(t.id)
            if refusal and t.id not in self._pressed:
                self._pressed.add(t.id)
                logs.event(log, logging.WARNING, None, "backpressure", tenant=t.id, state="on", queued=q.queued, reason=refusal[2])
            elif not refusal and t.id in self._pressed:
                self._pressed.discard(t.id)
                logs.event(log, logging.INFO, None, "backpressure", tenant=t.id, state="off", queued=q.queued)

    # -- metrics -------------------------------------------------------------------------

    def metrics_text(self, watched) -> str:
        age = -1 if self.written is None else max(0.0, self.clock() - self.written)
        lines = [
            "# HELP relay_queue_summary_age_seconds Age of the queue summary the milter's backpressure uses (-1: none).",
            "# TYPE relay_queue_summary_age_seconds gauge",
            f"relay_queue_summary_age_seconds {age:.3f}" if age >= 0 else "relay_queue_summary_age_seconds -1",
            "# HELP relay_backpressure_fail_open 1 while backpressure is off because the queue summary is missing or too old.",
            "# TYPE relay_backpressure_fail_open gauge",
            f"relay_backpressure_fail_open {1 if self.status == 'fail_open' and watched else 0}",
            "# HELP relay_backpressure_active 1 while the tenant's new mail gets 452 4.3.1 (its queue is past its limits).",
            "# TYPE relay_backpressure_active gauge",
        ]
        lines += [f'relay_backpressure_active{{tenant="{t.id}"}} {1 if t.id in self._pressed else 0}' for t in watched]
        return "\n".join(lines) + "\n"

    def _write_metrics(self, watched) -> None:
        path = self.settings.reputation.milter_metrics_file
        if path is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(self.metrics_text(watched))
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            logs.event(log, logging.WARNING, None, "metrics_failed", file=str(path), reason=str(exc))

    def run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # never let the watcher die silently
                log.exception("NOQUEUE: event=queue_summary_error")
            if self.stop.wait(self.settings.reputation.queue_refresh):
                return


def start_queue_watch(source, settings: Settings) -> QueueWatcher:
    watcher = QueueWatcher(source, settings)
    threading.Thread(target=watcher.run, name="queue-summary", daemon=True).start()
    return watcher
