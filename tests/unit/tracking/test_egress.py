"""Webhook egress (issue 19, finding 8): public addresses only unless allowlisted, checked on
the address connected to; a total deadline per request; the status, not the body, stored.

Real sockets on loopback throughout: the webhook receiver, and a server that answers one
byte at a time."""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from relay_milter.config import ConfigError, Settings, TenantSecrets, TrackingSettings, load_settings
from relay_milter.tracking.egress import address_problem
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import WebhookSender, post, record_event
from support.factories import tenant, tenant_set
from support.webhook_receiver import WebhookReceiver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
HEADERS = {"Content-Type": "application/json"}


@pytest.mark.parametrize("address,why", [
    ("127.0.0.1", "loopback"),
    ("127.9.9.9", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("100.64.0.1", "not a global"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("255.255.255.255", "private"),
    ("::ffff:127.0.0.1", "wraps 127.0.0.1, a loopback"),
    ("::ffff:169.254.169.254", "wraps 169.254.169.254, a link-local"),
    ("64:ff9b::a9fe:a9fe", "wraps 169.254.169.254, a link-local"),
    ("2002:7f00:1::", "wraps 127.0.0.1, a loopback"),
])
def test_internal_addresses_are_refused(address, why):
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and why in problem


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1::1", "1.1.1.1", "::ffff:93.184.216.34"])
def test_public_addresses_are_allowed(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_allowlist_allows_exactly_its_networks():
    allow = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.20.0.0/16"))
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), allow) is None
    assert address_problem(ipaddress.ip_address("10.20.3.4"), allow) is None
    assert "private" in address_problem(ipaddress.ip_address("10.21.0.1"), allow)
    assert "loopback" in address_problem(ipaddress.ip_address("::1"), allow)
    assert "link-local" in address_problem(ipaddress.ip_address("169.254.169.254"), allow)


def test_allowlist_is_a_typed_setting(tmp_path):
    p = tmp_path / "relay.yaml"
    p.write_text("tracking: {webhook_allow_networks: ['10.20.0.0/16', 'fd00:1::/64']}\n")
    assert [str(n) for n in load_settings(p).tracking.webhook_allow_networks] == ["10.20.0.0/16", "fd00:1::/64"]
    p.write_text("tracking: {webhook_allow_networks: ['10.20.0.1/16']}\n")
    with pytest.raises(ConfigError, match=r"field tracking.webhook_allow_networks.0: Value error, not a CIDR network"):
        load_settings(p)
    assert Settings().tracking.webhook_allow_networks == ()


# -- real connections ------------------------------------------------------------------------


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


def test_loopback_receiver_is_refused_unless_allowed(receiver):
    status, error = post(receiver.url, b"{}", HEADERS, 5)
    assert status is None
    assert error.startswith(f"http://127.0.0.1:{receiver.port}: 127.0.0.1 resolves only to addresses the tracker may not connect to")
    assert "loopback" in error and "tracking.webhook_allow_networks" in error
    assert receiver.requests == []  # nothing was sent
    assert post(receiver.url, b"{}", HEADERS, 5, LOOPBACK) == (200, "")
    assert len(receiver.requests) == 1


def test_a_name_is_judged_by_the_address_it_resolves_to(receiver):
    """``localhost`` is a name: the check is on what it resolves to, when connecting."""
    url = f"http://localhost:{receiver.port}/hooks/relay"
    status, error = post(url, b"{}", HEADERS, 5)
    assert status is None and "localhost resolves only to addresses the tracker may not connect to" in error
    assert "127.0.0.1 is a loopback address" in error
    assert receiver.requests == []
    assert post(url, b"{}", HEADERS, 5, LOOPBACK) == (200, "")  # ::1 skipped, 127.0.0.1 allowed
    assert receiver.requests[0].headers["Host"] == f"localhost:{receiver.port}"


def test_metadata_address_is_refused_without_a_packet():
    status, error = post("http://169.254.169.254/latest/meta-data/", b"{}", HEADERS, 5, LOOPBACK)
    assert status is None and "169.254.169.254 is a link-local address" in error


def test_error_response_stores_the_status_not_the_body(receiver):
    receiver.respond(500, 302)
    assert post(receiver.url, b"{}", HEADERS, 5, LOOPBACK) == (500, "HTTP 500")
    assert post(receiver.url, b"{}", HEADERS, 5, LOOPBACK) == (302, "HTTP 302 (redirects are not followed)")


class Dripper:
    """A loopback HTTP server that answers one byte at a time, each pause shorter than the
    client's timeout, so only a deadline for the whole request stops the client."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    def __init__(self, pause: float):
        self.pause = pause
        self.sent = 0
        self.client_gone = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)  # the request
            for byte in self.RESPONSE:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    self.client_gone.set()
                    return
                self.sent += 1
                # The client hanging up shows as a readable end of stream.
                conn.settimeout(self.pause)
                try:
                    if conn.recv(1) == b"":
                        self.client_gone.set()
                        return
                except socket.timeout:
                    pass
        self.client_gone.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def test_a_dripping_server_is_cut_off_at_the_deadline():
    """One byte every 0.5 s with a 2 s timeout: every read is quicker than the timeout, so a
    per-read timeout would wait for all of it (about 30 s) and call it delivered."""
    drip = Dripper(pause=0.5)
    try:
        status, error = post(f"http://127.0.0.1:{drip.port}/hook", b"{}", HEADERS, 2, LOOPBACK)
        assert drip.client_gone.wait(30)
    finally:
        drip.close()
    assert status is None
    assert error == f"http://127.0.0.1:{drip.port}: no complete answer within 2s"
    assert 0 < drip.sent < len(Dripper.RESPONSE)  # the client left mid-answer




def test_sender_records_refusals_and_statuses_in_the_outbox(tmp_path, receiver):
    store = open_store(f"sqlite:///{tmp_path}/events.db")
    try:
        tenants = tenant_set(tenant("acme", webhook={"url": receiver.url, "timeout": 5}))
        secrets = {"acme": TenantSecrets(webhook_secret="acme-webhook-secret-0123")}
        with store.transaction() as tx:
            record_event(tx, Event(Kind.RECEIVED, 1_795_000_000.0, "relay1", tenant="acme", queue_id="Q1",
                                   recipient="r@example.org"), webhook=True)
        closed = WebhookSender(store, tenants, secrets, TrackingSettings(), clock=lambda: 1_795_000_100.0)
        assert closed.run_once() == 0
        [error] = store._query("SELECT last_error FROM outbox", [])[0].values()
        assert "loopback" in error and receiver.requests == []
        receiver.respond(503)
        allowed = TrackingSettings(webhook_allow_networks=["127.0.0.0/8"])
        assert WebhookSender(store, tenants, secrets, allowed, clock=lambda: 1_795_010_000.0).run_once() == 0
        [error] = store._query("SELECT last_error FROM outbox", [])[0].values()
        assert error == "HTTP 503"
        assert WebhookSender(store, tenants, secrets, allowed, clock=lambda: 1_795_100_000.0).run_once() == 1
    finally:
        store.close()
