"""File descriptors of Postfix's master: does the tenant count fit its limit?

The master holds about three descriptors per master.cf service (its listening socket and
the two ends of the service's status pipe), whether or not the service runs: one transport
per tenant is three descriptors per tenant. Measured on Postfix 3.7 (issue 17): 123 open
descriptors with 10 tenants, 3,093 with 1,000. A host's usual soft limit of 1,024 is
passed near 330 tenants; the master then cannot open the service and logs a fatal error.

``relayctl check``/``apply`` warn when the rendered master.cf will not fit the limit of the
running master (or, when Postfix is not running, the limit ``postfix start`` would inherit
from this process); ``relayctl status`` shows the headroom. The Ansible role raises
``LimitNOFILE`` of Postfix's unit to fit (docs/scale.md).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

FDS_PER_SERVICE = 3
BASE_FDS = 32  # the master's own: log, lock files, signal pipe, event handler
HEADROOM_WARN = 0.8  # status: WARNING when the master uses more than this share of its limit


def count_services(master_cf: str) -> int:
    """master.cf services: lines that start an entry (not blank, a comment or an -o line)."""
    return sum(1 for line in master_cf.splitlines() if line and not line[0].isspace() and not line.startswith("#"))


def needed(master_cf: str) -> int:
    """Descriptors the master will hold for this master.cf."""
    return FDS_PER_SERVICE * count_services(master_cf) + BASE_FDS


def master_pid(queue_directory: Path) -> int | None:
    """The running master's pid (``<queue_directory>/pid/master.pid``), or None."""
    try:
        pid = int((Path(queue_directory) / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").is_dir() else None


def soft_limit(pid: int | None) -> int | None:
    """The soft RLIMIT_NOFILE of ``pid`` (from /proc), or of this process when pid is None."""
    if pid is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return None if soft == resource.RLIM_INFINITY else soft
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None


@dataclass(frozen=True)
class Headroom:
    pid: int | None  # the running master, or None (the limit is this process's)
    limit: int | None  # soft limit; None: unlimited or unknown
    open: int | None  # descriptors open now (running master only)
    needed: int  # what the master.cf in question needs


def headroom(master_cf: str, queue_directory: Path) -> Headroom:
    pid = master_pid(queue_directory)
    return Headroom(pid, soft_limit(pid), open_fds(pid) if pid else None, needed(master_cf))


def fit_warning(master_cf: str, queue_directory: Path) -> str | None:
    """A warning when the master's descriptor limit is too small for this master.cf."""
    h = headroom(master_cf, queue_directory)
    if h.limit is None or h.needed <= h.limit:
        return None
    whose = f"the running master (pid {h.pid})" if h.pid else "this shell (postfix start inherits it)"
    services = count_services(master_cf)
    return (
        f"file descriptors: {services} master.cf services need about {h.needed} descriptors in Postfix's master "
        f"({FDS_PER_SERVICE} per service), but the soft limit of {whose} is {h.limit}: the master cannot open "
        f"every service. Raise it (systemd: LimitNOFILE= in a drop-in for postfix@-.service, the Ansible role "
        f"does this; or ulimit -n before postfix start), then restart Postfix"
    )
