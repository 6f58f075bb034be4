"""relayctl user add | remove | list: submission users (SMTP AUTH on the submission listeners)."""

from __future__ import annotations

import json
import sys

import click

from relay_milter.cli.context import Context
from relay_milter.cli.errors import ExitCode, fail


@click.group()
def user() -> None:
    """Manage submission users (SMTP AUTH on the submission listeners).

    A user must first be listed in one tenant's `submission_users`; its password
    lives in the Cyrus sasldb (settings `sasl_database`). Passwords are read from
    standard input or a prompt, never from the command line, and never logged.
    """


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password (one line) from standard input.")
@click.option("--generate", is_flag=True, help="Generate a random password and print it once.")
@click.pass_obj
def user_add(obj: Context, name: str, password_stdin: bool, generate: bool) -> None:
    """Create user NAME, or set a new password for it."""
    import secrets

    from relay_milter.postfix.users import UserError, set_password

    ts, settings = obj.load()
    if password_stdin and generate:
        raise click.UsageError("--password-stdin and --generate exclude each other")
    if generate:
        password = secrets.token_urlsafe(24)
    elif password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        tenant = set_password(settings, ts, name, password)  # a user in no tenant: ConfigError, exit 3
    except UserError as exc:
        fail(ExitCode.FAILED, str(exc))
    click.echo(f"user {name} (tenant {tenant}) can now log in", err=generate)
    if generate:
        click.echo(password)


@user.command("remove")
@click.argument("name")
@click.pass_obj
def user_remove(obj: Context, name: str) -> None:
    """Delete user NAME's password: it can no longer log in."""
    from relay_milter.postfix.users import UserError, delete

    _, settings = obj.load()
    try:
        delete(settings, name)
    except UserError as exc:
        fail(ExitCode.FAILED, str(exc))
    click.echo(f"user {name} removed")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def user_list(obj: Context, as_json: bool) -> None:
    """List users with their tenant and state (active, no-password, orphaned)."""
    from relay_milter.postfix.users import UserError, status

    ts, settings = obj.load()
    try:
        rows = status(settings, ts)
    except UserError as exc:
        fail(ExitCode.FAILED, str(exc))
    if as_json:
        click.echo(json.dumps([{"user": r.user, "tenant": r.tenant, "state": r.state} for r in rows], indent=2))
        return
    click.echo(f"{'USER':<24} {'TENANT':<16} STATE")
    for r in rows:
        click.echo(f"{r.user:<24} {r.tenant or '-':<16} {r.state}")


COMMANDS: tuple[click.Command, ...] = (user,)
