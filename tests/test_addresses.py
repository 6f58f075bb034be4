"""Recipient decoding: a golden table, and properties that must hold for any input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.addresses import AddressError, decode_recipient, encode_recipient, rewrite_address_header

GOOD = [
    ("<alice=example.org@acme.relay.test>", "acme.relay.test", "alice@example.org"),
    ("alice=example.org@ACME.relay.test", "acme.relay.test", "alice@example.org"),
    ("<a.b+tag=sub.Example.NET@acme.relay.test>", "acme.relay.test", "a.b+tag@sub.example.net"),
    # split at the LAST '=': the local part may itself contain '='
    ("<x=y=example.com@acme.relay.test>", "acme.relay.test", "x=y@example.com"),
    ("<o'brien=example.ie@acme.relay.test>", "acme.relay.test", "o'brien@example.ie"),
]

BAD = [
    ("<>", "empty"),
    ("<alice@acme.relay.test>", "not encoded"),
    ("<alice=@acme.relay.test>", "invalid domain"),
    ("<=example.org@acme.relay.test>", "invalid local part"),
    ("<alice=example.org=@acme.relay.test>", "invalid domain"),
    ("<a..b=example.org@acme.relay.test>", "invalid local part"),
    ("<.a=example.org@acme.relay.test>", "invalid local part"),
    ("<alice=example@acme.relay.test>", "invalid domain"),
    ("<alice=exa_mple.org@acme.relay.test>", "invalid domain"),
    ("<alice=10.0.0.1@acme.relay.test>", "looks like an IP"),
    ("<alice=[10.0.0.1]@acme.relay.test>", "forbidden character"),
    ("<user@other=example.org@acme.relay.test>", "exactly one '@'"),
    ("<alice%example.org=x.org@acme.relay.test>", "forbidden character"),
    ("<example.org!alice=x.org@acme.relay.test>", "forbidden character"),
    ('<"al ice"=example.org@acme.relay.test>', "whitespace"),
    ('<"alice"=example.org@acme.relay.test>', "forbidden character"),
    ("<@hop.example:alice=example.org@acme.relay.test>", "forbidden character"),
    ("<alice=example.org\r\nBcc: x@y.z@acme.relay.test>", "control"),
    ("<alice=exam\x00ple.org@acme.relay.test>", "control"),
    ("<alicé=example.org@acme.relay.test>", "non-ASCII"),
    ("<alice=example.org@acme_relay>", "not a valid domain"),
    ("<" + "a" * 65 + "=example.org@acme.relay.test>", "invalid local part"),
]


@pytest.mark.parametrize("raw, relay, decoded", GOOD)
def test_decodes(raw, relay, decoded):
    d = decode_recipient(raw)
    assert (d.relay_domain, d.address) == (relay, decoded)


@pytest.mark.parametrize("raw, why", BAD)
def test_refuses(raw, why):
    with pytest.raises(AddressError, match=why):
        decode_recipient(raw)


local_part = st.from_regex(r"\A[a-z0-9](?:[a-z0-9+_-]|\.(?=[a-z0-9])){0,20}\Z")
domain = st.from_regex(r"\A(?:[a-z0-9]{1,10}\.){1,3}[a-z]{2,6}\Z")


@given(local=local_part, dom=domain)
def test_encode_then_decode_round_trips(local, dom):
    addr = f"{local}@{dom}"
    assert decode_recipient(f"<{encode_recipient(addr, 'acme.relay.test')}>").address == addr


@settings(max_examples=500)
@given(st.text(max_size=120))
def test_any_input_decodes_to_a_safe_address_or_a_clean_refusal(raw):
    try:
        d = decode_recipient(raw)
    except AddressError as exc:
        assert exc.reason and "\n" not in exc.reason
        return
    # Whatever decodes is a plain ASCII mailbox: nothing that could inject a header or reroute.
    assert d.address.isascii() and d.address.count("@") == 1
    assert not set(d.address) & set(" \t\r\n\x00\"\\()<>[],;:%!")


def test_header_rewrite_decodes_only_the_relay_domain():
    value = ' Alice <alice=example.org@acme.relay.test>, bob@other.example, "Carol, C." <carol=example.net@acme.relay.test>'
    assert rewrite_address_header(value, "acme.relay.test") == 'Alice <alice@example.org>, bob@other.example, "Carol, C." <carol@example.net>'
    assert rewrite_address_header(" bob@other.example", "acme.relay.test") is None
    # A malformed encoding is left alone rather than guessed at.
    assert rewrite_address_header(" bad@acme.relay.test", "acme.relay.test") is None


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_header_rewrite_never_emits_line_breaks(value):
    out = rewrite_address_header(value + " x=example.org@acme.relay.test", "acme.relay.test")
    assert out is None or ("\r" not in out and "\n" not in out)
