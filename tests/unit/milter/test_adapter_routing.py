"""The adapter's part in routing (issue 11): the route seal it adds, and its key."""

from __future__ import annotations

import io

import Milter
import pytest
from support.milterctx import MilterCtx

from relay_milter.config import Settings
from relay_milter.core import route
from relay_milter.core.policy import Policy
from relay_milter.lab import make_message, rsa_key, sign
from relay_milter.milter.adapter import RelayMilter, load_route_key
from support.factories import tenant, tenant_set

RCPT = "alice=example.org@acme.relay.test"


@pytest.fixture(scope="module")
def key():
    return rsa_key(2048)


@pytest.fixture
def ctx(key, monkeypatch):
    monkeypatch.setattr(RelayMilter, "source", Policy(tenant_set(tenant("acme", key)), Settings(myhostname="relay.test")))
    monkeypatch.setattr(RelayMilter, "route_key", b"\x01" * 32)
    monkeypatch.setattr(RelayMilter, "route_key_dir", None)
    Milter.factory = RelayMilter
    ctx = MilterCtx()
    ctx._setsymval("i", "4XyZ1Qd2")
    assert ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1") == Milter.CONTINUE
    return ctx


def feed(ctx, key) -> int:
    raw = sign(make_message("news@acme.example", "alice@example.org", extra_headers=(("X-Relay-Route-Seal", "acme.forged"),)), key, "hop.acme.test", "s1")
    return ctx._feedFile(io.BytesIO(raw), "news@acme.example", RCPT)


def test_the_seal_follows_the_marker_and_the_clients_copy_is_gone(ctx, key):
    assert feed(ctx, key) == Milter.CONTINUE and ctx._reply is None
    assert ctx._msg["X-Relay-Route"].strip() == "acme"
    assert ctx._msg.get_all("X-Relay-Route-Seal") == [route.tenant_seal(b"\x01" * 32, "acme")]


def test_a_key_created_after_the_start_is_picked_up(ctx, key, tmp_path):
    RelayMilter.route_key_dir = tmp_path  # serve() found none
    assert load_route_key(tmp_path) is None
    (tmp_path / "relay" / "requeue").mkdir(parents=True)
    (tmp_path / "relay" / "requeue" / "route.key").write_text(route.new_route_key())
    assert feed(ctx, key) == Milter.CONTINUE
    want = load_route_key(tmp_path)
    assert RelayMilter.route_key == want and RelayMilter.route_key_dir is None
    assert ctx._msg["X-Relay-Route-Seal"].strip() == route.tenant_seal(want, "acme")
