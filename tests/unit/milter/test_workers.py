"""The worker supervisor (milter/workers.py) in a real process tree.

The supervisor runs in a child process of the test with a stand-in for libmilter's main
loop (``sigwait`` for the stop signals, as libmilter's signal thread does): what is
under test is the forking, the replacement of a dead worker, the stop, and the socket
check. The real milter under a real Postfix is tests/e2e/test_workers.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from relay_milter.lab import wait_for
from relay_milter.milter.workers import WorkerPool, default_workers, listening_sockets, make_nonblocking

SUPERVISOR = textwrap.dedent(
    """
    import signal, sys
    from relay_milter import logs
    from relay_milter.milter.workers import WorkerPool

    logs.setup("info", sys.argv[1])

    def serve():
        signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    ok = WorkerPool(int(sys.argv[2]), serve=serve, socket_path=sys.argv[3] or None).run()
    sys.exit(0 if ok else 4)
    """
)


class Supervisor:
    def __init__(self, tmp_path, workers: int = 3, socket_path: str = ""):
        self.log = tmp_path / "milter.log"
        script = tmp_path / "supervisor.py"
        script.write_text(SUPERVISOR)
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.log), str(workers), socket_path])
        self.count = workers
        wait_for(lambda: len(self.workers()) == workers and self.text().count("event=worker_start") >= workers, 20, what="workers")

    def workers(self) -> list[int]:
        try:
            return [int(p) for p in open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()]
        except OSError:
            return []

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def supervisor(tmp_path):
    s = Supervisor(tmp_path)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(10)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_worker_is_replaced_and_sigterm_stops_them_all(supervisor):
    before = supervisor.workers()
    assert len(before) == 3
    for pid in before:  # every line of a worker names it
        assert re.search(rf"relay\.milter\[{pid}\]: INFO NOQUEUE: event=worker_start worker={pid} slot=\d parent={supervisor.proc.pid}", supervisor.text())

    os.kill(before[1], signal.SIGKILL)
    wait_for(lambda: len(supervisor.workers()) == 3 and before[1] not in supervisor.workers(), 20, what="a replacement")
    after = supervisor.workers()
    assert set(before) - {before[1]} < set(after)
    assert re.search(rf"event=worker_died worker={before[1]} slot=1 status=\"signal SIGKILL\"", supervisor.text())
    [new] = set(after) - set(before)
    wait_for(lambda: f"event=worker_start worker={new} slot=1 " in supervisor.text(), 20, what="the replacement's first line")

    assert supervisor.stop() == 0
    assert all(gone(pid) for pid in after)
    text = supervisor.text()
    assert sorted(int(p) for p in re.findall(r"event=worker_stopped worker=(\d+)", text)) == sorted(after)
    assert "event=workers_stopped signal=SIGTERM" in text
    assert text.count("event=worker_died") == 1  # the stop is no death: nothing was replaced


def test_workers_do_not_outlive_a_killed_supervisor(supervisor):
    workers = supervisor.workers()
    supervisor.proc.kill()
    supervisor.proc.wait(10)
    wait_for(lambda: all(gone(pid) for pid in workers), 20, what="the workers to stop")


def test_a_worker_exit_that_took_the_socket_file_stops_everything(tmp_path):
    path = tmp_path / "milter.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    try:
        s = Supervisor(tmp_path, workers=2, socket_path=str(path))
        path.unlink()  # as libmilter's mi_closener does when a non-root worker stops
        workers = s.workers()
        os.kill(workers[0], signal.SIGTERM)
        assert s.proc.wait(20) == 4
        assert all(gone(pid) for pid in workers)
        assert "event=socket_lost" in s.text()
    finally:
        listener.close()


def test_the_listening_socket_is_made_nonblocking():
    code = textwrap.dedent(
        """
        import socket
        from relay_milter.milter.workers import listening_sockets, make_nonblocking
        listener = socket.socket(socket.AF_UNIX)
        listener.bind("\\0relay-test-%d" % id(listener))
        listener.listen()
        other = socket.socket(socket.AF_INET)
        assert listening_sockets() == [listener.fileno()], listening_sockets()
        import os
        assert os.get_blocking(listener.fileno())
        assert make_nonblocking() == listener.fileno()
        print(os.get_blocking(listener.fileno()))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_pool_needs_a_worker_and_the_default_is_the_cpu_count():
    with pytest.raises(ValueError):
        WorkerPool(0, serve=lambda: None)
    assert default_workers() == len(os.sched_getaffinity(0))
