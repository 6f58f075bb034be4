"""Recipient decoding: a golden table, and properties that must hold for any input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.core.addresses import AddressError, decode_recipient, encode_recipient, rewrite_address_header, strip_brackets

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
    # One trailing dot is the fully qualified form; two leave an empty label.
    ("<alice=example.org..@acme.relay.test>", "invalid domain"),
    ("<alice=example.org@acme.relay.test..>", "not a valid domain"),
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


def test_header_rewrite_decodes_only_the_relay_domain():
    value = ' Alice <alice=example.org@acme.relay.test>, bob@other.example, "Carol, C." <carol=example.net@acme.relay.test>'
    assert rewrite_address_header(value, "acme.relay.test") == 'Alice <alice@example.org>, bob@other.example, "Carol, C." <carol@example.net>'
    assert rewrite_address_header(" bob@other.example", "acme.relay.test") is None
    # A malformed encoding is left alone rather than guessed at.
    assert rewrite_address_header(" bad@acme.relay.test", "acme.relay.test") is None
    # Control characters or undecodable bytes (kept as surrogates): left alone, never re-serialised.
    assert rewrite_address_header(" a\x00b <alice=example.org@acme.relay.test>", "acme.relay.test") is None
    assert rewrite_address_header(" \udcff <alice=example.org@acme.relay.test>", "acme.relay.test") is None


# -- fuzzing: hostile characters in every position ------------------------------------

HOSTILE = list("@=.%!\"'[]\\<>:;,() \t\r\n\x00\x7fé\u2028\udcff")
DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*@[a-z0-9-]+(\.[a-z0-9-]+)+$")
atom = st.text(st.sampled_from("abcXYZ019+-_'="), min_size=1, max_size=6)
# Mostly plausible pieces with a hostile character here and there, so both outcomes are common.
mangled = st.lists(atom | atom | atom | atom | st.sampled_from(HOSTILE) | st.just("."), min_size=1, max_size=4).map("".join)
label = st.text(st.sampled_from("abcz09-"), min_size=1, max_size=6)
domain_like = st.lists(label | label | label | label | st.sampled_from(HOSTILE), min_size=2, max_size=4).map(".".join)
relay = st.sampled_from(["acme.relay.test", "ACME.relay.test.", "acme.relay.test!x", "[127.0.0.1]"]) | domain_like
valid_recipient = st.builds(lambda l, d: encode_recipient(f"{l}@{d}", "acme.relay.test"), local_part, domain)
one_hostile_char = st.builds(lambda v, c, i: v[: i % (len(v) + 1)] + c + v[i % (len(v) + 1) :], valid_recipient, st.sampled_from(HOSTILE), st.integers(0, 80))
any_recipient = st.one_of(
    valid_recipient,
    one_hostile_char,
    st.text(max_size=120),
    st.binary(max_size=120).map(lambda b: b.decode("utf-8", "surrogateescape")),  # as the adapter keeps raw bytes
    st.builds(lambda l, d, r, b: f"<{l}={d}@{r}>" if b else f"{l}={d}@{r}", mangled, domain_like, relay, st.booleans()),
)


def _canonical(raw: str) -> str:
    """What a decoded address re-encodes to: domains lower case, without a trailing dot."""
    return strip_brackets(raw).lower().replace(".@", "@").rstrip(".")


@settings(max_examples=1000, deadline=None)
@given(any_recipient)
def test_decoder_refuses_cleanly_or_returns_a_dot_atom_that_re_encodes_to_the_input(raw):
    try:
        d = decode_recipient(raw)
    except AddressError as exc:
        assert exc.reason and not set(exc.reason) & set("\r\n\x00")
        return
    assert d.address.isascii() and DOT_ATOM.match(d.address), d.address
    assert encode_recipient(d.address, d.relay_domain).lower() == _canonical(raw)


display_name = mangled | st.text(max_size=20) | st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
mailbox = st.builds(lambda n, a: f"{n} <{a}>", display_name, valid_recipient | one_hostile_char) | st.builds(
    lambda n, l, d: f"{n} <{l}={d}@acme.relay.test>", display_name, mangled, domain_like
) | st.builds(
    lambda l, d: f"{l}={d}@acme.relay.test", mangled, domain_like
)
header_value = st.one_of(
    st.text(max_size=200),
    st.lists(mailbox | st.text(max_size=30), min_size=1, max_size=4).map(lambda parts: " " + ", ".join(parts)),
    st.lists(mailbox, min_size=1, max_size=3).map(lambda parts: " " + ",\r\n\t".join(parts)),
)


@settings(max_examples=1000, deadline=None)
@given(header_value)
def test_header_rewriter_never_emits_cr_lf_nul_and_never_raises(value):
    out = rewrite_address_header(value, "acme.relay.test")
    assert out is None or not set(out) & set("\r\n\x00")
