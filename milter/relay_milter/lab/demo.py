"""`relayctl demo`: the whole relay on loopback, real signed mail, and where it went."""

from __future__ import annotations

import re
import secrets
import signal
import time

import click

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab.harness import Lab, Sink, TenantSpec, ed25519_key, make_message, rsa_key, sign, wait_for


def _step(n: int, total: int, text: str) -> None:
    click.secho(f"[{n}/{total}] {text}", bold=True)


def _queue_id(lab: Lab, message_id: str) -> str | None:
    m = re.search(r"(\w+): message-id=" + re.escape(message_id), lab.maillog_text())
    return m.group(1) if m else None


def _show_trace(lab: Lab, label: str, mid: str, final: str) -> bool:
    """Wait for the tracker to record the message's final event, then show `relayctl trace`."""
    try:
        wait_for(lambda: final in lab.relayctl("trace", mid, check=False).stdout, 30, interval=0.5, what=f"{final} for {mid}")
    except TimeoutError:
        click.secho(f"  {label}: no {final} event recorded", fg="red")
        return False
    click.secho(f"  {label}:  relayctl trace '{mid}'", fg="cyan")
    for line in lab.relayctl("trace", mid).stdout.rstrip().splitlines():
        click.echo(f"      {line}")
    return True


def run_demo(keep: bool = False) -> int:
    total = 7
    lab = Lab()
    ok = True
    try:
        _step(1, total, f"Generating tenant keys and definitions in {lab.tenants_dir}")
        acme_key, globex_key = rsa_key(2048), ed25519_key()
        lab.add_tenant(
            TenantSpec(
                "acme", "acme.relay.demo.test", "hop.acme.demo.test", "relay2026", acme_key, ["acme.example"],
                extra={
                    "headers": {"strip": ["X-Platform-Trace"], "reply_to": "replies@acme.example", "envelope_sender": "bounces@acme.example"},
                    "submission_users": ["crm-app"],
                },
                allow_bcc=None,  # the default: recipients bound to the signed To/Cc
            ),
            Sink("acme-smarthost", tls=lab.smarthost_cert("mx.acme.demo.test")),
            tls="verify", ca_file=str(lab.ca_file), tls_match="mx.acme.demo.test",
        )
        lab.add_tenant(
            TenantSpec("globex", "globex.relay.demo.test", "hop.globex.demo.test", "s1", globex_key, ["globex.example"], pin_key=False, allow_bcc=None),
            Sink("globex-smarthost"),
        )
        click.echo("  acme:   RSA-2048 key pinned in the tenant file; smarthost " f"127.0.0.1:{lab.sinks['acme'].port} (TLS, verified against a demo CA)")
        click.echo("          submission user crm-app (SMTP AUTH after STARTTLS)")
        click.echo("  globex: ed25519 key published in DNS (dnsmasq on loopback); smarthost " f"127.0.0.1:{lab.sinks['globex'].port}")

        _step(2, total, "Starting DNS, rendering + checking + installing Postfix config, starting milter and Postfix")
        lab.start()
        click.echo(f"  private Postfix instance: postfix -c {lab.config_dir}  (smtpd on 127.0.0.1:{lab.smtp_port})")
        click.echo(f"  submission (STARTTLS + AUTH): 127.0.0.1:{lab.submission_port}")
        click.echo(f"  milter: unix:{lab.milter_socket}")
        lab.start_tracker()
        click.echo(f"  tracker: relayctl track -> event store {lab.events_dsn}")
        password = secrets.token_urlsafe(18)
        lab.add_user("crm-app", password)
        click.echo("  relayctl user add crm-app --password-stdin   (password generated for this run)")

        _step(3, total, "Sending mail as the platform would")
        cases = []
        m1 = make_message("news@acme.example", encode_recipient("alice@example.org", "acme.relay.demo.test"), subject="Your March invoice", extra_headers=(("X-Platform-Trace", "campaign-42"),))
        cases.append(("acme, signed", sign(m1, acme_key, "hop.acme.demo.test", "relay2026"), "news@acme.example", "alice@example.org", "acme.relay.demo.test", 250))
        m2 = make_message("support@globex.example", "bob@example.net", subject="Ticket #1234 updated")
        cases.append(("globex, signed (ed25519, key from DNS)", sign(m2, globex_key, "hop.globex.demo.test", "s1"), "support@globex.example", "bob@example.net", "globex.relay.demo.test", 250))
        m3 = make_message("news@acme.example", "carol@example.org", subject="unsigned")
        cases.append(("acme, unsigned", m3, "news@acme.example", "carol@example.org", "acme.relay.demo.test", 550))
        m4 = make_message("news@acme.example", "dave@example.org", subject="cross-tenant")
        cases.append(("globex signature, acme relay domain", sign(m4, globex_key, "hop.globex.demo.test", "s1"), "news@acme.example", "dave@example.org", "acme.relay.demo.test", 550))
        sent = []
        for label, raw, sender, rcpt, relay, want in cases:
            code, text, _ = lab.send(raw, sender, [encode_recipient(rcpt, relay)])
            good = code == want
            ok &= good
            colour = "green" if good else "red"
            click.echo(f"  {label:<40} RCPT TO:<{encode_recipient(rcpt, relay)}>")
            click.secho(f"      -> {code} {text}", fg=colour)
            if code == 250:
                mid = re.search(rb"Message-ID: (<[^>]+>)", raw).group(1).decode()
                sent.append((label, mid))

        for label, user, pw, want in (
            ("crm-app, SMTP AUTH on the submission port", "crm-app", password, 250),
            ("crm-app, wrong password", "crm-app", "not-" + password, 535),
        ):
            m5 = make_message("billing@acme.example", "erin@example.org", subject="Receipt 2026-0042")
            code, text, _ = lab.submit(m5, "billing@acme.example", ["erin@example.org"], user, pw)
            good = code == want
            ok &= good
            click.echo(f"  {label:<40} AUTH {user}, RCPT TO:<erin@example.org>")
            click.secho(f"      -> {code} {text}", fg="green" if good else "red")
            if code == 250:
                sent.append((label, re.search(rb"Message-ID: (<[^>]+>)", m5).group(1).decode()))

        _step(4, total, "Where the accepted mail landed")
        for name, count in (("acme", 2), ("globex", 1)):
            try:
                lab.sinks[name].wait(count, timeout=30)
            except TimeoutError:
                ok = False
        for name, sink in lab.sinks.items():
            for msg in sink.messages:
                click.secho(f"  smarthost {sink.name} (127.0.0.1:{sink.port}) received:", fg="cyan")
                click.echo(f"      MAIL FROM:<{msg.mail_from}>  RCPT TO:{', '.join('<' + r + '>' for r in msg.rcpt_tos)}")
                if msg.tls:
                    click.echo(f"      over {msg.tls[1]} with {msg.tls[0]}")
                head = msg.content.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
                for line in head.splitlines():
                    click.echo(f"      | {line}")
        ok &= len(lab.sinks["acme"].messages) == 2 and len(lab.sinks["globex"].messages) == 1

        _step(5, total, "Log lines, by Postfix queue id (Postfix maillog and milter log)")
        time.sleep(0.5)
        for label, mid in sent:
            qid = _queue_id(lab, mid)
            click.secho(f"  {label}: queue id {qid}", fg="cyan")
            for line in (lab.maillog_text() + lab.milter_log_text()).splitlines():
                if qid and qid in line:
                    click.echo(f"      {line}")
        click.secho("  rejections:", fg="cyan")
        for line in lab.milter_log_text().splitlines():
            if "event=reject" in line:
                click.echo(f"      {line}")

        _step(6, total, "Delivery history from the event store (relayctl trace)")
        for label, mid in sent:
            ok &= _show_trace(lab, label, mid, "RELAYED")
        for label, raw, *_rest, want in cases:
            if want != 250:
                ok &= _show_trace(lab, label, re.search(rb"Message-ID: (<[^>]+>)", raw).group(1).decode(), "REJECTED")

        _step(7, total, "Queue (postqueue -p): nothing stuck")
        out = __import__("subprocess").run(["postqueue", "-c", str(lab.config_dir), "-p"], capture_output=True, text=True).stdout
        click.echo("      " + (out.strip() or "(empty)").replace("\n", "\n      "))

        if keep:
            click.secho(f"\nThe lab keeps running under {lab.base} (root only) and {lab.instance} (Postfix). Try:", bold=True)
            click.echo(f"  postqueue -c {lab.config_dir} -p")
            click.echo(f"  swaks --server 127.0.0.1:{lab.smtp_port} --to x=example.org@acme.relay.demo.test   # unsigned: 550")
            click.echo(f"  tail -f {lab.maillog} {lab.milter_log}")
            click.echo("Ctrl-C stops it.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    finally:
        lab.destroy()
    click.secho("\ndemo: all expectations met" if ok else "\ndemo: some expectations were NOT met", fg="green" if ok else "red", bold=True)
    return 0 if ok else 1
