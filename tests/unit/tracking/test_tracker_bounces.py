"""The tracker and bounce tracking (issue 15 A): the milter's bounce_report lines become events
of the original message, the report message itself none; scripted real-format logs."""

from __future__ import annotations


from relay_milter.tracking.events import Kind

from unit.tracking.test_tracker import NODE, T0, Msg, env, ml, pf  # noqa: F401 (env is a fixture)


def report_lines(qid: str, orig: Msg, ts: float, reports: list[dict], forward: bool = False) -> list[tuple[str, str]]:
    """What the relay logs for a report to a VERP return path: smtpd, the milter's lines, and
    (when forwarded) its queueing and delivery to the tenant's smarthost."""
    lines = [("maillog", pf(ts, "smtpd", 3495, f"{qid}: client=mx.isp.test[192.0.2.9]"))]
    for r in reports:
        lines.append(("milter", ml(ts, qid, "bounce_report", tenant=orig.tenant, orig_queue_id=orig.qid, client="192.0.2.9",
                                   source="rfc3464", reporting_mta="mx.isp.test", message_id="<dsn.1@mx.isp.test>", **r)))
    lines.append(("milter", ml(ts, qid, "bounce_accepted", tenant=orig.tenant, report="rfc3464", reports=str(len(reports)))))
    if forward:
        lines += [
            ("maillog", pf(ts, "cleanup", 3499, f"{qid}: message-id=<dsn.1@mx.isp.test>")),
            ("maillog", pf(ts, "qmgr", 3493, f"{qid}: from=<>, size=3000, nrcpt=1 (queue active)")),
            ("maillog", pf(ts, f"relay_{orig.tenant}/smtp", 3600, f"{qid}: to=<dsn@acme.example>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.03, delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)")),
            ("maillog", pf(ts, "qmgr", 3493, f"{qid}: removed")),
        ]
    return lines


def delivered(m: Msg) -> list[tuple[str, str]]:
    return [m.milter(), *m.ingress(), m.queued(), *[m.delivery(r, "sent") for r in m.rcpts], m.removed()]


def test_a_dsn_becomes_bounced_async_of_the_original_message_and_the_report_no_event(env):
    m = Msg("4jf7q00MrMz2GWKy", "acme", ["alice@example.org"], upstream_id="job-7")
    env.write(delivered(m))
    assert env.run() == 2
    env.write(report_lines("4jf7q12b7zz2GWL1", m, T0 + 60, [
        {"kind": "BOUNCED", "rcpt": "alice@example.org", "status": "5.1.1", "action": "failed", "code": "550",
         "diagnostic": "550 5.1.1 user unknown", "remote_mta": "mx.example.org", "scope": "recipient"},
    ], forward=True))
    assert env.run() == 1  # the forwarded report itself is no tenant mail
    bounced = env.events()[-1]
    assert (bounced.kind, bounced.queue_id, bounced.tenant, bounced.recipient) == (Kind.BOUNCED, m.qid, "acme", "alice@example.org")
    assert (bounced.message_id, bounced.upstream_id, bounced.sender) == (m.message_id, "job-7", m.sender)
    assert bounced.original_recipient == "alice=example.org@acme.relay.test"
    assert (bounced.response_code, bounced.dsn, bounced.reason, bounced.relay) == ("550", "5.1.1", "550 5.1.1 user unknown", "mx.example.org")
    assert bounced.detail == {"async": True, "source": "rfc3464", "action": "failed", "reportingMta": "mx.isp.test",
                              "remoteMta": "mx.example.org", "reportQueueId": "4jf7q12b7zz2GWL1",
                              "reportMessageId": "<dsn.1@mx.isp.test>", "scope": "recipient"}
    assert env.store.outbox_backlog() == {"acme": 3}  # its webhook, in the same transaction
    with env.store.transaction() as tx:
        assert tx.all_state(NODE) == {}  # the forwarded report left no state behind


def test_per_message_token_reports_count_only_for_the_messages_recipients(env, caplog):
    m = Msg("4jf7q00MrMz2GWKz", "acme", ["a@example.org", "b@example.org"])
    env.write(delivered(m))
    assert env.run() == 4
    env.write(report_lines("4jf7q12b7zz2GWL2", m, T0 + 60, [
        {"kind": "DELAYED", "rcpt": "b@example.org", "status": "4.2.2", "action": "delayed", "scope": "message"},
        {"kind": "BOUNCED", "rcpt": "stranger@example.org", "status": "5.1.1", "action": "failed", "scope": "message"},
        {"kind": "COMPLAINED", "action": "abuse", "scope": "message"},  # no recipient named, two possible
    ]))
    assert env.run() == 2
    assert [(e.kind, e.recipient) for e in env.events()[-2:]] == [(Kind.DELAYED, "b@example.org"), (Kind.COMPLAINED, None)]
    assert "event=tracker_report_unmatched" in caplog.text and "rcpt=stranger@example.org" in caplog.text


def test_a_report_for_a_pruned_or_unknown_message_is_recorded_with_what_the_token_says(env):
    m = Msg("4jf7q00MrMz2GWK0", "globex", ["c@example.org"])  # never seen by this store
    env.write(report_lines("4jf7q12b7zz2GWL3", m, T0, [{"kind": "BOUNCED", "rcpt": "c@example.org", "scope": "recipient"}]))
    assert env.run() == 1
    [ev] = env.events()
    assert (ev.kind, ev.tenant, ev.queue_id, ev.recipient, ev.message_id) == (Kind.BOUNCED, "globex", m.qid, "c@example.org", None)
