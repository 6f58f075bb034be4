"""The signature and binding options of issue 11: defaults, and errors that name file, tenant and field."""

from __future__ import annotations

import pytest
import yaml

from relay_milter import defaults
from relay_milter.config import ConfigError, load_settings, load_tenants
from support.factories import tenant, tenant_doc, write_tenants


def test_defaults_are_the_safe_ones():
    t = tenant("acme")
    assert t.required_signed_headers == ("from", "to", "subject")
    assert t.signed_headers_if_present == ("reply-to", "cc", "content-type", "mime-version", "message-id")
    assert t.max_signature_age == defaults.MAX_SIGNATURE_AGE == 86400
    assert t.allow_bcc is False
    assert load_settings(None).max_hop_signatures == defaults.MAX_HOP_SIGNATURES == 3


def test_header_names_are_normalised():
    t = tenant("acme", signed_headers_if_present=["Reply-To", "reply-to", "List-Unsubscribe"])
    assert t.signed_headers_if_present == ("reply-to", "list-unsubscribe")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("allow_bcc", "sometimes", "field allow_bcc: Input should be a valid boolean"),
        ("max_signature_age", -1, "field max_signature_age: Input should be greater than or equal to 0"),
        ("signed_headers_if_present", ["reply to"], "field signed_headers_if_present: Value error, not a valid header field name: 'reply to'"),
    ],
)
def test_bad_tenant_values_name_file_tenant_and_field(tmp_path, field, value, message):
    write_tenants(tmp_path, [tenant_doc("acme", **{field: value})])
    with pytest.raises(ConfigError) as exc:
        load_tenants(tmp_path)
    assert f"{tmp_path / 'acme.yaml'}: tenant acme: {message}" in str(exc.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_hop_signatures", 0, "field max_hop_signatures: Input should be greater than or equal to 1"),
        ("max_hop_signatures", 5000, "field max_hop_signatures: Input should be less than or equal to 1000"),
        ("milter_workers", 0, "field milter_workers: Input should be greater than or equal to 1"),
        ("milter_workers", "many", "field milter_workers: Input should be a valid integer"),
        ("authserv_id", "relay example", "field authserv_id: Value error, not an RFC 8601 authserv-id"),
        ("authserv_id", "relay.example;", "field authserv_id: Value error, not an RFC 8601 authserv-id"),
    ],
)
def test_bad_settings_name_file_and_field(tmp_path, field, value, message):
    p = tmp_path / "relay.yaml"
    p.write_text(yaml.safe_dump({field: value}))
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    assert f"{p}: settings: {message}" in str(exc.value)
