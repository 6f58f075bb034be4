"""`relayctl key rotate TENANT`: a new hop key, with an overlap during which both are accepted.

A tenant accepts signatures by its current key (``selector``/``public_key``) and by every
entry of ``keys`` that is valid now (``not_before``/``not_after``). Rotation:

1. ``relayctl key rotate acme`` makes the new key pair, writes the private key (0600) for
   the platform, and prints the DNS TXT record and the tenant-file change: the new key
   becomes the current one, the old one moves to ``keys`` with ``not_after`` = now + overlap.
   With ``--write`` it makes that change in the tenant file itself.
2. Publish the TXT record (if the tenant's keys come from DNS), `relayctl check`, `relayctl apply`.
3. The platform switches to the new private key and selector, any time within the overlap.
4. After the overlap the old key is refused ("expired at ... (not_after)"); delete its entry.
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from relay_milter.cli.errors import ExitCode, fail

if TYPE_CHECKING:
    from relay_milter.cli.context import Context


def _duration(text: str) -> datetime.timedelta:
    units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise click.BadParameter(f"{text!r}: use a number and m, h, d or w (e.g. 7d)")
    return datetime.timedelta(seconds=int(text[:-1]) * units[text[-1]])


def generate(algorithm: str, bits: int) -> tuple[bytes, str]:
    """(private key PEM, DKIM TXT record)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, record


def _iso(dt: datetime.datetime) -> str:
    return dt.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group()
def key() -> None:
    """Hop keys (the DKIM keys the platform signs with for each tenant)."""


@key.command("rotate")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--selector", default=None, help="Selector of the new key (default: the old one's letters + today's date, e.g. r20261201).")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True)
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True, help="RSA key size.")
@click.option("--overlap", default="7d", show_default=True, help="How long the old key stays accepted (m, h, d, w).")
@click.option("--private-key-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the new private key (mode 0600; default ./TENANT-SELECTOR.key).")
@click.option("--write", is_flag=True, help="Edit the tenant file (rewrites it as plain YAML: comments are lost).")
@click.pass_obj
def rotate(obj: Context, tenant_id: str, selector: str | None, algorithm: str, bits: int, overlap: str,
           private_key_out: Path | None, write: bool) -> None:
    """Generate a new hop key for TENANT and print the DNS record and the steps.

    The new key becomes the tenant's current key; the old one stays accepted for
    --overlap (an entry in `keys` with `not_after`), so mail signed with either
    passes while the platform switches. Nothing is live before `relayctl apply`.

    \b
    Exit codes: 0 done, 1 the private key file exists, 2 usage error,
    3 invalid configuration or unknown tenant.
    """
    from relay_milter.config import HopKey

    tenants, _ = obj.load()
    t = tenants.by_id(tenant_id)
    if t is None:
        fail(ExitCode.CONFIG, f"unknown tenant {tenant_id!r} (configured: {', '.join(x.id for x in tenants)})")
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + _duration(overlap)
    selector = (selector or (t.selector.rstrip("0123456789-") or "k") + now.strftime("%Y%m%d")).lower()
    try:
        HopKey(selector=selector)
    except ValueError as exc:
        raise click.BadParameter(str(exc).splitlines()[-1], param_hint="--selector") from None
    if t.hop_key(selector) is not None:
        raise click.BadParameter(f"tenant {t.id} already has a key with selector {selector}", param_hint="--selector")
    out = private_key_out or Path(f"{t.id}-{selector}.key")
    if out.exists():
        fail(ExitCode.FAILED, f"{out} exists; choose another --private-key-out")
    pem, record = generate(algorithm, bits)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)

    pinned = t.public_key is not None
    old = {"selector": t.selector, **({"public_key": t.public_key} if pinned else {}), "not_after": _iso(until)}
    kept = [k.model_dump(mode="json", exclude_none=True) for k in t.keys if not (k.not_after and k.not_after <= now)]  # expired: dropped
    change = {"selector": selector, **({"public_key": record} if pinned else {}), "keys": [old, *kept]}
    source = tenants.sources[t.id]
    name = f"{selector}._domainkey.{t.signing_domain}"
    click.echo(f"new {algorithm} key for tenant {t.id}: selector {selector}; private key written to {out} (mode 0600)")
    click.echo("")
    click.echo("DNS TXT record" + (" (the tenant pins its keys; publish it for others to verify)" if pinned else " (publish it before `relayctl apply`):"))
    click.echo(f'  {name}. IN TXT "{record}"')
    click.echo("")
    if write:
        _write(source, t.id, change)
        click.echo(f"tenant file {source} updated:")
    else:
        click.echo(f"change in {source} (or rerun with --write):")
    click.echo("  " + yaml.safe_dump(change, sort_keys=False, width=10_000).replace("\n", "\n  ").rstrip())
    click.echo("")
    click.echo("steps:")
    steps = []
    if not pinned:
        steps.append(f"publish the TXT record above at {name}")
    if not write:
        steps.append(f"make the change above in {source}")
    steps += [
        "relayctl check && relayctl apply   (both keys are accepted from then on)",
        f"give {out} to the platform: sign tenant {t.id}'s mail with d={t.signing_domain} s={selector} (before {_iso(until)})",
        f"after {_iso(until)} signatures by s={t.selector} are refused; then delete that entry from `keys` and apply",
        f"delete {out} here once the platform has it",
    ]
    for n, step in enumerate(steps, 1):
        click.echo(f"  {n}. {step}")


def _write(path: Path, tenant_id: str, change: dict) -> None:
    """Apply ``change`` to the tenant's document in ``path`` (one tenant, a list, or tenants:)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    docs = data["tenants"] if isinstance(data, dict) and set(data) == {"tenants"} else data if isinstance(data, list) else [data]
    for doc in docs:
        if isinstance(doc, dict) and doc.get("id") == tenant_id:
            doc.update(change)
            if "public_key" not in change:
                doc.pop("public_key", None)
            break
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=10_000), encoding="utf-8")
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


COMMANDS: tuple[click.Command, ...] = (key,)
