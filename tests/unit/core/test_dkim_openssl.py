"""The OpenSSL seam of core/dkimverify.py gives dkimpy's answers (issue 16).

``rsa_sha256_verify`` (cryptography) against ``dkim.crypto.RSASSA_PKCS1_v1_5_verify``
(dkimpy's pure Python) on valid, tampered, shortened and random signatures; ``parse_key``
against ``dkim.evaluate_pk``.
"""

from __future__ import annotations

import base64
import hashlib

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.core.dkimverify import parse_key, rsa_sha256_verify
from relay_milter.lab import ed25519_key, rsa_key, sign

NAME = b"s._domainkey.example.org."


def _record(private: rsa.RSAPrivateKey) -> bytes:
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(private: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    return private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def _dkimpy(digest_of: bytes, signature: bytes, pk) -> bool:
    return dkim.crypto.RSASSA_PKCS1_v1_5_verify(hashlib.sha256(digest_of), signature, pk)


def test_parse_key_is_dkimpys_and_parsed_once(rsa2048):
    record = _record(rsa2048)
    key = parse_key(NAME, record)
    pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(NAME, record)
    assert (key.pk, key.keysize, key.ktag, key.seqtlsrpt) == (pk, keysize, ktag, seqtlsrpt) == (pk, 2048, b"rsa", False)
    assert parse_key(NAME, record) is key  # cached: the second message parses nothing
    assert key.rsa_key.public_numbers().n == pk["modulus"]


def test_parse_key_ed25519_keeps_dkimpys_nacl_key():
    key = parse_key(NAME, ed25519_key().txt.encode())
    assert key.ktag == b"ed25519" and key.keysize == 256 and key.rsa_key is None
    assert type(key.pk).__name__ == "VerifyKey"


def test_a_bad_record_raises_what_dkimpy_raises_every_time():
    for _ in range(2):
        with pytest.raises(dkim.KeyFormatError):
            parse_key(NAME, b"v=DKIM1; k=rsa; p=AAAA")
        with pytest.raises(dkim.KeyFormatError):
            parse_key(NAME, b"")


def test_valid_and_tampered(rsa2048):
    key = parse_key(NAME, _record(rsa2048))
    digest = hashlib.sha256(b"header hash input").digest()
    good = _sign(rsa2048, digest)
    assert rsa_sha256_verify(key, digest, good) is True is _dkimpy(b"header hash input", good, key.pk)
    other = hashlib.sha256(b"other").digest()
    assert rsa_sha256_verify(key, other, good) is False is _dkimpy(b"other", good, key.pk)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert rsa_sha256_verify(key, digest, flipped) is _dkimpy(b"header hash input", flipped, key.pk) is False


def test_a_signature_with_its_leading_zero_bytes_dropped_is_read_as_dkimpy_reads_it(rsa2048):
    key = parse_key(NAME, _record(rsa2048))
    for i in range(3000):  # about 1 in 256 signatures starts with a zero byte
        data = b"message %d" % i
        digest = hashlib.sha256(data).digest()
        sig = _sign(rsa2048, digest)
        if sig[0] == 0:
            short = sig.lstrip(b"\0")
            assert rsa_sha256_verify(key, digest, short) is True is _dkimpy(data, short, key.pk)
            return
    pytest.skip("no signature with a leading zero byte in 3000 tries")


def test_signatures_openssl_would_refuse_are_left_to_dkimpy(rsa2048):
    key = parse_key(NAME, _record(rsa2048))
    n = key.pk["modulus"]
    digest = hashlib.sha256(b"x").digest()
    good = _sign(rsa2048, digest)
    not_below_n = (int.from_bytes(good, "big") + n).to_bytes(257, "big")  # s + n: dkimpy computes the same s^e
    assert rsa_sha256_verify(key, digest, not_below_n) is None
    assert rsa_sha256_verify(key, digest, b"\1" * 300) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), noise=st.binary(min_size=1, max_size=256))
def test_random_signatures_get_dkimpys_answer(rsa2048, data, noise):
    key = parse_key(NAME, _record(rsa2048))
    digest = hashlib.sha256(data).digest()
    answer = rsa_sha256_verify(key, digest, noise)
    if answer is not None:
        assert answer is _dkimpy(data, noise, key.pk)


def test_whole_messages_verify_alike_through_the_hop_verifier():
    """dkimpy's own verify (its path) and ours agree on real signed messages, good and bad."""
    from relay_milter.core.dkimverify import _HopVerifier

    key = rsa_key(2048)
    msg = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\n\r\nSome text\r\n"
    signed = sign(msg, key, "b.example", "s", headers=("from", "to", "subject"))
    txt = key.txt.encode()
    dnsfunc = lambda name, timeout=5: txt  # noqa: E731
    for message in (signed, signed.replace(b"Subject: x", b"Subject: y"), signed.replace(b"To: c@", b"To: e@")):
        ours = _HopVerifier(message).verify(idx=0, dnsfunc=dnsfunc)
        theirs = dkim.DKIM(message).verify(idx=0, dnsfunc=dnsfunc)
        assert ours == theirs
    assert _HopVerifier(signed).verify(idx=0, dnsfunc=dnsfunc) is True


@pytest.mark.parametrize("pinned", ["record", "pem", "dns"])
def test_hop_keys_are_what_validation_gives(pinned):
    """Tenant.hop_keys skips validating the current key again: it must equal the validated one."""
    from relay_milter.config import HopKey
    from support.factories import tenant

    key = rsa_key(2048)
    extra = {"keys": [{"selector": "Next", "public_key": ed25519_key().txt}]}
    if pinned == "pem":
        private = serialization.load_pem_private_key(key.private_pem, password=None)
        pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        extra["public_key"] = pem.decode()
    t = tenant("acme", key if pinned != "dns" else None, selector=" S1 ", **extra)
    current = t.hop_keys[0]
    assert current == HopKey(selector=t.selector, public_key=t.public_key)
    assert current.selector == "s1" and (current.public_key is None) == (pinned == "dns")
    assert [k.selector for k in t.hop_keys] == ["s1", "next"]
    assert t.hop_key("next") is t.keys[0]
