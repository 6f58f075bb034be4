#!/usr/bin/env python3
"""Regenerate tests/data/maillog.sample and tests/data/milter.log.sample from a real lab run.

Run as root from the repository (``.venv/bin/python scripts/make-sample-logs.py``). It starts
the loopback lab (private Postfix, the milter, aiosmtpd smarthosts, dnsmasq), sends mail that
produces every record kind the tracker reads (TLS delivery to two recipients, a plain
delivery, a 4xx deferral then delivery, a 5xx bounce with its bounce notice, a milter reject,
a milter RCPT reject, a Postfix RCPT reject), waits for each outcome in the maillog and copies both logs. Lab data only:
keys are generated for the run and not written to the samples.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> int:
    lab = Lab()
    try:
        acme_key, globex_key = rsa_key(2048), rsa_key(2048)
        lab.add_tenant(
            TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", acme_key, ["acme.example"]),
            Sink("acme", tls=lab.smarthost_cert("mx.acme.test")),
            tls="verify", ca_file=str(lab.ca_file), tls_match="mx.acme.test",
        )
        lab.add_tenant(TenantSpec("globex", "globex.relay.test", "hop.globex.test", "s1", globex_key, ["globex.example"]), Sink("globex"), tls="none")
        lab.start()
        log = lab.maillog_text

        def send(tenant: str, key, rcpts: list[str], subject: str, want: int) -> str:
            spec = lab.tenants[tenant]
            sender = f"news@{spec.sender_domains[0]}"
            encoded = [encode_recipient(r, spec.relay_domain) for r in rcpts]
            mid = f"<{subject.replace(' ', '-')}@platform.example>"
            msg = make_message(sender, ", ".join(encoded), subject=subject, message_id=mid,
                               extra_headers=(("X-Upstream-ID", f"job-{subject.replace(' ', '-')}"),))
            code, text, _ = lab.send(sign(msg, key, spec.signing_domain, spec.selector) if key else msg, sender, encoded)
            assert code == want, (subject, code, text)
            return mid

        def qid_of(mid: str) -> str:
            return wait_for(lambda: re.search(rf"(\w+): message-id={re.escape(mid)}", log()), 20, what=mid).group(1)

        def wait_line(pattern: str) -> re.Match:
            return wait_for(lambda: re.search(pattern, log()), 30, interval=0.2, what=pattern)

        q1 = qid_of(send("acme", acme_key, ["alice@example.org", "bob@example.net"], "two recipients over TLS", 250))
        wait_line(rf"{q1}: removed")
        q2 = qid_of(send("globex", globex_key, ["carol@example.org"], "plain delivery", 250))
        wait_line(rf"{q2}: removed")
        sink = lab.sinks["globex"]
        sink.reply = "451 4.3.0 mailbox busy, try later"
        q3 = qid_of(send("globex", globex_key, ["dave@example.org"], "deferred then relayed", 250))
        wait_line(rf"{q3}: to=<dave@example.org>.*status=deferred")
        sink.reply = "250 2.0.0 Ok: queued"
        lab.flush()
        wait_line(rf"{q3}: removed")
        sink.reply = "550 5.1.1 no such user here"
        q4 = qid_of(send("globex", globex_key, ["erin@example.org"], "hard bounce", 250))
        notice = wait_line(rf"{q4}: sender non-delivery notification: (\w+)").group(1)
        wait_line(rf"{notice}: removed")
        sink.reply = "250 2.0.0 Ok: queued"
        send("acme", None, ["frank@example.org"], "unsigned", 550)
        wait_line(r"milter-reject: END-OF-MESSAGE")
        bad = "no-separator@globex.relay.test"
        code, _, _ = lab.send(make_message("news@globex.example", bad), "news@globex.example", [bad])
        assert code == 550, code
        wait_line(r"NOQUEUE: milter-reject: RCPT")
        code, _, _ = lab.send(make_message("news@globex.example", "x@elsewhere.test"), "news@globex.example", ["x@elsewhere.test"])
        assert code >= 500, code  # not a relay domain: Postfix itself refuses it
        wait_line(r"NOQUEUE: reject: RCPT")
        wait_for(lambda: "event=reject" in lab.milter_log_text(), 10, what="milter reject record")
        shutil.copyfile(lab.maillog, OUT / "maillog.sample")
        shutil.copyfile(lab.milter_log, OUT / "milter.log.sample")
        print(f"wrote {OUT / 'maillog.sample'} and {OUT / 'milter.log.sample'}")
        return 0
    finally:
        lab.destroy()


if __name__ == "__main__":
    sys.exit(main())
