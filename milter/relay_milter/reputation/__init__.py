"""Sender reputation I/O: DNS lookups (blocklists, FCrDNS), the state file, the checks
that talk to the network and the operator alerts (webhook, notice mail, metrics file).

What the answers mean and what to do about them is decided in ``core/reputation.py``
(pure); ``cli/reputation.py`` runs the two together and records the events in the event
store."""
