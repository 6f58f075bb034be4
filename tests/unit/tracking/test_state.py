"""The tracker's typed state reads and writes the JSON the store keeps, in the form earlier
versions wrote: state left by a running tracker survives an upgrade, and back."""

from __future__ import annotations

from relay_milter.tracking.state import Attempt, MessageState, MilterReject, TlsSession

# As the dict-based tracker stored a message deferred for one recipient and relayed to the other.
STORED_MESSAGE = {
    "client": "localhost[127.0.0.1]",
    "ts": 1795594800.5,
    "milter": True,
    "tenant": "acme",
    "sender": "news@acme.example",
    "upstream_id": "job-42",
    "rcpts": ["alice@example.org", "bob@example.net"],
    "orig": {"alice@example.org": "alice=example.org@acme.relay.test", "bob@example.net": "bob=example.net@acme.relay.test"},
    "message_id": "<m1@platform.example>",
    "route_tenant": "acme",
    "route_to": "alice=example.org@acme.relay.test",
    "size": 1091,
    "pf_sender": "bounces@acme.example",
    "received": True,
    "seen": ["alice@example.org", "bob@example.net"],
    "final": ["alice@example.org"],
    "last": {"bob@example.net": {"dsn": "4.3.0", "code": "451", "relay": "127.0.0.1[127.0.0.1]:2525", "reason": "deferred (451 4.3.0 busy)"}},
}


def test_message_state_round_trips_the_stored_form():
    st = MessageState.from_dict(STORED_MESSAGE)
    assert st.upstream and st.received and st.any_tenant == "acme"
    assert st.last["bob@example.net"] == Attempt("4.3.0", "451", "127.0.0.1[127.0.0.1]:2525", "deferred (451 4.3.0 busy)")
    assert st.to_dict() == STORED_MESSAGE


def test_unset_fields_are_left_out_and_a_milter_reject_is_kept():
    st = MessageState(ts=5.0, reject=MilterReject(code="550", tenant="acme"))
    assert st.to_dict() == {"ts": 5.0, "reject": {"code": "550", "tenant": "acme", "message_id": None}}
    back = MessageState.from_dict(st.to_dict())
    assert back == st and not back.upstream and back.reject.code == "550"


def test_unknown_keys_are_ignored_on_load():
    assert MessageState.from_dict({"client": "c[1.2.3.4]", "gone_in_this_version": 1}) == MessageState(client="c[1.2.3.4]")


def test_tls_session_round_trips():
    stored = {"ts": 7.0, "qid": None, "level": "Verified", "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    session = TlsSession.from_dict(stored)
    assert session == TlsSession(7.0, "Verified", "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert session.to_dict() == stored
