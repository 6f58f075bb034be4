"""Hop-key rotation with overlap: several (selector, key, not_before, not_after) entries per
tenant; a signature by any key valid now passes; an expired or not-yet-valid key is refused
with the reason. Real dkimpy signatures, pinned keys."""

from __future__ import annotations

import base64
import datetime
import time

import pytest

from relay_milter.config import ConfigError, dkim_txt_record, load_tenants, public_key_info
from relay_milter.core.dkimverify import KeyResolver, accepted_key, verify_hop_signature
from relay_milter.lab import ed25519_key, make_message, rsa_key, sign
from support.factories import tenant, tenant_doc, to_message, write_tenants

# Signatures carry t= now, so the windows are set around the real clock.
UTC = datetime.timezone.utc
NOW = time.time()
OLD_UNTIL = datetime.datetime.fromtimestamp(int(NOW) + 7 * 86400, UTC)
NEXT_FROM = datetime.datetime.fromtimestamp(int(NOW) + 30 * 86400, UTC)


def iso(dt: datetime.datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def keys():
    return {"old": rsa_key(1024), "new": ed25519_key(), "next": rsa_key(1024)}


@pytest.fixture(scope="module")
def rotating(keys):
    return tenant(
        "acme", keys["new"], selector="s2026b",
        # The windows are days wide and the tests verify at their edges with signatures
        # made now: the signature-age limit (a separate rule, 1 day by default) is off here.
        max_signature_age=0,
        keys=[
            {"selector": "s2026a", "public_key": keys["old"].txt, "not_after": iso(OLD_UNTIL)},
            {"selector": "s2027", "public_key": keys["next"].txt, "not_before": iso(NEXT_FROM).rstrip("Z")},  # no zone: UTC
        ],
    )


def verify(t, key, selector, now=None):
    """Sign now and verify at ``now`` (default: the moment of verification, never the
    module's import time: a signature made later would be "in the future" for that)."""
    raw = sign(make_message("news@acme.example", "alice@example.org"), key, t.signing_domain, selector)
    msg = to_message(raw)
    when = time.time() if now is None else now
    return verify_hop_signature(msg.raw(), msg.values("DKIM-Signature"), t, KeyResolver(), now=when)


def test_signatures_by_the_current_and_the_previous_key_both_pass(rotating, keys):
    for name, sel in (("new", "s2026b"), ("old", "s2026a")):
        res = verify(rotating, keys[name], sel)
        assert res.passed, res.reason
        assert (res.selector, res.key_source) == (sel, "pinned")


def test_after_not_after_the_previous_key_is_refused_with_the_reason(rotating, keys):
    later = OLD_UNTIL.timestamp() + 1
    res = verify(rotating, keys["old"], "s2026a", now=later)
    assert not res.passed and res.dsn == "5.7.21"
    assert res.reason == (
        "no signature by d=hop.acme.test s=s2026b|s2026a|s2027 "
        f"(the key of selector s=s2026a expired at {iso(OLD_UNTIL)} (not_after))"
    )
    assert verify(rotating, keys["new"], "s2026b", now=later).passed


def test_before_not_before_the_next_key_is_refused_then_accepted(rotating, keys):
    res = verify(rotating, keys["next"], "s2027")
    assert not res.passed and f"the key of selector s=s2027 is not valid before {iso(NEXT_FROM)} (not_before)" in res.reason
    assert verify(rotating, keys["next"], "s2027", now=NEXT_FROM.timestamp()).passed


def test_a_key_listed_under_another_selector_does_not_verify(rotating, keys):
    res = verify(rotating, keys["next"], "s2026a")  # a key the tenant lists, under the wrong selector
    assert not res.passed and res.dsn == "5.7.20"


def test_accepted_key_is_the_selection_function(rotating):
    assert accepted_key(rotating, "s2026b", NOW)[0].selector == "s2026b"
    assert accepted_key(rotating, "nope", NOW) == (None, None)
    key, why = accepted_key(rotating, "s2027", NOW)
    assert key is None and why.startswith("the key of selector s=s2027 is not valid before")


def test_tenant_files_refuse_duplicate_selectors_and_bad_windows(tmp_path, keys):
    write_tenants(tmp_path / "a", [tenant_doc("acme", keys["old"], keys=[{"selector": "s1"}])])
    with pytest.raises(ConfigError, match=r"acme.yaml: tenant acme: field \(tenant\): Value error, keys: selector s1 listed twice"):
        load_tenants(tmp_path / "a")
    write_tenants(tmp_path / "b", [tenant_doc("acme", keys["old"], keys=[{"selector": "s0", "not_before": "2027-01-01", "not_after": "2026-01-01"}])])
    with pytest.raises(ConfigError, match=r"field keys.0: Value error, not_before must be before not_after"):
        load_tenants(tmp_path / "b")


# -- pinned keys must be keys -------------------------------------------------------------------


def test_valid_base64_that_is_not_a_key_is_refused_at_load(tmp_path):
    junk = base64.b64encode(b"valid base64, but not a key at all").decode()
    write_tenants(tmp_path, [tenant_doc("acme", public_key=f"v=DKIM1; k=rsa; p={junk}")])
    with pytest.raises(ConfigError) as err:
        load_tenants(tmp_path)
    assert str(err.value) == f"{tmp_path / 'acme.yaml'}: tenant acme: field public_key: Value error, p= is valid base64 but not a public key (DER SubjectPublicKeyInfo)"


def test_declared_type_must_match_the_key(keys):
    ed = keys["new"].public_b64
    with pytest.raises(ValueError, match="k=rsa but p= holds a Ed25519 key|p= is valid base64 but not a public key"):
        dkim_txt_record(f"v=DKIM1; k=rsa; p={ed}")
    rsa_b64 = keys["old"].public_b64
    with pytest.raises(ValueError, match="k=ed25519 but p= holds 162 bytes"):
        dkim_txt_record(f"v=DKIM1; k=ed25519; p={rsa_b64}")
    with pytest.raises(ValueError, match="unsupported key type k=dsa"):
        dkim_txt_record(f"v=DKIM1; k=dsa; p={rsa_b64}")
    assert public_key_info(keys["old"].txt).bits == 1024 and public_key_info(keys["new"].txt).type == "ed25519"


def test_an_ed25519_pem_is_pinned_as_an_ed25519_record(keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    raw = base64.b64decode(keys["new"].public_b64)
    pem = ed25519.Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert dkim_txt_record(pem) == keys["new"].txt
