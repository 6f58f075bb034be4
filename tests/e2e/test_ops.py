"""relayctl queue / hold / release / requeue / metrics against a real Postfix queue.

Its own lab: two tenants whose smarthosts answer 451, so everything sent stays deferred
and each test sees a queue it can reason about. Tests run in file order and each one
leaves the queue as it found it (all deferred).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from relay_milter.config import load_tenants
from relay_milter.tracking import store as eventstore
from relay_milter.postfix import queue as ops
from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for

pytestmark = pytest.mark.e2e

R451 = "host 127.0.0.1[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command)"
ACME = dict(id="acme", relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="a1", sender_domains=["acme.example"])
GLOBEX = dict(id="globex", relay_domain="globex.relay.test", signing_domain="hop.globex.test", selector="g1", sender_domains=["globex.example"])


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    keys = {"acme": rsa_key(2048), "globex": rsa_key(2048)}
    lab.add_tenant(TenantSpec(**ACME, key=keys["acme"], extra={"headers": {"envelope_sender": "bounces@acme.example"}}), Sink("acme"))
    lab.add_tenant(TenantSpec(**GLOBEX, key=keys["globex"]), Sink("globex"))
    for sink in lab.sinks.values():
        sink.reply = "451 4.3.0 try later"
    lab.overrides = {"tracking": {"events_dsn": f"sqlite:///{lab.base}/events.db"}}
    try:
        lab.start()
        for spec, n in ((ACME, 3), (GLOBEX, 2)):
            for i in range(n):
                sender = f"news@{spec['sender_domains'][0]}"
                raw = sign(make_message(sender, "alice@example.org", subject=f"{spec['id']} {i}"), keys[spec["id"]], spec["signing_domain"], spec["selector"])
                rcpts = [encode_recipient(a, spec["relay_domain"]) for a in ("alice@example.org", "bob@example.net")]
                code, text, _ = lab.send(raw, sender, rcpts)
                assert code == 250, text
        wait_for(lambda: deferred_count(lab) == 5, 60, what="5 deferred messages")
        yield lab
    finally:
        lab.destroy()


def deferred_count(lab: Lab) -> int:
    return sum(1 for m in lab.queue() if m["queue_name"] == "deferred" and m["recipients"][0].get("delay_reason"))


def by_sender(lab: Lab) -> dict[str, list[tuple[str, str]]]:
    """sender domain -> [(queue id, queue)], straight from postqueue."""
    out: dict[str, list[tuple[str, str]]] = {}
    for m in lab.queue():
        out.setdefault(m["sender"].rpartition("@")[2], []).append((m["queue_id"], m["queue_name"]))
    return out


def rc(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return lab.relayctl(*args, check=False)


def test_queue_json_groups_by_tenant_with_counts_and_reasons(lab):
    r = rc(lab, "queue", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["tenant"]: row for row in json.loads(r.stdout)}
    assert sorted(rows) == ["acme", "globex"]
    assert rows["acme"]["queues"] == {"active": 0, "deferred": 3, "hold": 0, "incoming": 0, "maildrop": 0}
    assert rows["globex"]["queues"]["deferred"] == 2 and rows["globex"]["total"] == 2
    assert rows["acme"]["top_deferral_reasons"] == [{"reason": R451, "messages": 3}]
    assert rows["globex"]["top_deferral_reasons"] == [{"reason": R451, "messages": 2}]
    assert 0 <= rows["acme"]["oldest_deferred_age_seconds"] < 600


def test_queue_table_for_one_tenant(lab):
    r = rc(lab, "queue", "--tenant", "globex")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:7] == ["TENANT", "ACTIVE", "DEFERRED", "HOLD", "INCOMING", "MAILDROP", "TOTAL"]
    assert lines[1].split()[:7] == ["globex", "0", "2", "0", "0", "0", "2"]
    assert lines[2].split(None, 2) == ["2", "x", R451]
    assert len(lines) == 3


def test_dry_run_changes_nothing(lab):
    before = by_sender(lab)
    r = rc(lab, "hold", "--tenant", "acme", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(q for q, _ in before["acme.example"])
    assert "would have held 3 message(s) of tenant acme" in r.stderr
    assert by_sender(lab) == before


def test_hold_then_release_only_the_tenants_messages(lab):
    before = by_sender(lab)
    r = rc(lab, "hold", "--tenant", "acme", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["action"], out["selected"], out["changed"]) == ("hold", 3, 3)
    after = by_sender(lab)
    assert sorted(after["acme.example"]) == sorted((q, "hold") for q, _ in before["acme.example"])
    assert after["globex.example"] == before["globex.example"]
    queue = {row["tenant"]: row for row in json.loads(rc(lab, "queue", "--json").stdout)}
    assert queue["acme"]["queues"]["hold"] == 3 and queue["acme"]["top_deferral_reasons"] == []

    r = rc(lab, "release", "--tenant", "acme")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "released 3 message(s) of tenant acme"
    assert by_sender(lab) == before


def test_nothing_to_release_exits_1(lab):
    r = rc(lab, "release", "--tenant", "globex", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["selected"] == 0
    assert "no messages of tenant globex in the hold queue" in r.stderr


def attempts(lab: Lab, qid: str) -> int:
    """Delivery attempts of ``qid`` through its tenant's transport, from the Postfix log."""
    return sum(1 for ln in lab.maillog_text().splitlines() if "/rc_" in ln and f" {qid}: to=<" in ln)  # hygiene: not a path (rc_<class>/smtp in a log line)


def test_requeue_retries_now_and_keeps_the_tenant_route(lab):
    before = by_sender(lab)
    ids = [q for q, _ in before["globex.example"]]
    counts = {q: attempts(lab, q) for q in ids}
    r = rc(lab, "requeue", "--tenant", "globex", "--yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "requeued 2 message(s) of tenant globex"
    # Same queue ids, one more attempt each (2 recipients) through globex's transport class: the route
    # survived. postsuper -r would have produced new ids on the "unrouted" transport.
    for q in ids:
        wait_for(lambda: attempts(lab, q) == counts[q] + 2, 20, what=f"a new attempt for {q}")
    wait_for(lambda: deferred_count(lab) == 5, 30, what="retried messages deferred again")
    assert by_sender(lab) == before
    assert "deferred transport" not in lab.maillog_text()
    assert [m["recipients"][0]["delay_reason"] for m in lab.queue()] == [R451] * 5


def test_requeue_refuses_held_messages(lab):
    r = rc(lab, "requeue", "--tenant", "acme", "--queue", "hold")
    assert r.returncode == 2
    assert "only deferred messages can be retried" in r.stderr


def test_unknown_tenant_is_a_configuration_error(lab):
    for args in (["hold", "--tenant", "initech", "--yes"], ["queue", "--tenant", "initech"]):
        r = rc(lab, *args)
        assert r.returncode == 3, r.stderr
        assert "unknown tenant 'initech' (configured: acme, globex" in r.stderr


def test_release_refuses_other_queues(lab):
    r = rc(lab, "release", "--tenant", "acme", "--queue", "deferred")
    assert r.returncode == 2
    assert "only messages in the hold queue can be released" in r.stderr


def test_postsuper_in_chunks_reports_progress(lab):
    queue = ops.attribute(ops.read_queue(lab.config_dir), load_tenants(lab.tenants_dir))
    ids = ops.select(queue, "acme", ["deferred"])
    assert len(ids) == 3
    seen: list[int] = []
    held = ops.apply_postsuper(lab.config_dir, "hold", ids, seen.append, queues=("deferred",), chunk=2)
    assert (held.requested, held.changed, seen) == (3, 3, [2, 1])
    # Asked again for the same ids in "deferred": they are in hold now, so nothing changes.
    again = ops.apply_postsuper(lab.config_dir, "hold", ids, queues=("deferred",))
    assert (again.requested, again.changed) == (3, 0)
    released = ops.apply_postsuper(lab.config_dir, "release", ids + ["NOSUCHQUEUEID"], queues=("hold",))
    assert (released.requested, released.changed) == (4, 3)
    assert wait_for(lambda: deferred_count(lab) == 5, 30, what="released messages deferred")


def test_postfix_unavailable_is_exit_4(lab, tmp_path):
    settings = tmp_path / "relay.yaml"
    settings.write_text(lab.settings_file.read_text().replace(str(lab.config_dir), str(tmp_path / "no-postfix")))
    r = subprocess.run(
        [*_relayctl_base(lab, settings), "queue"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 4, r.stderr
    assert f"postqueue -c {tmp_path / 'no-postfix'} -j failed" in r.stderr and "main.cf" in r.stderr


def test_queue_uses_the_store_before_the_sender_domain(lab):
    [qid, *_] = [q for q, _ in by_sender(lab)["globex.example"]]
    store = eventstore.open_store(f"sqlite:///{lab.base}/events.db")
    try:
        with store.transaction() as tx:
            tx.put_state("relay.lab.test", qid, {"tenant": "acme"})  # the tracker's word wins
        rows = {row["tenant"]: row for row in json.loads(rc(lab, "queue", "--json").stdout)}
        assert (rows["acme"]["total"], rows["globex"]["total"]) == (4, 1)
    finally:
        with store.transaction() as tx:
            tx.delete_state("relay.lab.test", qid)
        store.close()


def test_metrics_textfile(lab):
    eventstore.open_store(f"sqlite:///{lab.base}/events.db").close()  # what `relayctl track` creates
    out = lab.base / "textfile" / "relay.prom"
    out.parent.mkdir()
    r = rc(lab, "metrics", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert 'relay_queue_messages{tenant="acme",queue="deferred"} 3\n' in text
    assert 'relay_queue_messages{tenant="globex",queue="deferred"} 2\n' in text
    assert 'relay_queue_messages{tenant="globex",queue="hold"} 0\n' in text
    assert 'relay_webhook_backlog{tenant="acme"} 0\n' in text
    assert "# TYPE relay_events_total counter\n" in text
    assert 0 < float(text.split('relay_queue_oldest_deferred_seconds{tenant="acme"} ')[1].split()[0]) < 900


def _relayctl_base(lab: Lab, settings) -> list[str]:
    import sys

    return [sys.executable, "-m", "relay_milter.cli", "--tenants", str(lab.tenants_dir), "--settings", str(settings)]
