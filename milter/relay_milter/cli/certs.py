"""relayctl cert selfsigned: the relay's own STARTTLS certificate."""

from __future__ import annotations

from pathlib import Path

import click

from relay_milter.cli.context import Context
from relay_milter.cli.errors import ExitCode, fail


@click.group()
def cert() -> None:
    """Certificates for the relay's own STARTTLS."""


@cert.command("selfsigned")
@click.option("--name", "names", multiple=True, help="DNS name or IP (repeatable; default: myhostname).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--cert", "cert_path", type=click.Path(path_type=Path, dir_okay=False), help="Default: settings tls_cert_file.")
@click.option("--key", "key_path", type=click.Path(path_type=Path, dir_okay=False), help="Default: settings tls_key_file.")
@click.option("--force", is_flag=True, help="Replace existing files.")
@click.pass_obj
def cert_selfsigned(obj: Context, names: tuple[str, ...], days: int, cert_path: Path | None, key_path: Path | None, force: bool) -> None:
    """Write a self-signed certificate and key (key mode 0600) for the relay's STARTTLS.

    For a first start or a lab. Clients cannot verify it: replace it with one
    from your CA and run `postfix reload`.
    """
    from relay_milter.postfix.certs import make_cert

    settings = obj.load_settings()
    cert_path, key_path = cert_path or settings.tls_cert_file, key_path or settings.tls_key_file
    if cert_path is None or key_path is None:
        fail(ExitCode.CONFIG, "give --cert and --key, or set tls_cert_file and tls_key_file in the settings")
    if not force and (cert_path.exists() or key_path.exists()):
        fail(ExitCode.FAILED, f"{cert_path} or {key_path} exists (use --force to replace it)")
    try:
        make_cert(list(names) or [settings.myhostname], days=days).write(cert_path, key_path)
    except OSError as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot write {cert_path} and {key_path}: {exc}")
    click.echo(f"wrote {cert_path} and {key_path} (key mode 0600)")


COMMANDS: tuple[click.Command, ...] = (cert,)
