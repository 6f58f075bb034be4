"""The loopback lab: a private Postfix instance with the real milter and tracker, loopback
DNS (dnsmasq), SMTP sinks standing in for customer smarthosts, the load generator and the
demo. Used by the demo, the end-to-end tests and the benchmarks; never by the relay itself.

The public names are re-exported here: ``from relay_milter.lab import Lab, Sink, sign``."""

from relay_milter.lab.harness import (
    DkimKey,
    DnsServer,
    Lab,
    Received,
    Sink,
    SinkHandler,
    TenantSpec,
    ed25519_key,
    free_port,
    make_message,
    port_open,
    rsa_key,
    sign,
    stop_process,
    wait_for,
)

__all__ = [
    "DkimKey", "DnsServer", "Lab", "Received", "Sink", "SinkHandler", "TenantSpec", "ed25519_key",
    "free_port", "make_message", "port_open", "rsa_key", "sign", "stop_process", "wait_for",
]
