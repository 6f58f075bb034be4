#!/usr/bin/env python3
"""Signature amplification: what 250 candidate hop signatures cost against one.

Issue 11, finding 2: a message with many DKIM-Signature fields carrying the tenant's
public d=/s= and a bogus bh= (no key needed) made dkimpy canonicalize and hash the
whole body once per signature. The milter now hashes a body at most once per
(body canonicalization, hash algorithm), and refuses more than ``max_hop_signatures``
candidates before any cryptography.

This measures the policy core the milter runs (``Policy.on_eom``: limits, DKIM, the
transformation), in process, CPU time (``time.process_time``), median of ``--repeat``
runs, on a ``--size`` body (default 2 MB, like the review):

  one            one valid signature (the baseline)
  bogus-bh-N     N signatures with the tenant's d=/s= and a random bh=, then the valid one,
                 with max_hop_signatures raised to N+1 so every one is examined
  copied-bh-N    the same with the message's real bh= (copied from a captured message)
                 and a bogus b=: never a body hash, but one signature check each (~1 ms
                 for RSA-2048 in dkimpy's pure Python), which no cache can save. Shown,
                 not gated: this is what the max_hop_signatures cap is for
  default-cap-N  N bogus signatures under the default max_hop_signatures (refused, 5.7.21)
  default-cap-copied-N  N copied-bh signatures under the default cap (refused, 5.7.21)

Exit status 0 when every gated case (bogus-bh-N and both default-cap-N) costs at most
``--max-ratio`` (2.0) times the baseline, 1 otherwise. Not a test: CPU time on a shared machine is noisy, so it
reports, it does not gate CI. Run it with the project's venv:

    .venv/bin/python bench/sigamp.py                 # 2 MB body, 250 signatures
    .venv/bin/python bench/sigamp.py --size 100000 --count 250 --repeat 9
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "milter"))

from relay_milter import defaults  # noqa: E402
from relay_milter.config import Settings, load_tenants  # noqa: E402
from relay_milter.core.policy import Message, Policy, Transaction  # noqa: E402
from relay_milter.lab.harness import make_message, rsa_key, sign  # noqa: E402

DOMAIN, SELECTOR, RCPT = "hop.acme.test", "s1", "<alice=example.org@acme.relay.test>"


def to_message(raw: bytes) -> Message:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[list[str]] = []
    for line in head.decode("ascii").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += "\r\n" + line
        else:
            name, _, value = line.partition(":")
            headers.append([name, value])
    return Message(tuple((n, v) for n, v in headers), body)


def policy(tmp: Path, key, max_hop_signatures: int) -> Policy:
    doc = {
        "id": "acme", "relay_domain": "acme.relay.test", "signing_domain": DOMAIN, "selector": SELECTOR,
        "public_key": key.txt, "allowed_sender_domains": ["acme.example"],
        "smarthost": {"host": "127.0.0.1", "port": 2525, "tls": "none"},
    }
    d = tmp / f"tenants-{max_hop_signatures}"
    d.mkdir(exist_ok=True)
    (d / "acme.yaml").write_text(yaml.safe_dump(doc))
    return Policy(load_tenants(d), Settings(myhostname="relay.test", max_hop_signatures=max_hop_signatures))


def forged(valid: bytes, count: int, real_bh: bool) -> bytes:
    """``count`` DKIM-Signature fields copied from the valid one, with a random bh=
    (or the real one) and a short bogus b=, above the valid signature."""
    sig, _, rest = valid.partition(b"\r\n")
    while rest[:1] in (b" ", b"\t"):  # the valid signature is folded
        line, _, rest = rest.partition(b"\r\n")
        sig += b"\r\n" + line
    tags = dict(t.strip().split(b"=", 1) for t in sig.split(b":", 1)[1].replace(b"\r\n", b"").split(b";") if b"=" in t)
    fields = []
    for _ in range(count):
        t = dict(tags)
        if not real_bh:
            t[b"bh"] = base64.b64encode(os.urandom(32))
        t[b"b"] = base64.b64encode(os.urandom(12))
        # The shortest h= that still passes the tag checks, so 250 fit the 64 KiB header limit.
        t[b"h"] = b"from:to:subject:message-id:mime-version:content-type"
        fields.append(b"DKIM-Signature: " + b"; ".join(k + b"=" + v.replace(b" ", b"").replace(b"\t", b"") for k, v in t.items()))
    return b"\r\n".join(fields) + b"\r\n" + valid


def cost(p: Policy, raw: bytes, repeat: int, want: str) -> float:
    msg = to_message(raw)
    times = []
    for _ in range(repeat):
        tx = Transaction(client_ip="127.0.0.1")
        p.on_mail(tx, "<news@acme.example>")
        assert p.on_rcpt(tx, RCPT).ok
        start = time.process_time()
        d = p.on_eom(tx, msg)
        times.append(time.process_time() - start)
        got = d.verdict.action.value
        if got != want:
            raise SystemExit(f"unexpected verdict {d.verdict} (wanted {want})")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2_000_000, help="body size in bytes (default 2000000)")
    ap.add_argument("--count", type=int, default=250, help="candidate signatures (default 250)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case; the median counts (default 5)")
    ap.add_argument("--max-ratio", type=float, default=2.0, help="allowed cost against one signature (default 2.0)")
    args = ap.parse_args()

    key = rsa_key(2048)
    line = ("The quick brown fox jumps over the lazy dog 0123456789 " * 2)[:76] + "\r\n"
    body = (line * (args.size // len(line) + 1))[: args.size]
    valid = sign(make_message("news@acme.example", "alice@example.org", body=body), key, DOMAIN, SELECTOR)
    with tempfile.TemporaryDirectory() as tmp:
        wide = policy(Path(tmp), key, args.count + 1)
        default = policy(Path(tmp), key, defaults.MAX_HOP_SIGNATURES)
        base = cost(wide, valid, args.repeat, "accept")
        bogus, copied = forged(valid, args.count, False), forged(valid, args.count, True)
        rows = [("one", base, "accept", True)]
        rows.append((f"bogus-bh-{args.count}", cost(wide, bogus, args.repeat, "accept"), "accept", True))
        rows.append((f"copied-bh-{args.count}", cost(wide, copied, args.repeat, "accept"), "accept", False))
        rows.append((f"default-cap-{args.count}", cost(default, bogus, args.repeat, "reject"), "reject (5.7.21)", True))
        rows.append((f"default-cap-copied-{args.count}", cost(default, copied, args.repeat, "reject"), "reject (5.7.21)", True))
    print(f"body {args.size} bytes, RSA-2048, relaxed/relaxed, median of {args.repeat}, CPU ms per message")
    print(f"{'case':<24} {'verdict':<16} {'CPU ms':>9} {'x one':>7}")
    ok = True
    for name, seconds, verdict, gated in rows:
        ratio = seconds / base
        ok &= ratio <= args.max_ratio or not gated
        print(f"{name:<24} {verdict:<16} {seconds * 1000:9.1f} {ratio:7.2f}{'' if gated else '  (not gated)'}")
    print("ok: every case within %.1fx of one signature" % args.max_ratio if ok else "FAIL: a case costs more than %.1fx" % args.max_ratio)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
