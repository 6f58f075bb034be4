"""``python -m relay_milter.cli`` runs relayctl."""

from relay_milter.cli.app import main

main()
