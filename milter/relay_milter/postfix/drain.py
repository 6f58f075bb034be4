"""Draining a node: its listeners answer 421, its queue empties, then it can be stopped.

The drain is state of the node, kept next to the configuration it changes
(``<config_directory>/relay/drain.json``), not in the inventory: every render reads it
(``render.render_files``), so `relayctl apply` or an Ansible play re-renders a drained node
drained, and only `relayctl undrain` removes it.

While drained, every smtpd listener (signed ingress and submission) is rendered with

    -o smtpd_delay_reject=no
    -o smtpd_client_restrictions=check_client_access,cidr:<config>/relay/drain/clients.cidr

and that table answers every client address with ``421 4.3.2 ...``. With
``smtpd_delay_reject=no`` smtpd evaluates the client restrictions when the client
connects and sends that reply *instead of* the 220 greeting, then disconnects (access(5):
421 disconnects). An SMTP client takes a 421 greeting as "this server is unavailable, try
another one" (RFC 5321 section 3.8; Postfix's and most MTAs' smtp clients go on to the next
MX), so a platform with a retry or a second relay address fails over at once, and a
session already in progress finishes normally (smtpd processes keep their client across
``postfix reload``).

The queue is delivered with ``postqueue -f`` and watched with ``postqueue -j``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from relay_milter.postfix.runner import run_postfix

STATE_FILE = "relay/drain.json"
TABLE_DIR = "relay/drain"
TABLE = TABLE_DIR + "/clients.cidr"
REPLY = "421 4.3.2 This relay is draining for maintenance; send through another relay of this service"


def state_path(config_directory: Path) -> Path:
    return Path(config_directory) / STATE_FILE


def load_state(config_directory: Path) -> dict | None:
    """The drain state of this node (``{"since": ..., "reason": ...}``), or None when it is
    not drained. A state file that cannot be parsed counts as drained: a node an operator
    drained must never be undrained by a damaged file (undrain removes it)."""
    path = state_path(config_directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"since": None, "reason": f"unreadable {path}"}
    return value if isinstance(value, dict) else {"since": None, "reason": f"unreadable {path}"}


def save_state(config_directory: Path, reason: str = "", now: float | None = None) -> dict:
    """Mark this node drained (atomically; root-only 0644 file like the other tables)."""
    state = {"since": time.time() if now is None else now, "reason": reason}
    path = state_path(config_directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return state


def clear_state(config_directory: Path) -> bool:
    """Remove the drain mark; True if there was one."""
    try:
        state_path(config_directory).unlink()
        return True
    except FileNotFoundError:
        return False


def table_text(reply: str = REPLY) -> str:
    """The client access table of a drained node: every IPv4 and IPv6 client gets ``reply``."""
    return (
        "# Rendered by relayctl while this node is drained (relayctl drain); relayctl undrain removes it.\n"
        f"0.0.0.0/0\t{reply}\n"
        f"::/0\t{reply}\n"
    )


def render_context(config_directory: Path) -> dict | None:
    """What master.cf.j2 needs to render the listeners drained, or None when not drained."""
    state = load_state(config_directory)
    if state is None:
        return None
    return {"table": f"cidr:{Path(config_directory) / TABLE}", "since": state.get("since")}


# -- the queue ---------------------------------------------------------------------


@dataclass
class QueueCount:
    total: int
    deferred: int
    hold: int

    @property
    def deliverable(self) -> int:
        """Messages Postfix will still try: all but those on hold (an operator's decision)."""
        return self.total - self.hold


def count_queue(messages: list) -> QueueCount:
    """``messages``: postfix.queue.QueuedMessage objects."""
    names = [m.queue for m in messages]
    return QueueCount(len(names), names.count("deferred"), names.count("hold"))


def flush(config_directory: Path) -> None:
    """``postqueue -f``: attempt delivery of everything deferred now (root only)."""
    r = run_postfix(["postqueue", "-c", str(config_directory), "-f"])
    if r.returncode != 0:
        raise RuntimeError(f"postqueue -f failed: {r.stdout.strip() or f'exit {r.returncode}'}")


# -- SMTP sessions begun before the drain ------------------------------------------------


def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("/proc/stat has no btime")


def master_pid(queue_directory: Path) -> int | None:
    """The pid of this instance's master (``<queue_directory>/pid/master.pid``), or None."""
    try:
        return int((Path(queue_directory) / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _established_sockets() -> set[str]:
    """Socket inodes of every established TCP connection (IPv4 and IPv6) on this host."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == "01":  # TCP_ESTABLISHED
                        found.add(cols[9])
        except OSError:
            continue
    return found


def _has_connection(pid: str, established: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in established:
            return True
    return False


def sessions_begun_before(queue_directory: Path, before: float) -> list[int]:
    """Pids of this instance's smtpd processes that started before ``before`` (epoch
    seconds) and hold a client connection: SMTP sessions that began under the configuration
    of before the drain and may still queue a message.

    After ``postfix reload`` an idle smtpd of the old configuration exits at once, and a
    busy one when its client has finished (seen on Postfix 3.7); an idle smtpd of the new
    configuration (no connection) is not a session. The queue can only be called empty
    once these are gone.
    """
    master = master_pid(queue_directory)
    if master is None:
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    boot = _boot_time()
    established = _established_sockets()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[1] is the parent pid, fields[19] the start time in clock ticks after boot.
        if comm == "smtpd" and int(fields[1]) == master and boot + int(fields[19]) / ticks < before \
                and _has_connection(entry, established):
            found.append(int(entry))
    return sorted(found)


def wait_for_reload(maillog: Path | None, offset: int, timeout: float = 10.0) -> float:
    """After ``postfix reload``: wait until the master logged that it reloaded (a
    ``reload -- version`` line after ``offset`` of ``maillog``) and return the time then;
    from that moment every new smtpd runs the new configuration. Without a readable log
    (syslog), wait one second. ``postfix reload`` only signals the master."""
    deadline = time.monotonic() + timeout
    if maillog is not None:
        while time.monotonic() < deadline:
            try:
                if _reloaded(maillog, offset):
                    return time.time()
            except OSError:
                break
            time.sleep(0.1)
    time.sleep(1.0)
    return time.time()


def _reloaded(maillog: Path, offset: int) -> bool:
    with open(maillog, "rb") as fh:
        fh.seek(offset)
        return any(b"/master[" in line and b": reload -- " in line for line in fh)
