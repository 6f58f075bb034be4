"""relayctl tenants | render | check | apply: validate the tenant files, render the Postfix
configuration, check it in a staging directory, install it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from relay_milter.cli.context import Context
from relay_milter.cli.errors import ExitCode, fail
from relay_milter.config import ConfigError

_TEMPLATES = click.option(
    "--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory."
)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def tenants(obj: Context, as_json: bool) -> None:
    """Validate the tenant files and list the tenants."""
    ts, _ = obj.load()
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") | {"source": str(ts.sources[t.id])} for t in ts], indent=2))
        return
    click.echo(f"{'TENANT':<16} {'RELAY DOMAIN':<32} {'SIGNING':<28} {'SMARTHOST':<28} TLS")
    for t in ts:
        click.echo(
            f"{t.id:<16} {t.relay_domain:<32} {t.signing_domain:<28} {t.smarthost.nexthop:<28} {t.smarthost.tls}"
        )


@click.command()
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output directory.")
@_TEMPLATES
@click.pass_obj
def render(obj: Context, out: Path, templates: Path | None) -> None:
    """Render main.cf, master.cf and the lookup tables into OUT (no checks, no install).

    OUT must be new or empty, and owned by you (root) without group or other write
    permission: the smarthost password tables are written there."""
    from relay_milter.postfix.render import UnsafeDirectory, render_files, write_files

    ts, settings = obj.load()
    files = render_files(ts, settings, templates)
    try:
        written = write_files(files, out, require_empty=True)
    except UnsafeDirectory as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    except OSError as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot write into {out}: {exc}")
    for path in written:
        click.echo(str(path))


@click.command()
@_TEMPLATES
@click.pass_obj
def check(obj: Context, templates: Path | None) -> None:
    """Validate tenants and settings, render into a staging directory and check it with Postfix.

    Runs `postconf -n` (any warning fails), `postconf -M`, a lookup of every
    tenant's route, and `postfix check`. Nothing live is touched.
    """
    from relay_milter.postfix.render import render_and_check

    ts, settings = obj.load()
    click.echo(f"tenants: {len(ts)} valid ({', '.join(t.id for t in ts)})")
    _, result = render_and_check(ts, settings, templates)
    if not result.ok:
        fail(ExitCode.CHECK_FAILED, "check failed: the staged configuration failed Postfix's checks", result.problems)
    click.echo("postfix: staged configuration passed postconf, route lookups and postfix check")


@click.command()
@_TEMPLATES
@click.option("--reload/--no-reload", default=True, show_default=True, help="Reload Postfix if it is running.")
@click.pass_obj
def apply(obj: Context, templates: Path | None, reload: bool) -> None:
    """Check the configuration in staging, then install it into the config directory and reload.

    If any check fails, nothing live changes (exit 4). Queued mail is kept:
    `postfix reload` re-reads the configuration without dropping the queue.
    """
    from relay_milter.postfix.render import install, postfix_running, reload_postfix, render_and_check

    ts, settings = obj.load()
    files, result = render_and_check(ts, settings, templates)
    if not result.ok:
        fail(ExitCode.CHECK_FAILED, "check failed, nothing was installed", result.problems)
    changed = install(files, settings)
    for name in changed:
        if name.endswith(" (removed)"):
            click.echo(f"removed {settings.config_directory / name.removesuffix(' (removed)')}")
        else:
            click.echo(f"installed {settings.config_directory / name}")
    if not changed:
        click.echo("configuration unchanged")
    elif reload and postfix_running(settings):
        try:
            reload_postfix(settings)
        except ConfigError as exc:  # the files are installed; Postfix did not take them
            fail(ExitCode.CHECK_FAILED, f"configuration installed, but {exc}")
        click.echo("postfix reloaded")


COMMANDS: tuple[click.Command, ...] = (tenants, render, check, apply)
