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
import os
import threading
import time
from pathlib import Path

from relay_milter import logs
from relay_milter.config import (
    ConfigError,
    Settings,
    TenantSet,
    applied_tenants_path,
    check_tenant_files,
    load_applied_tenants,
    load_tenants,
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
    """(name, mtime, size) of every tenant file, one stat each (10,000 files: about 60 ms of
    CPU; pathlib's two stats per file cost four times that)."""
    try:
        with os.scandir(directory) as entries:
            found = []
            for e in entries:
                if e.name.endswith((".yaml", ".yml")) and e.is_file():
                    st = e.stat()
                    found.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(found))
    except OSError:
        return ()


# With an applied set, tenant files are only looked at to tell the operator about edits not
# yet applied: every this many seconds, not every interval (a scan of 10,000 files costs CPU
# in every worker).
FILES_INTERVAL = 5.0


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
        self._validated: dict = {}  # line of the applied set -> (Tenant, source)
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

    def check(self, files: bool = True) -> None:
        applied = _file_fingerprint(self.applied)
        if applied != self._seen_applied and applied:
            self._seen_applied = applied
            self._reload_applied()
        if not files:
            return
        seen = fingerprint(self.tenants_dir)
        if seen != self._seen:
            before, self._seen = self._seen, seen
            self._files_changed(before, seen)

    def watch(self) -> threading.Thread:
        def loop() -> None:
            last_files = time.monotonic()
            while not self._stop.wait(self.interval):
                now = time.monotonic()
                files = not self._seen_applied or now - last_files >= FILES_INTERVAL
                if files:
                    last_files = now
                try:
                    self.check(files=files)
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

    def _files_changed(self, before: tuple, after: tuple) -> None:
        if self._seen_applied:
            self._edits_pending(before, after)
            return
        started = time.monotonic()
        try:
            tenants = load_tenants(self.tenants_dir)
        except ConfigError as exc:
            logs.event(log, logging.ERROR, None, "reload_failed", reason=str(exc).replace("\n", "; "), kept=self._kept())
            return
        self._policy = Policy(tenants, self.settings, self.keys, self.gate)
        logs.event(log, logging.INFO, None, "reload", tenants=tenant_list(tenants), source=str(self.tenants_dir),
                   count=len(tenants), seconds=f"{time.monotonic() - started:.3f}")

    def _edits_pending(self, before: tuple, after: tuple) -> None:
        """Two-phase: valid files are still not live until `relayctl apply` checked them. The
        files that changed are validated, each on its own (apply cross-checks them all)."""
        old = {name: rest for name, *rest in before}
        changed = [name for name, *rest in after if old.get(name) != rest]
        removed = sorted(set(old) - {name for name, *_ in after})
        tenants, errors = check_tenant_files([self.tenants_dir / name for name in changed])
        if errors:
            logs.event(log, logging.ERROR, None, "reload_failed", reason="; ".join(errors).replace("\n", "; "), kept=self._kept())
            return
        logs.event(log, logging.INFO, None, "reload_pending", tenants=",".join(t.id for t in tenants) or "-",
                   removed=",".join(removed) or "-",
                   action="tenant files changed; run relayctl apply to check and activate them", kept=self._kept())
