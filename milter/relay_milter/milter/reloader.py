"""Pick up tenant changes without restarting the milter.

`relayctl apply` (or the Ansible role) changes the tenant files; the milter
notices within `interval` seconds and swaps in a new Policy. Transactions in
flight keep the policy they started with. An invalid change is logged and
ignored: the last good tenant set stays in force (fail closed, never open).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from relay_milter import logs
from relay_milter.config import ConfigError, Settings, load_tenants, tenant_files
from relay_milter.core.dkimverify import KeyResolver
from relay_milter.core.policy import Policy
from relay_milter.core.quota import IngressGate

log = logging.getLogger("relay.milter")


def fingerprint(directory: Path) -> tuple:
    try:
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in tenant_files(directory))
    except (ConfigError, OSError):
        return ()


class ReloadingPolicy:
    """Holds the current Policy; a watcher thread re-reads the tenant files when they change."""

    def __init__(self, tenants_dir: Path, settings: Settings, interval: float = 1.0):
        self.tenants_dir = Path(tenants_dir)
        self.settings = settings
        self.interval = interval
        self.keys = KeyResolver(settings.dns)
        self.gate = IngressGate()  # rate counters and queue summary outlive a reload
        self._seen = fingerprint(self.tenants_dir)
        self._policy = Policy(load_tenants(self.tenants_dir), settings, self.keys, self.gate)
        self._stop = threading.Event()

    def current(self) -> Policy:
        return self._policy

    def check(self) -> None:
        seen = fingerprint(self.tenants_dir)
        if seen != self._seen:
            self._seen = seen
            self._reload()

    def watch(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.check()
                except Exception:  # never let the watcher die silently
                    log.exception("NOQUEUE: event=reload_error")

        thread = threading.Thread(target=loop, name="tenant-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _reload(self) -> None:
        try:
            tenants = load_tenants(self.tenants_dir)
        except ConfigError as exc:
            logs.event(log, logging.ERROR, None, "reload_failed", reason=str(exc).replace("\n", "; "), kept=",".join(t.id for t in self._policy.tenants))
            return
        self._policy = Policy(tenants, self.settings, self.keys, self.gate)
        logs.event(log, logging.INFO, None, "reload", tenants=",".join(t.id for t in tenants))
