"""Backpressure: a background thread keeps a per-tenant summary of the Postfix queue for the
policy's ``IngressGate`` (core/quota.py). The milter never runs ``postqueue`` per message.

Every ``reputation.queue_refresh`` seconds it runs ``postqueue -j`` and attributes each
queued message to a tenant by its envelope sender's domain: the milter lets through only a
tenant's allowed sender domains, its envelope_sender's domain and its hop signing domain,
and these belong to one tenant each. Held messages (an operator's decision) do not count.
If ``postqueue`` fails, the last summary stays in force and the failure is logged.

A tenant whose state changes is logged (``event=backpressure tenant=acme state=on|off``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading

from relay_milter import logs
from relay_milter.config import Settings, TenantSet
from relay_milter.core.quota import IngressGate, TenantQueue

log = logging.getLogger("relay.milter")


def sender_tenants(tenants: TenantSet) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tenants:
        for d in (*t.bounce_domains, t.signing_domain):
            out.setdefault(d, t.id)
    return out


def summarise(lines: list[str], tenants: TenantSet) -> dict[str, TenantQueue]:
    by_domain = sender_tenants(tenants)
    counts: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for line in lines:
        if not line.strip():
            continue
        obj = json.loads(line)
        if obj.get("queue_name") == "hold":
            continue
        tid = by_domain.get(str(obj.get("sender", "")).rpartition("@")[2].lower())
        if tid is None:
            continue
        counts[tid] = counts.get(tid, 0) + 1
        if obj.get("queue_name") == "deferred":
            arrival = float(obj.get("arrival_time") or 0)
            oldest[tid] = min(oldest.get(tid, arrival), arrival)
    return {tid: TenantQueue(n, oldest.get(tid)) for tid, n in counts.items()}


class QueueWatcher:
    def __init__(self, source, settings: Settings):
        self.source = source  # ReloadingPolicy (or a Policy): .current().tenants, .gate
        self.settings = settings
        self.stop = threading.Event()
        self._pressed: set[str] = set()

    def refresh(self) -> None:
        policy = self.source.current()
        tenants = policy.tenants
        watched = [t for t in tenants if t.limits.max_queued is not None or t.limits.max_queue_age is not None]
        if not watched:
            return
        try:
            r = subprocess.run(
                ["postqueue", "-c", str(self.settings.config_directory), "-j"],
                capture_output=True, text=True, timeout=60,
            )
            if r.returncode != 0:
                raise RuntimeError(r.stderr.strip() or f"exit {r.returncode}")
            summary = summarise(r.stdout.splitlines(), tenants)
        except Exception as exc:  # keep the last summary; say so
            logs.event(log, logging.WARNING, None, "queue_summary_failed", reason=str(exc)[:300])
            return
        policy.gate.set_queues(summary)
        for t in watched:
            refusal = policy.gate.backpressure(t)
            q = summary.get(t.id, TenantQueue())
            if refusal and t.id not in self._pressed:
                self._pressed.add(t.id)
                logs.event(log, logging.WARNING, None, "backpressure", tenant=t.id, state="on", queued=q.queued, reason=refusal[2])
            elif not refusal and t.id in self._pressed:
                self._pressed.discard(t.id)
                logs.event(log, logging.INFO, None, "backpressure", tenant=t.id, state="off", queued=q.queued)

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
