"""The e2e log check (support/lablogs.py): what it reports and what it leaves alone."""

from __future__ import annotations

from types import SimpleNamespace

from support.lablogs import LogWatch, labs_in

FATAL = "Dec  1 10:00:02 relay postfix-lab/cleanup[42]: fatal: open database /etc/postfix/transport.lmdb: No such file or directory\n"
PANIC = "Dec  1 10:00:03 relay postfix-lab/qmgr[43]: panic: myfree: corrupt or unallocated memory block\n"
TRACE = (
    "2026-12-01T10:00:04+0000 relay_milter.milter.adapter[7]: ERROR 3Fv9: event=error stage=eom\n"
    "Traceback (most recent call last):\n"
    '  File "adapter.py", line 120, in eom\n'
    "    verdict = self.policy.decide(facts)\n"
    "KeyError: 'acme'\n"
    "2026-12-01T10:00:05+0000 relay_milter.milter.adapter[7]: INFO 3Fv9: event=accepted\n"
)


def fake_lab(tmp_path):
    lab = SimpleNamespace(base=tmp_path, maillog=tmp_path / "maillog", milter_log=tmp_path / "milter.log")
    lab.maillog.write_text("Dec  1 10:00:00 relay postfix-lab/smtpd[41]: fatal: from before the test\n")
    lab.milter_log.write_text("")
    return lab


def test_only_what_was_appended_since_the_watch_started_counts(tmp_path):
    lab = fake_lab(tmp_path)
    watch = LogWatch(lab)
    assert watch.problems() == []
    with open(lab.maillog, "a") as fh:
        fh.write("Dec  1 10:00:01 relay postfix-lab/smtpd[41]: warning: hostname does not resolve\n" + FATAL + PANIC)
    assert watch.problems() == ["maillog: " + FATAL.strip(), "maillog: " + PANIC.strip()]
    assert LogWatch(lab, fresh=True).problems()[0].endswith("fatal: from before the test")


def test_a_milter_traceback_is_reported_as_one_block(tmp_path):
    lab = fake_lab(tmp_path)
    watch = LogWatch(lab)
    lab.milter_log.write_text(TRACE)
    (tmp_path / "milter.stderr").write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nOSError: boom\n")
    assert watch.problems() == [
        "milter.log: Traceback (most recent call last):\n"
        '  File "adapter.py", line 120, in eom\n'
        "    verdict = self.policy.decide(facts)\n"
        "KeyError: 'acme'",
        'milter.stderr: Traceback (most recent call last):\n  File "x.py", line 1\nOSError: boom',
    ]


def test_allowed_patterns_are_left_out_and_only_those(tmp_path):
    lab = fake_lab(tmp_path)
    watch = LogWatch(lab)
    with open(lab.maillog, "a") as fh:
        fh.write(FATAL + PANIC)
    assert watch.problems(allowed=[r"fatal: open database"]) == ["maillog: " + PANIC.strip()]


def test_a_log_that_was_replaced_is_read_from_its_start(tmp_path):
    lab = fake_lab(tmp_path)
    watch = LogWatch(lab)
    lab.maillog.write_text("x: fatal: y\n")  # shorter than before: rotated or truncated
    assert watch.problems() == ["maillog: x: fatal: y"]


def test_labs_are_found_in_fixture_values_that_hold_one():
    from relay_milter.lab import Lab

    lab = Lab.__new__(Lab)
    assert labs_in(lab) == [lab]
    assert labs_in(SimpleNamespace(lab=lab)) == [lab]
    assert labs_in(SimpleNamespace(lab="not a lab")) == [] and labs_in(None) == []
