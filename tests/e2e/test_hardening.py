"""Issue 19 against a real lab: hostile header text in the milter log, what a local user can
see and do, and the AUTH rate limit.

- a Message-ID with terminal escape sequences and an X-Upstream-ID with a control character,
  sent to 3 recipients: the milter log holds them escaped, and the tracker records all 3;
- the lab's base directory (event store, logs, settings, secrets) is root only;
- a local user may neither list nor flush the queue (``authorized_mailq_users``,
  ``authorized_flush_users``);
- ``smtpd_client_auth_rate_limit`` stops password guessing on the submission port.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import smtplib
import ssl
import subprocess

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store

pytestmark = pytest.mark.e2e

AUTH_LIMIT = 3


@pytest.fixture(scope="module")
def hlab():
    lab = Lab()
    lab.add_tenant(
        TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", rsa_key(2048), ["acme.example"],
                   extra={"submission_users": ["app1"]}),
        Sink("acme"), tls="none",
    )
    lab.overrides = {"smtpd_client_auth_rate_limit": AUTH_LIMIT}
    try:
        lab.start()
        # Loopback is in mynetworks, which Postfix exempts from client rate limits by
        # default; the lab's clients are all on loopback, so lift the exemption here.
        subprocess.run(["postconf", "-c", str(lab.config_dir), "-e", "smtpd_client_event_limit_exceptions="],
                       check=True, capture_output=True)
        subprocess.run(["postfix", "-c", str(lab.config_dir), "reload"], check=True, capture_output=True)
        lab.start_tracker()
        yield lab
    finally:
        lab.destroy()


def test_hostile_message_id_and_upstream_id_are_escaped_and_every_recipient_tracked(hlab):
    spec = hlab.tenants["acme"]
    nonce = secrets.token_hex(6)
    rcpts = [f"{name}-{nonce}@example.org" for name in ("alice", "bob", "carol")]
    encoded = [encode_recipient(r, spec.relay_domain) for r in rcpts]
    message_id = f"<\x1b]0;owned\x07\x1b[2J\x1b[31mmid-{nonce}@platform.example>"
    upstream_id = f"job\x01-{nonce}"
    msg = make_message("news@acme.example", ", ".join(encoded), subject=f"hostile ids {nonce}", message_id=message_id,
                       extra_headers=(("X-Upstream-ID", upstream_id),))
    code, text, _ = hlab.send(sign(msg, spec.key, spec.signing_domain, spec.selector), "news@acme.example", encoded)
    assert code == 250, text

    line = wait_for(lambda: next((ln for ln in hlab.milter_log_text().splitlines()
                                  if "event=accepted" in ln and nonce in ln), None), 30, what="the milter's record")
    qid = re.search(r"INFO (\w+): event=accepted", line).group(1)
    log = hlab.milter_log_text()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", log)  # no raw control character anywhere
    assert f"\\\\x1b]0;owned\\\\x07\\\\x1b[2J\\\\x1b[31mmid-{nonce}@platform.example" in line
    assert f'upstream_id="job\\\\x01-{nonce}"' in line

    def received():
        store = open_store(hlab.events_dsn)
        try:
            evs = [e for e in store.trace(qid) if e.kind is Kind.RECEIVED]
        finally:
            store.close()
        return evs if len(evs) >= 3 else None

    evs = wait_for(received, 40, interval=0.3, what=f"3 RECEIVED events for {qid}")
    assert sorted(e.recipient for e in evs) == sorted(rcpts)
    assert {e.upstream_id for e in evs} == {f"job\\x01-{nonce}"}
    assert all("\x1b" not in (e.message_id or "") for e in evs)
    assert all(f"mid-{nonce}@platform.example" in (e.message_id or "") for e in evs)
    # And the message itself went out once, to all three.
    got = wait_for(lambda: [m for m in hlab.sinks["acme"].messages if nonce in m.content.decode(errors="replace")], 30,
                   what="delivery")
    assert sorted(got[0].rcpt_tos) == sorted(rcpts) and len(got) == 1


def test_lab_base_is_root_only(hlab, tmp_path):
    assert os.stat(hlab.base).st_mode & 0o777 == 0o700
    private = [hlab.base / "events.db", hlab.milter_log, hlab.maillog, hlab.tracker_log, hlab.secrets_file, hlab.settings_file]
    for path in private:
        assert path.exists() and hlab.base in path.parents, path
    for path in (hlab.base, *private):
        r = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r.stderr)
    # The Postfix instance is outside it and, like /etc/postfix, readable (main.cf has no secret).
    assert hlab.base not in hlab.config_dir.parents


def _postqueue_as_nobody(lab: Lab, tmp_path, flag: str) -> subprocess.CompletedProcess:
    """postqueue as an unprivileged user. Postfix lets a non-root user name a private config
    directory only if the default main.cf lists it: a private mount namespace supplies that
    main.cf; the system's /etc/postfix is not touched."""
    etc = tmp_path / "etc-postfix"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text(f"alternate_config_directories = {lab.config_dir}\ncompatibility_level = 3.6\n")
    os.chmod(tmp_path, 0o755)
    script = f"mount --bind {etc} /etc/postfix && exec runuser -u nobody -- /usr/sbin/postqueue -c {lab.config_dir} {flag}"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.allow_log(r"postfix/postqueue\[\d+\]: fatal: User nobody\(65534\) is not allowed to (view|flush) the mail queue")
def test_local_user_can_neither_list_nor_flush_the_queue(hlab, tmp_path):
    r = _postqueue_as_nobody(hlab, tmp_path, "-p")
    assert r.returncode != 0 and "is not allowed to view the mail queue" in r.stderr, r.stderr
    r = _postqueue_as_nobody(hlab, tmp_path, "-f")
    assert r.returncode != 0 and "is not allowed to flush the mail queue" in r.stderr, r.stderr
    root = subprocess.run(["postqueue", "-c", str(hlab.config_dir), "-p"], capture_output=True, text=True, timeout=30)
    assert root.returncode == 0
    # Why the template says "root" and not "static:root": a static: table answers for
    # every user, so it would let nobody list the queue.
    postconf = ["postconf", "-c", str(hlab.config_dir)]
    subprocess.run([*postconf, "-e", "authorized_mailq_users=static:root"], check=True, capture_output=True)
    try:
        r = _postqueue_as_nobody(hlab, tmp_path, "-p")
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run([*postconf, "-e", "authorized_mailq_users=root"], check=True, capture_output=True)
    assert _postqueue_as_nobody(hlab, tmp_path, "-p").returncode != 0


def test_auth_commands_are_rate_limited(hlab):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the lab's relay certificate is self-signed
    replies = []
    with smtplib.SMTP("127.0.0.1", hlab.submission_port, local_hostname="guesser.lab.test", timeout=60) as s:
        s.starttls(context=ctx)
        s.ehlo("guesser.lab.test")
        for n in range(AUTH_LIMIT + 1):
            token = base64.b64encode(f"\0app1\0wrong-{n}".encode()).decode()
            code, text = s.docmd("AUTH", f"PLAIN {token}")
            replies.append((code, text.decode(errors="replace")))
            if code < 500:
                break
    assert [c for c, _ in replies[:AUTH_LIMIT]] == [535] * AUTH_LIMIT, replies
    code, text = replies[AUTH_LIMIT]
    assert 400 <= code < 500 and "too many AUTH commands" in text, replies
    # postlogd writes the line after the reply went out: wait for it, do not race it
    wait_for(lambda: re.search(rf"warning: AUTH command rate limit exceeded: {AUTH_LIMIT + 1} from localhost\[127.0.0.1\]",
                               hlab.maillog_text()), 30, what="the AUTH rate-limit warning in the mail log")
