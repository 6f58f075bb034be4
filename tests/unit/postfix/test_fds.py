"""Issue 17: does the master.cf fit the master's file descriptor limit?"""

from __future__ import annotations

import os
import resource

from relay_milter.postfix import fds

MASTER = """# comment
smtp      inet  n       -       n       -       -       smtpd
  -o smtpd_soft_error_limit=10
pickup    unix  n       -       n       60      1       pickup

relay_acme unix -       -       n       -       5       smtp
  -o syslog_name=postfix/relay_acme
"""


def services(n: int) -> str:
    return "".join(f"relay_t{i:05d} unix - - n - 5 smtp\n  -o syslog_name=postfix/relay_t{i:05d}\n" for i in range(n))


def test_counts_service_lines_only():
    assert fds.count_services(MASTER) == 3
    assert fds.needed(MASTER) == 3 * fds.FDS_PER_SERVICE + fds.BASE_FDS


def test_warns_when_the_tenants_do_not_fit_this_process_limit(tmp_path):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    too_many = soft // fds.FDS_PER_SERVICE + 1
    warning = fds.fit_warning(services(too_many), tmp_path)  # no master.pid: Postfix not running
    assert warning is not None
    assert f"{too_many} master.cf services need about {fds.needed(services(too_many))} descriptors" in warning
    assert f"the soft limit of this shell (postfix start inherits it) is {soft}" in warning
    assert "LimitNOFILE" in warning
    assert fds.fit_warning(services(10), tmp_path) is None


def test_headroom_of_a_running_master_is_read_from_proc(tmp_path):
    (tmp_path / "pid").mkdir()
    (tmp_path / "pid" / "master.pid").write_text(f"{os.getpid():>10}\n")  # Postfix's format
    h = fds.headroom(MASTER, tmp_path)
    assert h.pid == os.getpid()
    assert h.limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert h.open and h.open > 2
    assert "the running master (pid" in (fds.fit_warning(services(h.limit // 3 + 1), tmp_path) or "")
    (tmp_path / "pid" / "master.pid").write_text("999999999\n")  # a stale pid file
    assert fds.headroom(MASTER, tmp_path).pid is None
