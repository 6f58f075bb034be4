"""Hop-signature verification: the tenant's own d=/s=, its pinned (or DNS) key, strict tags.

dkimpy parses and canonicalizes, and checks ed25519 signatures (PyNaCl, libsodium). This
module decides which signature counts and what a failure means for the SMTP client
(permanent vs temporary). Two shortcuts keep dkimpy's answers and cost less (issue 16):

- ``parse_key``: a key record is parsed once (dkimpy parses it for every message), cached by
  its text;
- ``rsa_sha256_verify``: the RSA-SHA256 check through ``cryptography`` (OpenSSL, about a tenth
  of dkimpy's pure-Python modular exponentiation), for the keys and signatures where OpenSSL's
  RSASSA-PKCS1-v1_5 and dkimpy's give the same answer; anything else goes to dkimpy's own code.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import dkim
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
import dns.exception
import dns.resolver

from relay_milter.core import fastcanon
from relay_milter import defaults
from relay_milter.config import DnsSettings, HopKey, Tenant

fastcanon.install()  # output-identical, faster dkimpy canonicalization helpers

log = logging.getLogger("relay.dkim")

ACCEPTED_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
# Clock slack for x= (expiry) and t= (age) checks. dkimpy allows 10 h; we allow 5 min.
CLOCK_SLACK = 300
MIN_RSA_BITS = 1024
DNS_CACHE_SECONDS = 300


class KeyUnavailable(Exception):
    """The key could not be fetched. ``temporary`` tells tempfail from reject."""

    def __init__(self, message: str, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


class KeyResolver:
    """Returns the DKIM TXT record for a tenant: pinned if set, else DNS (cached)."""

    def __init__(self, dns_settings: DnsSettings | None = None):
        self._resolver = (dns_settings or DnsSettings()).resolver()
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def record(self, tenant: Tenant, key: HopKey | None = None) -> bytes:
        """The record of ``key`` (default: the tenant's current key)."""
        key = key or tenant.hop_keys[0]
        if key.public_key:
            return key.public_key.encode("ascii")
        name = f"{key.selector}._domainkey.{tenant.signing_domain}."
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
        if hit and hit[0] > now:
            return hit[1]
        try:
            answer = self._resolver.resolve(name, "TXT")
        except dns.resolver.NXDOMAIN:
            raise KeyUnavailable(f"no DKIM key in DNS at {name}", temporary=False) from None
        except dns.resolver.NoAnswer:
            raise KeyUnavailable(f"no TXT record at {name}", temporary=False) from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise KeyUnavailable(f"DNS lookup of {name} failed: {exc.__class__.__name__}", temporary=True) from None
        except dns.exception.DNSException as exc:
            raise KeyUnavailable(f"DNS lookup of {name} failed: {exc}", temporary=True) from None
        records = [b"".join(r.strings) for r in answer]
        if len(records) != 1:
            raise KeyUnavailable(f"{len(records)} TXT records at {name}, expected exactly one", temporary=False)
        ttl = min(answer.rrset.ttl if answer.rrset is not None else 0, DNS_CACHE_SECONDS)
        with self._lock:
            self._cache[name] = (now + ttl, records[0])
        return records[0]


@dataclass(frozen=True)
class DkimResult:
    passed: bool
    temporary: bool = False
    reason: str = ""
    # RFC 7372 enhanced status: 5.7.20 no passing signature, 5.7.21 no acceptable signature.
    dsn: str = "5.7.20"
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    b_prefix: str = ""
    key_source: str = ""
    # Lower-case names in the passing signature's h= (each once): what the signature covers.
    signed_headers: frozenset[str] = frozenset()

    @classmethod
    def fail(cls, reason: str, dsn: str = "5.7.20", temporary: bool = False) -> "DkimResult":
        return cls(False, temporary, reason, "4.7.5" if temporary else dsn)


def _tag(sig: dict[bytes, bytes], name: bytes) -> str:
    return sig.get(name, b"").decode("ascii", "replace")


def signed_header_counts(sig: dict[bytes, bytes]) -> Counter[str]:
    """How many times each header name is listed in h= (lower case)."""
    names = sig.get(b"h", b"").decode("ascii", "replace").split(":")
    return Counter(n.strip().lower() for n in names if n.strip())


def check_tags(
    sig: dict[bytes, bytes], tenant: Tenant, now: float, present: Counter[str] | None = None
) -> str | None:
    """Policy on the signature's tags, before any cryptography. Returns a reason or None.

    ``present`` counts the message's header fields by lower-case name. With it, every
    instance of a required header (and of an ``signed_headers_if_present`` header that
    the message has) must be covered: h= must list the name at least as often as the
    field occurs. Listing it once more (oversigning) is accepted and recommended: it
    also covers the field's absence, so nobody can add one after signing.
    """
    if b"l" in sig:
        return "signature has a body length limit (l=), which is not accepted"
    alg = sig.get(b"a", b"")
    if alg not in ACCEPTED_ALGORITHMS:
        return f"signature algorithm a={alg.decode('ascii', 'replace')} is not accepted (rsa-sha256 or ed25519-sha256)"
    signed = signed_header_counts(sig)
    present = present or Counter()
    wanted = list(tenant.required_signed_headers)
    wanted += [h for h in tenant.signed_headers_if_present if present[h] and h not in wanted]
    missing = [h for h in wanted if not signed[h]]
    if missing:
        return f"signature does not cover required header(s): {', '.join(missing)}"
    uncovered = [f"{h} ({present[h]} present, {signed[h]} signed)" for h in wanted if present[h] > signed[h]]
    if uncovered:
        return f"signature does not cover every instance of: {', '.join(uncovered)}"
    try:
        if b"x" in sig and int(sig[b"x"]) + CLOCK_SLACK < now:
            return "signature has expired (x=)"
        if b"t" in sig and int(sig[b"t"]) > now + CLOCK_SLACK:
            return "signature timestamp (t=) is in the future"
        if tenant.max_signature_age and b"t" in sig and int(sig[b"t"]) + tenant.max_signature_age < now:
            return f"signature is older than {tenant.max_signature_age}s (t=, max_signature_age)"
    except ValueError:
        return "signature has a non-numeric t= or x="
    if tenant.max_signature_age and b"t" not in sig:
        return "signature has no timestamp (t=) but the tenant limits signature age (max_signature_age)"
    return None


def accepted_key(tenant: Tenant, selector: str, now: float) -> tuple[HopKey | None, str | None]:
    """Key selection for rotation: the tenant's key for ``selector`` if it is valid at
    ``now``; else (None, why it is refused), or (None, None) if the tenant has no such key."""
    key = tenant.hop_key(selector)
    if key is None:
        return None, None
    refused = key.refused_at(now)
    return (None, refused) if refused else (key, None)


def _key_type(record: bytes) -> str | None:
    try:
        return dkim.util.parse_tag_value(record).get(b"k", b"rsa").decode("ascii", "replace")
    except dkim.util.InvalidTagValueList:
        return None  # dkimpy reports the unusable key


def _key_mismatch(sig: dict[bytes, bytes], k: str | None) -> str | None:
    """RFC 6376 3.5: a= must name the key's type (dkimpy checks the hash only)."""
    alg = _tag(sig, b"a")
    if k is None or alg.startswith(k + "-"):
        return None
    return f"signature algorithm a={alg} does not match the key type k={k}"


def verify_hop_signature(
    message: bytes,
    signatures: list[str],
    tenant: Tenant,
    keys: KeyResolver,
    other_signing_domains: frozenset[str] = frozenset(),
    now: float | None = None,
    present: Counter[str] | None = None,
    max_candidates: int = defaults.MAX_HOP_SIGNATURES,
) -> DkimResult:
    """Verify the tenant's hop signature.

    ``signatures`` are the DKIM-Signature header values in message order, so
    index i here is dkimpy's idx=i. ``present`` counts the message's header
    fields by lower-case name (see check_tags). More than ``max_candidates``
    signatures with the tenant's d=/s= are refused before any of them is
    verified: each one costs a key parse and a header hash, and nobody needs many.
    """
    now = time.time() if now is None else now
    if not signatures:
        return DkimResult.fail("message has no DKIM signature")
    reasons: list[str] = []
    candidates: list[tuple[int, dict[bytes, bytes], HopKey]] = []
    selectors = "|".join(k.selector for k in tenant.hop_keys)
    for idx, value in enumerate(signatures):
        try:
            sig = dkim.util.parse_tag_value(value.encode("utf-8", "surrogateescape"))
        except dkim.util.InvalidTagValueList:
            reasons.append(f"signature {idx + 1} is malformed")
            continue
        d = _tag(sig, b"d").lower().rstrip(".")
        s = _tag(sig, b"s").lower()
        key, refused = accepted_key(tenant, s, now) if d == tenant.signing_domain else (None, None)
        if key is not None:
            candidates.append((idx, sig, key))
        elif refused:
            reasons.append(refused)
        elif d != tenant.signing_domain and d in other_signing_domains:
            reasons.append(f"signed by d={d}, which belongs to another tenant")
        elif d == tenant.signing_domain:
            reasons.append(f"signed with selector s={s}, expected s={selectors}")
    if not candidates:
        why = "; ".join(reasons) or "no signature"
        return DkimResult.fail(
            f"no signature by d={tenant.signing_domain} s={selectors} ({why})", dsn="5.7.21"
        )
    if len(candidates) > max_candidates:
        return DkimResult.fail(
            f"message has {len(candidates)} signatures by d={tenant.signing_domain} s={selectors}, "
            f"more than the {max_candidates} examined (max_hop_signatures)",
            dsn="5.7.21",
        )

    verifier = _HopVerifier(message, minkey=MIN_RSA_BITS, logger=_quiet)
    broken = False  # a candidate was acceptable but its cryptography failed
    for idx, sig, key in candidates:
        try:
            record = keys.record(tenant, key)  # cached per name; pinned keys cost nothing
        except KeyUnavailable as exc:
            return DkimResult.fail(str(exc), temporary=exc.temporary, dsn="5.7.21")

        def dnsfunc(name: bytes, timeout: int = 5, record: bytes = record) -> bytes:
            return record

        problem = check_tags(sig, tenant, now, present) or _key_mismatch(sig, _key_type(record))
        if problem:
            reasons.append(problem)
            continue
        try:
            if not verifier.body_matches(sig):  # from the per-message cache: no body work per signature
                reasons.append("signature did not verify: body hash mismatch: the body was changed after signing")
                broken = True
                continue
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.KeyFormatError as exc:
            reasons.append(f"key not acceptable: {exc}")
            continue
        except dkim.DKIMException as exc:
            text = str(exc)
            if text.startswith("body hash mismatch"):
                text = "body hash mismatch: the body was changed after signing"
            reasons.append(f"signature did not verify: {text}")
            broken = True
            continue
        if not ok:
            reasons.append("signature did not verify: signed headers changed, or signed with another key")
            broken = True
            continue
        return DkimResult(
            passed=True,
            reason="pinned key" if key.public_key else "key from DNS",
            dsn="2.7.0",
            domain=tenant.signing_domain,
            selector=key.selector,
            algorithm=_tag(sig, b"a"),
            identity=_tag(sig, b"i") or f"@{tenant.signing_domain}",
            b_prefix=re.sub(r"\s+", "", _tag(sig, b"b"))[:8],
            key_source="pinned" if key.public_key else "dns",
            signed_headers=frozenset(signed_header_counts(sig)),
        )
    return DkimResult.fail("; ".join(reasons), dsn="5.7.20" if broken else "5.7.21")


@dataclass(frozen=True)
class ParsedKey:
    """A DKIM key record as dkimpy parses it, plus the same RSA key for OpenSSL."""

    pk: object  # dkimpy's form: {"modulus", "publicExponent"} for RSA, a nacl VerifyKey for ed25519
    keysize: int
    ktag: bytes  # b"rsa" or b"ed25519"
    seqtlsrpt: bool
    rsa_key: rsa.RSAPublicKey | None = None  # None: OpenSSL would not take it; dkimpy decides


# Room for every key of 10,000 tenants with a spare selector each (issue 17: with 1,024 entries,
# mail from more than 1,024 tenants in turn would parse a key for every message again).
# An RSA-2048 entry is about 2 KiB, so a full cache is some 30 MiB per worker.
KEY_CACHE_SIZE = 16384


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def parse_key(name: bytes, record: bytes) -> ParsedKey:
    """``dkim.evaluate_pk`` once per (name, record): what it returns, or what it raises
    (KeyFormatError, binascii.Error; not cached, so a bad record costs a parse every time).

    The key record is the cache key, so a rotated key (new text) is parsed anew and nothing
    stale is ever used; the DNS cache (KeyResolver) decides when the text is fetched again.
    """
    pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(name, record)
    rsa_key = None
    if ktag == b"rsa":
        try:
            rsa_key = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
        except (ValueError, TypeError, OverflowError):  # e.g. an even exponent: dkimpy's path
            rsa_key = None
    return ParsedKey(pk, keysize, ktag, seqtlsrpt, rsa_key)


def rsa_sha256_verify(key: ParsedKey, digest: bytes, signature: bytes) -> bool | None:
    """RSASSA-PKCS1-v1_5 with SHA-256 over ``digest`` through OpenSSL.

    None when the answer is dkimpy's to give: no OpenSSL key, or a signature OpenSSL refuses
    before any arithmetic while dkimpy computes with it (longer than the modulus, or not
    below it as a number). A signature shorter than the modulus is left-padded with zeros:
    dkimpy reads it as the same number. Otherwise both compute s^e mod n and compare it with
    the one valid encoding (00 01 FF.. 00 DigestInfo), so True/False is dkimpy's answer.
    """
    if key.rsa_key is None:
        return None
    modlen = (key.pk["modulus"].bit_length() + 7) // 8
    if len(signature) > modlen or int.from_bytes(signature, "big") >= key.pk["modulus"]:
        return None
    signature = signature.rjust(modlen, b"\0")
    try:
        key.rsa_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class _HopVerifier(dkim.DKIM):
    """dkimpy's verifier, with the body canonicalized and hashed at most once per
    (body canonicalization, hash algorithm) for all the signatures of one message.

    dkimpy hashes the whole body again for every signature it is asked to verify, so
    many signatures on a large body multiply the cost (issue 11, finding 2). Here the
    body hash is checked against a per-message cache first; dkimpy then verifies the
    header hash and the signature with ``bh=`` taken out of its parsed tags (the header
    hash uses the raw header field, which keeps ``bh=``, so nothing changes there).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.body_hashes: dict[tuple[str, str], bytes] = {}

    def set_message(self, message):
        """dkimpy's set_message with fastcanon.rfc822_parse (same headers and body)."""
        super().set_message(None)
        if message:
            self.headers, self.body = fastcanon.rfc822_parse(message)

    def body_hash(self, sig: dict[bytes, bytes]) -> bytes:
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from None
        hash_name = sig[b"a"].split(b"-")[-1].decode("ascii", "replace")
        key = (policy.body_algorithm.__name__, hash_name)
        if key not in self.body_hashes:
            self.body_hashes[key] = hashlib.new(hash_name, policy.canonicalize_body(self.body)).digest()
        return self.body_hashes[key]

    def body_matches(self, sig: dict[bytes, bytes]) -> bool:
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig.get(b"bh", b"")))
        except (TypeError, ValueError) as exc:
            raise dkim.MessageFormatError(f"bh= is not base64: {exc}") from None
        return self.body_hash(sig) == expected

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        """dkimpy's verify_sig with the key from ``parse_key`` (parsed once per record)."""
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            key = parse_key(name, dnsfunc(name, timeout=self.timeout))
        except dkim.KeyFormatError as e:
            self.logger.error("%s" % e)
            return False
        except binascii.Error as e:
            self.logger.error("KeyFormatError: {0}".format(e))
            return False
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = key.pk, key.keysize, key.ktag, key.seqtlsrpt
        self.parsed_key = key
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        if b"l" in sig:  # never reached: check_tags refuses l=; dkimpy handles it the slow way
            return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        if not self.body_matches(sig):
            raise dkim.ValidationError("body hash mismatch")
        without_bh = {k: v for k, v in sig.items() if k != b"bh"}
        # dkimpy canonicalizes every header field for every signature, though it hashes
        # only the fields named in h= (picked by name, bottom up) and the signature field
        # itself (passed separately): with many signatures that is quadratic. Hand it only
        # the named fields; their order among themselves is kept, so it picks the same ones.
        named = set(include_headers)
        everything = self.headers
        self.headers = [h for h in everything if h[0].lower() in named]
        try:
            fast = self._rsa_sha256(without_bh, include_headers, sig_header)
            if fast is not None:
                return fast
            return super().verify_sig_process(without_bh, include_headers, sig_header, dnsfunc)
        finally:
            self.headers = everything

    def _rsa_sha256(self, sig, include_headers, sig_header) -> bool | None:
        """dkimpy's verify_sig_process (bh= already checked) for rsa-sha256, the signature
        checked by ``rsa_sha256_verify``; None (nothing done) where dkimpy must answer."""
        key = getattr(self, "parsed_key", None)
        if (
            key is None
            or key.ktag != b"rsa"
            or key.keysize < self.minkey  # dkimpy's "public key too small" after a good signature
            or sig.get(b"a") != b"rsa-sha256"
            or self.tlsrpt
            or self.seqtlsrpt  # dkimpy refuses these with its own message
        ):
            return None
        canon_policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))  # checked by body_matches
        if b"from" in include_headers:  # as dkimpy does (its bug#644046)
            include_headers.append(b"from")
        h = hashlib.sha256()
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkim.hash_headers(h, canon_policy, headers, include_headers, sig_header, sig)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        answer = rsa_sha256_verify(key, h.digest(), signature)
        if answer is None:  # dkimpy's arithmetic, on the same header hash
            try:
                return dkim.crypto.RSASSA_PKCS1_v1_5_verify(h, signature, key.pk)
            except (TypeError, dkim.crypto.DigestTooLargeError) as e:
                raise dkim.KeyFormatError("digest too large for modulus: %s" % e)
        return answer


class _QuietLogger(logging.LoggerAdapter):
    """dkimpy logs every failure at ERROR; we report failures ourselves, once."""

    def error(self, msg, *args, **kwargs):  # noqa: D401
        self.debug(msg, *args, **kwargs)


_quiet = _QuietLogger(logging.getLogger("relay.dkim.lib"), {})
