"""relayctl demo: the end-to-end demo on a private loopback lab."""

from __future__ import annotations

import click

from relay_milter.cli.errors import ExitCode


@click.command()
@click.option("--keep", is_flag=True, help="Leave the lab running until Ctrl-C (inspect it with postqueue -c).")
def demo(keep: bool) -> None:
    """Provision a private relay on loopback, send signed mail, show where it landed.

    Starts a private Postfix instance (its own config and queue under /var/tmp),
    the milter, a loopback DNS server and two customer smarthosts, then sends
    one good message per tenant and a few that must be refused. Exit 1 if any
    message did not end where it should.
    """
    from relay_milter.lab.demo import run_demo

    ok = run_demo(keep=keep) == 0
    raise SystemExit(int(ExitCode.OK if ok else ExitCode.FAILED))


COMMANDS: tuple[click.Command, ...] = (demo,)
