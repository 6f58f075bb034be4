"""relayctl, the operator command line: one module per command group."""

from relay_milter.cli.app import main

__all__ = ["main"]
