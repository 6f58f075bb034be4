"""relayctl drain's parts: the persisted drain state, the drained listeners, the sessions
begun before the drain. (Draining a live node under load: tests/e2e/test_fleet.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from relay_milter.config import Settings, load_tenants
from relay_milter.postfix import drain
from relay_milter.postfix.render import PER_TENANT_DIRS, render_files
from support.paths import EXAMPLES


def settings(tmp_path) -> Settings:
    return Settings(config_directory=tmp_path / "postfix", submission_listen=["587"],
                    tls_cert_file=tmp_path / "relay.pem", tls_key_file=tmp_path / "relay.key")


def listeners(master: str) -> list[str]:
    """The smtpd services of master.cf, each with its -o lines."""
    out, current = [], None
    for line in master.splitlines():
        if " inet " in line and line.rstrip().endswith("smtpd"):
            current = [line]
            out.append(current)
        elif current is not None and line.startswith("  -o "):
            current.append(line)
        else:
            current = None
    return ["\n".join(b) for b in out]


def test_a_node_is_rendered_open_until_drained_and_again_after_undrain(tmp_path):
    s = settings(tmp_path)
    (tmp_path / "postfix").mkdir()
    tenants = load_tenants(EXAMPLES)
    table = f"cidr:{tmp_path / 'postfix' / drain.TABLE}"

    open_files = render_files(tenants, s)
    assert drain.TABLE not in open_files and "check_client_access" not in open_files["master.cf"]

    drain.save_state(s.config_directory, "kernel update")
    assert drain.load_state(s.config_directory)["reason"] == "kernel update"
    drained = render_files(tenants, s)
    smtpd = listeners(drained["master.cf"])
    assert len(smtpd) == 2  # ingress on 25, submission on 587
    for block in smtpd:
        assert "-o smtpd_delay_reject=no" in block
        assert f"-o smtpd_client_restrictions=check_client_access,{table}" in block
        assert "permit_sasl_authenticated,reject" not in block.split("smtpd_client_restrictions")[1].splitlines()[0]
    assert drained[drain.TABLE].splitlines()[1:] == [f"0.0.0.0/0\t{drain.REPLY}", f"::/0\t{drain.REPLY}"]
    assert drain.REPLY.startswith("421 4.3.2 ")
    # undrain renders the table away; install removes it as a file it no longer renders.
    assert drain.TABLE_DIR in PER_TENANT_DIRS
    assert drain.clear_state(s.config_directory) is True
    assert drain.clear_state(s.config_directory) is False
    again = render_files(tenants, s)
    assert again["master.cf"] == open_files["master.cf"] and set(again) == set(open_files)


def test_a_damaged_state_file_keeps_the_node_drained(tmp_path):
    """Only undrain opens a drained node: a state file that does not parse is a drain."""
    drain.state_path(tmp_path).parent.mkdir(parents=True)
    drain.state_path(tmp_path).write_text("{not json")
    assert drain.load_state(tmp_path)["reason"].startswith("unreadable")
    assert drain.render_context(tmp_path)["table"] == f"cidr:{tmp_path / drain.TABLE}"
    assert drain.load_state(tmp_path / "elsewhere") is None


# A child that names itself smtpd (prctl PR_SET_NAME) and, given a port, holds a TCP
# connection to it: what an smtpd in the middle of a session looks like in /proc.
_CHILD = (
    "import ctypes, socket, sys, time\n"
    "ctypes.CDLL(None).prctl(15, b'smtpd', 0, 0, 0)\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))) if len(sys.argv) > 1 else None\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_sessions_begun_before_the_drain_are_this_masters_smtpd_children_with_a_client(tmp_path):
    """A process named smtpd whose parent is the instance's master (here: this test), that
    started before the cut-off and holds a TCP connection is a session still open; one
    without a connection (idle), one started later, or another master's, is not."""
    (tmp_path / "pid").mkdir()
    (tmp_path / "pid" / "master.pid").write_text(f"{os.getpid():>16}\n")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    before = time.time() - 1  # process start times have clock-tick resolution
    busy = subprocess.Popen([sys.executable, "-c", _CHILD, str(port)], stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline() == "ready\n" and idle.stdout.readline() == "ready\n"
        conn, _ = server.accept()
        later = time.time() + 1
        assert drain.sessions_begun_before(tmp_path, later) == [busy.pid]
        assert drain.sessions_begun_before(tmp_path, before) == []
        assert drain.sessions_begun_before(tmp_path / "no-instance", later) == []
        conn.close()
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
        server.close()


def test_a_reload_is_seen_in_the_masters_log_line(tmp_path):
    log = tmp_path / "maillog"
    log.write_text("Dec 01 10:00:00 relay postfix/master[7]: reload -- version 3.7.11\n")
    offset = log.stat().st_size
    log.write_text(log.read_text() + "Dec 01 10:00:01 relay postfix/master[7]: reload -- version 3.7.11\n")
    t0 = time.time()
    assert t0 <= drain.wait_for_reload(log, offset, timeout=5) < t0 + 1
    assert drain.wait_for_reload(log, log.stat().st_size, timeout=0.3) >= t0 + 1  # none since: a one-second pause


def test_count_queue_counts_held_mail_as_not_deliverable():
    from relay_milter.postfix.queue import QueuedMessage

    msgs = [QueuedMessage(f"Q{i}", q, 0.0, 1, "a@b", []) for i, q in enumerate(["active", "deferred", "deferred", "hold"])]
    c = drain.count_queue(msgs)
    assert (c.total, c.deferred, c.hold, c.deliverable) == (4, 2, 1, 3)
