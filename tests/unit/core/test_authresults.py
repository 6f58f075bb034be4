"""Authentication-Results: which fields claim our authserv-id, and what we write (RFC 8601)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from relay_milter.core.authresults import authserv_id, claims, header_value, pvalue

OURS = "relay.lab.test"


@pytest.mark.parametrize(
    "value",
    [
        " relay.lab.test; dkim=pass",
        " RELAY.LAB.TEST; dkim=pass",
        " (trusted) relay.lab.test; dkim=pass",
        " relay.lab.test(x); dkim=pass",
        ' "relay.lab.test"; dkim=pass',
        " relay.lab.test.; dkim=pass",
        ' (a (nested) c) "Relay.Lab.\\Test." ; none',
        " relay.lab.test 1; none",  # with a version
        "\r\n\trelay.lab.test;\r\n\tdkim=pass",  # folded
        " relay.lab.test",  # no results at all: still a claim
        " (unterminated relay.lab.test; dkim=pass",  # unreadable, names our id
    ],
)
def test_every_spelling_of_our_id_is_a_claim(value):
    assert claims(value, OURS)


@pytest.mark.parametrize(
    "value",
    [
        " mx.other.example; spf=pass smtp.mailfrom=relay.lab.test",
        " relay.lab.test.evil.example; dkim=pass",
        " (relay.lab.test) other.example; dkim=pass",  # our id only in a comment
        ' "relay.lab.test x"; none',
        " sub.relay.lab.test; none",
    ],
)
def test_other_ids_are_not_ours(value):
    assert not claims(value, OURS)


def test_authserv_id_is_normalised():
    assert authserv_id(' (c) "A.B\\.C." ; none') == "a.b.c"
    assert authserv_id(" ; none") is None
    assert authserv_id(' "never ends') is None


@pytest.mark.parametrize(
    "text, out",
    [
        ("hop.acme.test", "hop.acme.test"),
        ("@hop.acme.test", "@hop.acme.test"),
        ("news.desk@hop.acme.test", "news.desk@hop.acme.test"),
        ("rsa-sha256", "rsa-sha256"),
        ("ab/c+d=", '"ab/c+d="'),  # base64 is not a token
        ("x dkim=pass header.d=bank.example reason=ok@hop.acme.test", '"x dkim=pass header.d=bank.example reason=ok@hop.acme.test"'),
        ('a"b\\c@hop.acme.test', '"a\\"b\\\\c@hop.acme.test"'),
        ("x;y=z@hop.acme.test", '"x;y=z@hop.acme.test"'),
        ("bad\r\nInjected: 1", None),
        ("caf\u00e9@hop.acme.test", None),
        ("", None),
        ("a" * 201, None),
    ],
)
def test_pvalue(text, out):
    assert pvalue(text) == out


def test_header_value_drops_what_cannot_be_written():
    v = header_value("relay.test", "dkim", "pass", [("header.d", "hop.acme.test"), ("header.i", "x\r\ny"), ("header.b", "ab/cd")])
    assert v == 'relay.test; dkim=pass header.d=hop.acme.test header.b="ab/cd"'


_PROPERTY = r'(?:[a-z]+\.[a-z]+=(?:[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"|[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.-]*@[A-Za-z0-9.-]+))'


@given(st.text(max_size=80))
def test_any_identity_gives_one_result_with_well_formed_properties(identity):
    import re

    v = header_value("relay.test", "dkim", "pass", [("header.d", "hop.acme.test"), ("header.i", identity)])
    assert "\r" not in v and "\n" not in v
    assert re.fullmatch(rf"relay\.test; dkim=pass(?: {_PROPERTY})+", v), v
