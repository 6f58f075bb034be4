"""N pre-forked worker processes serve one milter socket; the parent only supervises.

Why pre-fork, and how it works with libmilter. One Python process runs the policy on one
core (the GIL), so the milter scales across cores with processes. pymilter cannot be
handed an open socket, and two processes binding one unix socket path would replace each
other's socket file; SO_REUSEPORT exists for TCP only, and the milter listens on a unix
socket. But libmilter keeps its listening socket in a static variable and its listener
(``mi_listener``, run by ``smfi_main``) opens a socket only if none is open yet. So the
parent does everything ``Milter.runmilter`` does up to and including
``milter.opensocket`` (bind + listen, socket owner and mode fixed), and forks; each worker
calls ``milter.main()`` and accepts connections on the inherited socket, with its own
libmilter threads. The parent never runs libmilter's main loop and starts no thread, so
forking it is safe.

The listening socket is made non-blocking: every worker polls it and the kernel wakes them
all, one wins ``accept()`` and the others get EAGAIN, which libmilter's listener treats as
"poll again" (a blocking accept would park the losers until the next connection, and a
stop request would wait for one). Sockets returned by ``accept()`` are blocking again on
Linux, as libmilter expects.

Supervision:

- A worker that dies (crash, OOM kill, ``kill -9``) is logged (``event=worker_died``) and
  replaced at once (a worker that keeps dying within a second of its start is replaced
  after a growing pause, at most 10 s). Postfix tempfails (``milter_default_action =
  tempfail``) the SMTP sessions that worker was serving; the other workers carry on.
- SIGTERM, SIGINT or SIGHUP to the parent is passed to every worker; libmilter stops each
  one; the parent exits once all have. A worker notices a parent that died
  (``PR_SET_PDEATHSIG``: it gets SIGTERM), so no worker outlives its supervisor.
- When libmilter stops a worker that does not run as root, it removes the socket file
  (``mi_closener``), which would leave the other workers unreachable. If a worker exit
  took the socket file with it, the parent stops every worker and ``run()`` returns False
  (``relayctl milter`` exits 4) so that the service manager starts a fresh milter.

Each worker runs ``child_init`` first (its own tenant watcher and queue-summary threads,
and a tenant check so that a replacement serves the current tenant set). Every log line
carries the process id (``relay.milter[PID]``), so it names the worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import stat
import time
from typing import Callable

from relay_milter import logs

log = logging.getLogger("relay.milter")

PR_SET_PDEATHSIG = 1
QUICK_DEATH = 1.0  # seconds: a worker dying this soon after its start counts as a crash loop
MAX_RESPAWN_DELAY = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def default_workers() -> int:
    """The number of CPUs this process may run on (the cores, or its cgroup's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def listening_sockets() -> list[int]:
    """The file descriptors of this process's listening sockets (SO_ACCEPTCONN)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(fd)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays its owner's (libmilter's)
    return found


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


class WorkerPool:
    """Forks ``count`` workers that each run ``serve`` (libmilter's main loop) and keeps
    them running until a stop signal. ``socket_path`` is the unix socket the parent opened
    (None for inet), whose file must survive worker exits."""

    def __init__(self, count: int, serve: Callable[[], object], child_init: Callable[[], None] = lambda: None,
                 socket_path: str | None = None):
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.serve = serve
        self.child_init = child_init
        self.socket_path = socket_path
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
        self.stopping: int | None = None
        self._quick_deaths: dict[int, int] = {}
        self._socket_id: tuple[int, int] | None = None

    # -- parent -------------------------------------------------------------------

    def run(self) -> bool:
        """Supervise until stopped; False if the socket file was lost."""
        self._socket_id = self._socket_file_id()
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            logs.event(log, logging.INFO, None, "workers_start", workers=self.count, socket=self.socket_path)
            for slot in range(self.count):
                self._spawn(slot)
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stopping is None:
            self.stopping = signum
        self._signal_all(signum)

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _supervise(self) -> bool:
        intact = True
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid not in self.workers:
                continue
            slot, started = self.workers.pop(pid)
            if self.stopping is not None:
                logs.event(log, logging.INFO, None, "worker_stopped", worker=pid, slot=slot, status=_describe(status))
                continue
            lived = time.monotonic() - started
            logs.event(log, logging.ERROR, None, "worker_died", worker=pid, slot=slot, status=_describe(status),
                       lived=f"{lived:.1f}s", effect="Postfix tempfails the sessions it was serving; replacing it")
            if not self._socket_intact():
                logs.event(log, logging.ERROR, None, "socket_lost", socket=self.socket_path,
                           action="stopping every worker and exiting, so that the service manager starts the milter again")
                intact = False
                self.stopping = signal.SIGTERM
                self._signal_all(signal.SIGTERM)
                continue
            self._respawn_pause(slot, lived)
            if self.stopping is None:
                self._spawn(slot)
        logs.event(log, logging.INFO, None, "workers_stopped", signal=signal.Signals(self.stopping).name if self.stopping else None)
        return intact

    def _respawn_pause(self, slot: int, lived: float) -> None:
        if lived >= QUICK_DEATH:
            self._quick_deaths.pop(slot, None)
            return
        n = self._quick_deaths[slot] = self._quick_deaths.get(slot, 0) + 1
        deadline = time.monotonic() + min(MAX_RESPAWN_DELAY, 0.1 * 2 ** n)
        while self.stopping is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _socket_file_id(self) -> tuple[int, int] | None:
        if not self.socket_path:
            return None
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _socket_intact(self) -> bool:
        return self._socket_id is None or self._socket_file_id() == self._socket_id

    def _spawn(self, slot: int) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child(parent, slot)  # never returns
        self.workers[pid] = (slot, time.monotonic())
        if self.stopping is not None:  # a stop signal came in between
            os.kill(pid, self.stopping)
        return pid

    # -- worker -------------------------------------------------------------------

    def _child(self, parent: int, slot: int) -> None:
        code = 0
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            # Blocked in every thread of the worker (those child_init starts inherit the
            # mask): libmilter's signal thread takes them with sigwait() and stops cleanly.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            _set_pdeathsig(signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl
                os._exit(0)
            logs.event(log, logging.INFO, None, "worker_start", worker=os.getpid(), slot=slot, parent=parent)
            self.child_init()
            self.serve()
            logs.event(log, logging.INFO, None, "worker_stop", worker=os.getpid(), slot=slot)
        except BaseException:  # noqa: BLE001 - a worker reports why it ends, whatever it is
            log.exception("NOQUEUE: event=worker_error worker=%d slot=%d", os.getpid(), slot)
            code = 70
        finally:
            logging.shutdown()
            os._exit(code)


def make_nonblocking() -> int:
    """Make libmilter's listening socket non-blocking. The parent calls it right after
    ``milter.opensocket``, when that is its only listening socket; the flag is on the open
    file, so every worker forked afterwards shares it. Returns the descriptor."""
    fds = listening_sockets()
    if len(fds) != 1:
        raise RuntimeError(f"expected libmilter's listening socket, found {len(fds)} listening sockets")
    os.set_blocking(fds[0], False)
    return fds[0]


def socket_path(spec: str) -> str | None:
    return spec[5:] if spec.startswith("unix:") else None
