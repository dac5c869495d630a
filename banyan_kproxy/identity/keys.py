"""
The issuer's signing keys: a JWKS document parsed once per fetch, and signature checks.

PyJWT supplies the JWK parsing (``RSAAlgorithm.from_jwk`` / ``ECAlgorithm.from_jwk``)
and the signature algorithms; each key is turned into a ``cryptography`` public key
object when the JWKS is fetched, never per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attr import frozen
from cryptography.hazmat.primitives.asymmetric.ec import (
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from .model import TokenRejected
from .token import ParsedToken, show

#: Every algorithm a token may be signed with, whatever the configuration says.
#: ``none`` and the HMAC family are never accepted: an HMAC "key" for an OIDC issuer
#: could only be its public key, which everyone has.
SUPPORTED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)

_ALGORITHMS = {
    name: algorithm
    for name, algorithm in get_default_algorithms().items()
    if name in SUPPORTED_ALGORITHMS
}

#: The curve each ECDSA algorithm is defined on (RFC 7518 section 3.4).
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


class UnusableKey(Exception):
    """
    A JWK that cannot be used to verify ID tokens; the message says why.
    """


@frozen
class VerificationKey:
    """
    One public key from the issuer's JWKS.
    """

    kid: str | None
    #: A ``cryptography`` RSA or EC public key object.
    key: Any
    #: The JWK's ``alg``, when it names one: the key is then used for that alone.
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """
        Whether this key can check a signature made with ``alg``.
        """
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return isinstance(self.key, RSAPublicKey)
        curve = _EC_CURVES.get(alg)
        return (
            curve is not None
            and isinstance(self.key, EllipticCurvePublicKey)
            and self.key.curve.name == curve
        )

    def describe(self) -> str:
        """
        The key id, or a stand-in for a key without one, for log lines.
        """
        return self.kid if self.kid is not None else "(no kid)"


def parse_jwk(jwk: Any) -> VerificationKey:
    """
    Turn one JWK into a `VerificationKey`.

    :raises UnusableKey: for a key that is not an RSA or EC signature key.
    """
    if not isinstance(jwk, dict):
        raise UnusableKey("entry is not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise UnusableKey("kid is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise UnusableKey(f"use is {show(use)}, not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise UnusableKey("key_ops does not include 'verify'")
    alg = jwk.get("alg")
    if alg is not None and alg not in SUPPORTED_ALGORITHMS:
        raise UnusableKey(f"alg {show(alg)} is not a supported signature algorithm")
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(jwk)
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(jwk)
        else:
            raise UnusableKey(f"kty {show(kty)} is not RSA or EC")
    except UnusableKey:
        raise
    except Exception as e:
        raise UnusableKey(f"cannot be parsed ({type(e).__name__}: {e})") from None
    if isinstance(key, (RSAPrivateKey, EllipticCurvePrivateKey)):
        key = key.public_key()
    verification_key = VerificationKey(kid=kid or None, key=key, alg=alg)
    if alg is not None and not verification_key.fits(alg):
        raise UnusableKey(f"a {kty} key cannot be used with alg {alg}")
    return verification_key


@frozen
class KeySet:
    """
    The usable keys of one JWKS document, indexed by key id.
    """

    keys: tuple[VerificationKey, ...]
    #: kid -> the keys with that id (normally one).
    by_kid: dict[str, tuple[VerificationKey, ...]]

    @classmethod
    def from_keys(cls, keys: Iterable[VerificationKey]) -> KeySet:
        """
        Index ``keys`` by id.
        """
        keys = tuple(keys)
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        return cls(keys=keys, by_kid={k: tuple(v) for k, v in by_kid.items()})

    def kids(self) -> list[str]:
        """
        The key ids in this set, for log lines.
        """
        return [key.describe() for key in self.keys]

    def knows(self, kid: str) -> bool:
        """
        Whether a key with id ``kid`` is in this set.
        """
        return kid in self.by_kid


def parse_jwks(document: Any) -> tuple[KeySet, list[str]]:
    """
    Parse a JWKS document.

    :return: the usable keys, and one line per key that was skipped.
    :raises ValueError: when the document is not a JWKS at all.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS is not a JSON object with a 'keys' array")
    keys = []
    skipped = []
    for index, jwk in enumerate(document["keys"]):
        try:
            keys.append(parse_jwk(jwk))
        except UnusableKey as e:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            name = f"kid {show(kid)}" if kid is not None else f"key #{index}"
            skipped.append(f"{name}: {e}")
    return KeySet.from_keys(keys), skipped


def check_signature(
    token: ParsedToken, candidates: Iterable[VerificationKey]
) -> VerificationKey | None:
    """
    The first of ``candidates`` whose signature over ``token`` checks out, if any.

    ``token.alg`` must already be one of `SUPPORTED_ALGORITHMS`; keys that do not fit
    the algorithm are passed over.
    """
    algorithm = _ALGORITHMS.get(token.alg)
    if algorithm is None:
        raise TokenRejected("algorithm", f"algorithm {show(token.alg)} is not supported")
    for candidate in candidates:
        if not candidate.fits(token.alg):
            continue
        try:
            good = algorithm.verify(token.signing_input, candidate.key, token.signature)
        except Exception:
            # A signature of the wrong shape for the key; nothing it could prove.
            good = False
        if good:
            return candidate
    return None
