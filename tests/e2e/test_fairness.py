"""Per-tenant fairness on a real Postfix: backpressure when a tenant's queue passes
limits.max_queued (452 4.3.1 for that tenant only, accepted again once it drains), ingress
limits (recipients_per_message, messages_per_day: 452 4.7.0 naming the limit), and outbound
pacing (smarthost.rate -> the transport's destination_rate_delay).

Its own lab (module scope): acme (max_queued 2), globex (no limits), initech (2 recipients
per message, 2 messages a day), hooli (smarthost rate 30/m: one delivery every 2 s).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import Mailer
from relay_milter.lab import Lab, Sink, TenantSpec, rsa_key, wait_for
from support.classes import class_of

pytestmark = pytest.mark.e2e


def spec(tid: str, **extra) -> TenantSpec:
    return TenantSpec(
        id=tid, relay_domain=f"{tid}.relay.test", signing_domain=f"hop.{tid}.test", selector="s1",
        key=rsa_key(2048), sender_domains=[f"{tid}.example"], extra=extra,
    )


@pytest.fixture(scope="module")
def llab():
    lab = Lab()
    lab.add_tenant(spec("acme", limits={"max_queued": 2}), Sink("acme"))
    lab.add_tenant(spec("globex"), Sink("globex"))
    lab.add_tenant(spec("initech", limits={"recipients_per_message": 2, "messages_per_day": 2}), Sink("initech"))
    lab.add_tenant(spec("hooli"), Sink("hooli"), rate="30/m")
    # The summary is stale after 1.5 s (3 x 0.5 s), no longer trusted after 8 s.
    lab.overrides = {"reputation": {"queue_refresh": 0.5, "queue_summary_max_age": 8,
                                    "milter_metrics_file": str(lab.base / "milter.prom")}}
    try:
        lab.start()
        # The tracker writes the queue summary the milter's backpressure reads (the milter
        # itself never runs postqueue).
        lab.start_tracker()
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def lab(llab):
    for sink in llab.sinks.values():
        with sink.lock:
            sink.messages.clear()
    return llab


def mailer(lab, tid: str) -> Mailer:
    t = lab.tenants[tid]
    doc = dict(id=t.id, relay_domain=t.relay_domain, signing_domain=t.signing_domain, selector=t.selector, sender_domains=t.sender_domains)
    return Mailer(lab, doc, t.key)


def send(lab, tid: str, subject: str, rcpts: list[str] | None = None):
    m = mailer(lab, tid)
    return m.send(m.signed(subject=subject), rcpts=[m.rcpt(r) for r in rcpts] if rcpts else None)


def arrived(lab, tid: str, subject: str):
    sink = lab.sinks[tid]
    return wait_for(lambda: next((r for r in sink.messages if r.header("Subject")[0] == subject), None), 60, what=f"{subject} at {tid}")


def milter_line(lab, pattern: str, after: int = 0) -> str:
    return wait_for(
        lambda: next((ln for ln in lab.milter_log_text().splitlines()[after:] if re.search(pattern, ln)), None),
        60, what=f"milter log {pattern}",
    )


def test_backpressure_holds_back_only_the_tenant_whose_queue_is_full(lab):
    acme = lab.sinks["acme"]
    summary = lab.base / "queue-summary.json"
    wait_for(summary.exists, 30, what="the tracker's queue summary")
    acme.stop()  # acme's smarthost is down: its mail is deferred
    start = len(lab.milter_log_text().splitlines())
    for n in (1, 2):
        code, text, _ = send(lab, "acme", f"queued-{n}")
        assert code == 250, text
    milter_line(lab, r"event=backpressure tenant=acme state=on queued=2", start)

    code, text, refused = send(lab, "acme", "refused-while-full")
    assert code == 452 and text.startswith("4.3.1 ") and "2 messages queued (limit max_queued 2)" in text, (code, text)
    code, _, _ = send(lab, "globex", "globex-flows")
    assert code == 250
    arrived(lab, "globex", "globex-flows")

    acme.start()  # back: the queue drains, and acme is accepted again
    lab.flush()
    arrived(lab, "acme", "queued-1")
    arrived(lab, "acme", "queued-2")
    milter_line(lab, r"event=backpressure tenant=acme state=off", start)
    code, text, _ = send(lab, "acme", "after-drain")
    assert code == 250, text
    arrived(lab, "acme", "after-drain")
    assert sorted(r.header("Subject")[0] for r in acme.messages) == ["after-drain", "queued-1", "queued-2"]
    assert json.loads(summary.read_text())["node"] == "relay.lab.test"
    assert "relay_backpressure_fail_open 0" in (lab.base / "milter.prom").read_text()


def test_backpressure_fails_open_without_the_trackers_summary(lab):
    """No tracker, so no summary: after queue_summary_max_age the milter stops holding
    acme back (and says so), rather than refusing it for a queue it cannot see."""
    acme = lab.sinks["acme"]
    start = len(lab.milter_log_text().splitlines())
    lab.stop_tracker()
    acme.stop()
    try:
        for n in (1, 2):
            code, text, _ = send(lab, "acme", f"unseen-{n}")
            assert code == 250, text
        milter_line(lab, r"event=queue_summary_stale", start)
        milter_line(lab, r"event=queue_summary_unavailable .*reason=\"too old\"", start)
        code, text, _ = send(lab, "acme", "accepted-blind")
        assert code == 250, text  # two queued, max_queued 2: held back if the milter could see it
        assert "relay_backpressure_fail_open 1" in (lab.base / "milter.prom").read_text()
    finally:
        acme.start()
        lab.start_tracker()
    lab.flush()
    for subject in ("unseen-1", "unseen-2", "accepted-blind"):
        arrived(lab, "acme", subject)
    milter_line(lab, r"event=queue_summary_ok", start)


def test_ingress_limits_tempfail_naming_the_limit(lab):
    code, _, refused = send(lab, "initech", "three-rcpts", rcpts=["a@example.org", "b@example.org", "c@example.org"])
    assert code == 250
    (rcpt, (rcode, rtext)), = refused.items()
    assert rcpt.startswith("c=example.org@") and rcode == 452
    assert rtext.decode().startswith("4.7.0 ") and "limit recipients_per_message (2)" in rtext.decode()
    got = arrived(lab, "initech", "three-rcpts")
    assert sorted(got.rcpt_tos) == ["a@example.org", "b@example.org"]
    code, _, _ = send(lab, "initech", "second-today")
    assert code == 250
    code, text, _ = send(lab, "initech", "third-today")
    assert code == 452 and text.startswith("4.7.0 ") and "limit messages_per_day (2)" in text, (code, text)
    arrived(lab, "initech", "second-today")
    code, _, _ = send(lab, "globex", "globex-unlimited")
    assert code == 250


def test_smarthost_rate_paces_deliveries(lab):
    hooli = class_of((lab.config_dir / "relay" / "route").read_text(), "hooli")  # its transport class
    assert f"\n{hooli}_destination_rate_delay = 2s\n" in (lab.config_dir / "main.cf").read_text()
    for n in range(3):
        code, _, _ = send(lab, "hooli", f"paced-{n}")
        assert code == 250
    times = sorted(arrived(lab, "hooli", f"paced-{n}").at for n in range(3))
    # 30/m is one delivery every 2 s: qmgr starts them at least 2 s apart (a little slack
    # for the end of DATA of one delivery being later than that of the next).
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 1.5 for g in gaps), gaps
    assert times[-1] - times[0] >= 3.5, gaps
