"""relayctl: the ``relayctl`` command group, assembled from one module per command group.

    configure  tenants, render, check, apply
    services   milter, track, web
    users      user add | remove | list
    certs      cert selfsigned
    tracking   trace, queue, stats, requeue, hold, release, metrics
    status     status (Nagios exit codes)
    keys       key rotate
    history    events, webhooks replay, prune, backup
    demo       demo
    reputation ip list | failover | restore, reputation check | watch
    drain      drain, undrain

Shared by all of them: ``context`` (global options, the event store; ``lastgood`` behind
it, the applied tenant set for operator commands), ``formats`` (time arguments, event
tables) and ``errors`` (the exit-code table and ``fail()``). ``operator`` and ``probe``
are helpers of check and apply. Command modules import those, never this one, so there
is no import cycle (pyproject.toml's import-linter contract holds the layers).
"""

from __future__ import annotations

from pathlib import Path

import click

from relay_milter import __version__
from relay_milter.cli import certs, configure, demo, drain, history, keys, reputation, services, status, tracking, users
from relay_milter.cli.context import DEFAULT_SETTINGS, DEFAULT_TENANTS, Context
from relay_milter.cli.errors import NAGIOS_NOTE, reported, table


class RelayctlGroup(click.Group):
    """Every command runs under ``cli.errors.reported``: an escaping ConfigError exits 3,
    any other unexpected exception exits 5 with its traceback."""

    def invoke(self, ctx: click.Context):
        with reported():
            return super().invoke(ctx)


EPILOG = (
    "\b\nExit codes (stable, for scripts):\n" + "\n".join(table())
    + "\n\n\b\n" + "\n".join(NAGIOS_NOTE)
    + "\n\n\b\nEnvironment:\n"
    "  RELAY_TENANTS     tenant directory (as --tenants)\n"
    "  RELAY_SETTINGS    settings file (as --settings)\n"
    "  RELAY_EVENTS_DSN  event store DSN; wins over settings tracking.events_dsn\n"
    "  RELAY_TEMPLATES   Postfix template directory (as check/apply --templates)\n"
    "`relayctl demo --keep` prints the export line that points relayctl at its lab."
)


@click.group(
    cls=RelayctlGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.version_option(__version__, prog_name="relayctl")
@click.option(
    "--tenants",
    "tenants_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_TENANTS,
    envvar="RELAY_TENANTS",
    show_default=True,
    help="Directory of tenant YAML files.",
)
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="RELAY_SETTINGS",
    help=f"Relay settings YAML (default: {DEFAULT_SETTINGS} if it exists, else built-in defaults).",
)
@click.pass_context
def main(ctx: click.Context, tenants_dir: Path, settings_file: Path | None) -> None:
    """Operate the multi-tenant mail relay.

    Typical use: edit a tenant file, then `relayctl check` and `relayctl apply`
    (a tenant change is live only once apply has checked it); `relayctl status`
    for health.
    """
    if settings_file is None and Path(DEFAULT_SETTINGS).is_file():
        settings_file = Path(DEFAULT_SETTINGS)
    ctx.obj = Context(tenants_dir, settings_file)


for _module in (configure, services, users, certs, tracking, history, status, keys, reputation, demo, drain):
    for _command in _module.COMMANDS:
        main.add_command(_command)
