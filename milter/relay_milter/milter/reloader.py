"""Pick up tenant changes without restarting the milter, only once they passed the checks.

Tenant changes are two-phase. The operator edits the tenant files; `relayctl apply` checks
them (tenant files, the files they point to, the rendered Postfix configuration) and only
then writes the applied set, ``<config_directory>/relay/tenants.applied.json``. The milter
serves that applied set and swaps in a new Policy within `interval` seconds of a new one.
Transactions in flight keep the policy they started with.

An edit of the tenant files alone changes nothing live: it is validated and logged
(event=reload_failed when invalid, event=reload_pending when valid but not yet applied).
Before the first apply (no applied set yet) the milter reads the tenant files directly, as
a plain file watcher, and says so in its log (event=no_applied_set).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from relay_milter import logs
from relay_milter.config import (
    ConfigError,
    Settings,
    TenantSet,
    applied_tenants_path,
    load_applied_tenants,
    load_tenants,
    tenant_files,
)
from relay_milter.core.dkimverify import KeyResolver
from relay_milter.core.policy import Policy
from relay_milter.core.quota import IngressGate

log = logging.getLogger("relay.milter")


LOGGED_IDS = 20  # a reload line names at most this many tenants (10,000 would be 60 KB a line)


def tenant_list(tenants) -> str:
    """The tenant ids for a log line: all of them up to LOGGED_IDS, then how many more."""
    ids = [t.id for t in tenants]
    shown = ",".join(ids[:LOGGED_IDS])
    return shown if len(ids) <= LOGGED_IDS else f"{shown},...(+{len(ids) - LOGGED_IDS})"


def fingerprint(directory: Path) -> tuple:
    try:
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in tenant_files(directory))
    except (ConfigError, OSError):
        return ()


def _file_fingerprint(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ReloadingPolicy:
    """Holds the current Policy; a watcher thread follows the applied tenant set."""

    def __init__(self, tenants_dir: Path, settings: Settings, interval: float = 1.0, gate: IngressGate | None = None):
        self.tenants_dir = Path(tenants_dir)
        self.settings = settings
        self.interval = interval
        self.applied = applied_tenants_path(settings)
        self.keys = KeyResolver(settings.dns)
        # Rate counters and queue summary outlive a reload; the gate's counters may be
        # shared by every worker process (milter/sharedcounters.py).
        self.gate = gate or IngressGate()
        self._seen = fingerprint(self.tenants_dir)
        self._seen_applied = _file_fingerprint(self.applied)
        # Tenants validated from the applied set, by their JSON: a reload validates only
        # the entries that changed (config.load_applied_tenants).
        self._validated: dict = {}
        self._policy = Policy(self._initial(), settings, self.keys, self.gate)
        self._stop = threading.Event()

    def _initial(self) -> TenantSet:
        if self.applied.exists():
            return load_applied_tenants(self.applied, self._validated)
        logs.event(log, logging.WARNING, None, "no_applied_set", applied=str(self.applied),
                   action="serving the tenant files directly until the first relayctl apply")
        return load_tenants(self.tenants_dir)

    @property
    def source(self) -> str:
        return str(self.applied) if self._seen_applied else str(self.tenants_dir)

    def current(self) -> Policy:
        return self._policy

    def check(self) -> None:
        applied = _file_fingerprint(self.applied)
        if applied != self._seen_applied and applied:
            self._seen_applied = applied
            self._reload_applied()
        seen = fingerprint(self.tenants_dir)
        if seen != self._seen:
            self._seen = seen
            self._files_changed()

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

    def _kept(self) -> str:
        return ",".join(t.id for t in self._policy.tenants)

    def _reload_applied(self) -> None:
        started = time.monotonic()
        try:
            tenants = load_applied_tenants(self.applied, self._validated)
        except ConfigError as exc:
            logs.event(log, logging.ERROR, None, "reload_failed", reason=str(exc).replace("\n", "; "), kept=self._kept())
            return
        self._policy = Policy(tenants, self.settings, self.keys, self.gate)
        logs.event(log, logging.INFO, None, "reload", tenants=tenant_list(tenants), source=str(self.applied),
                   count=len(tenants), seconds=f"{time.monotonic() - started:.3f}")

    def _files_changed(self) -> None:
        started = time.monotonic()
        try:
            tenants = load_tenants(self.tenants_dir)
        except ConfigError as exc:
            logs.event(log, logging.ERROR, None, "reload_failed", reason=str(exc).replace("\n", "; "), kept=self._kept())
            return
        if self._seen_applied:
            # Two-phase: valid files are still not live until `relayctl apply` checked them.
            logs.event(log, logging.INFO, None, "reload_pending", tenants=tenant_list(tenants), count=len(tenants),
                       action="tenant files changed; run relayctl apply to check and activate them", kept=self._kept())
            return
        self._policy = Policy(tenants, self.settings, self.keys, self.gate)
        logs.event(log, logging.INFO, None, "reload", tenants=tenant_list(tenants), source=str(self.tenants_dir),
                   count=len(tenants), seconds=f"{time.monotonic() - started:.3f}")
