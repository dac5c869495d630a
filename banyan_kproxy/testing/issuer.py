"""
An OIDC issuer for tests and demos: discovery, a JWKS, and tokens signed on demand.

`OIDCIssuer` holds signing keys generated at run time, serves
``<issuer path>/.well-known/openid-configuration`` and ``<issuer path>/keys`` as a
``twisted.web`` resource, and mints ID tokens (RS/PS/ES) with whatever claims and
headers a test needs, including forged ones (``alg: none``, HMAC keyed with the public
key).  `OIDCIssuer.stub_treq` gives a ``treq.testing.StubTreq`` that reaches it in
memory; `OIDCIssuer.resource` can also be served on a real port.

Its token endpoint (``<issuer path>/token``, named in discovery) answers the OAuth 2.0
refresh-token grant (RFC 6749 section 6) for refresh tokens made with
`OIDCIssuer.issue_refresh_token`: a fresh ID token for the claims the refresh token
was issued with, optionally a rotated refresh token, and ``400 invalid_grant`` for an
unknown, revoked or already rotated one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm, get_default_algorithms
from treq.testing import StubTreq
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import OIDCConfig


class _Remove:
    """
    The type of `REMOVE`.
    """

    def __repr__(self) -> str:
        return "REMOVE"


#: Give this as a claim or header value to leave that claim or header out.
REMOVE: Any = _Remove()

_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_ALGORITHMS = get_default_algorithms()
_counter = itertools.count(1)


def b64url(data: bytes) -> str:
    """
    Unpadded base64url, as JWS uses.
    """
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


#: RSA keys are slow to make (a quarter of a second with older ``cryptography``), so
#: tests draw them from a pool: any `RSA_POOL_SIZE` keys handed out one after the
#: other are distinct, which is all a test needs.
RSA_POOL_SIZE = 8
_rsa_pool: list[Any] = []
_rsa_next = itertools.count()


def generate_private_key(alg: str, fresh: bool = False) -> Any:
    """
    A private key for ``alg`` (RSA 2048 for RS/PS, the matching curve for ES).

    RSA keys come from a small process-wide pool unless ``fresh`` is set.
    """
    if alg[:2] in ("RS", "PS"):
        if fresh:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        index = next(_rsa_next) % RSA_POOL_SIZE
        if index == len(_rsa_pool):
            _rsa_pool.append(
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
            )
        return _rsa_pool[index]
    if alg in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[alg]())
    raise ValueError(f"no key type for {alg!r}")


def public_jwk(private_key: Any, kid: str | None, alg: str | None) -> dict[str, Any]:
    """
    The public JWK of ``private_key``, with ``use: sig``, ``kid`` and ``alg`` set.
    """
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
    else:
        # Built by hand: PyJWT 2.6 does not pad P-521 coordinates to 66 bytes.
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        jwk = {
            "kty": "EC",
            "crv": _CURVE_NAMES[public.curve.name],
            "x": b64url(numbers.x.to_bytes(size, "big")),
            "y": b64url(numbers.y.to_bytes(size, "big")),
        }
    jwk["use"] = "sig"
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def _merge(base: dict[str, Any], changes: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(base)
    for name, value in (changes or {}).items():
        if value is REMOVE:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], sign: Any) -> str:
    """
    Serialise a JWS: ``sign(signing_input) -> signature bytes``.
    """
    signing_input = f"{b64url(_json(dict(header)))}.{b64url(_json(dict(claims)))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode('ascii')))}"


class _SigningKey:
    """
    One of the issuer's keys.
    """

    def __init__(self, kid: str, alg: str, private_key: Any) -> None:
        self.kid = kid
        self.alg = alg
        self.private_key = private_key
        self.jwk = public_jwk(private_key, kid, alg)


class OIDCIssuer:
    """
    An in-process OIDC issuer.

    Attributes a test may change: ``issuer_url`` (the URLs served are computed from
    it per request), ``discovery_status`` / ``jwks_status`` (answer with this HTTP
    status instead), ``discovery_overrides`` (merged into the discovery document;
    `REMOVE` drops a field), ``jwks_body`` (bytes served instead of the JWKS),
    ``extra_jwks`` (more JWK entries served), ``hold_jwks`` (JWKS requests wait until
    `release_jwks`).  Counters: ``jwks_fetches``, ``discovery_fetches``, and
    ``requests`` (every path asked for).

    Token endpoint: ``token_requests`` counts every POST to it and ``token_grants``
    the refreshes it granted; ``rotate_refresh_tokens`` makes each grant return a new
    refresh token and retire the old one; ``id_token_lifetime`` is how long the ID
    tokens it hands out live; ``client_secrets`` maps a client id to the secret that
    client must present (HTTP basic or form ``client_secret``); ``token_status``
    answers every token request with that status instead (500, 503: the issuer is
    down).

    RSA keys come from a small shared pool (see `generate_private_key`); pass
    ``fresh_keys=True`` for keys of its own, as a demo should.
    """

    def __init__(
        self,
        issuer_url: str = "https://issuer.test/v2",
        alg: str = "RS256",
        clock: Any = None,
        *,
        fresh_keys: bool = False,
    ) -> None:
        self.issuer_url = issuer_url
        self.clock = clock
        self.fresh_keys = fresh_keys
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.requests: list[bytes] = []
        self.discovery_status = 200
        self.jwks_status = 200
        self.discovery_overrides: dict[str, Any] = {}
        self.jwks_body: bytes | None = None
        self.extra_jwks: list[dict[str, Any]] = []
        self.hold_jwks = False
        self.held: list[Request] = []
        self.token_requests = 0
        self.token_grants = 0
        self.rotate_refresh_tokens = False
        self.id_token_lifetime: float = 3600
        self.client_secrets: dict[str, str] = {}
        self.token_status = 200
        self._refresh_tokens: dict[str, _RefreshGrant] = {}
        self._keys: list[_SigningKey] = []
        self._removed: set[str] = set()
        self._stubs: list[StubTreq] = []
        self.rotate(alg, keep_old=False)

    # -- keys -------------------------------------------------------------------

    @property
    def kid(self) -> str:
        """
        The id of the current signing key; setting it renames that key (so a second
        issuer can pose as the first with the same kid and a different key).
        """
        return self._keys[-1].kid

    @kid.setter
    def kid(self, kid: str) -> None:
        current = self._keys[-1]
        current.kid = kid
        current.jwk["kid"] = kid

    @property
    def alg(self) -> str:
        """
        The algorithm of the current signing key.
        """
        return self._keys[-1].alg

    @property
    def private_key(self) -> Any:
        """
        The current signing key.
        """
        return self._keys[-1].private_key

    def rotate(self, alg: str | None = None, keep_old: bool = True) -> str:
        """
        Make a new signing key current and return its kid.

        With ``keep_old`` the JWKS still publishes the previous keys.
        """
        alg = alg or (self._keys[-1].alg if self._keys else "RS256")
        kid = f"key-{next(_counter)}-{secrets.token_hex(4)}"
        key = _SigningKey(kid, alg, generate_private_key(alg, fresh=self.fresh_keys))
        self._keys = (self._keys if keep_old else []) + [key]
        return kid

    def remove_key(self, kid: str) -> None:
        """
        Stop publishing the key ``kid`` (it can still sign if it is the current one).
        """
        self._removed.add(kid)

    def jwks(self) -> dict[str, Any]:
        """
        The JWKS document as served.
        """
        return {
            "keys": [k.jwk for k in self._keys if k.kid not in self._removed]
            + list(self.extra_jwks)
        }

    def public_pem(self) -> bytes:
        """
        The current public key as PEM (what an HMAC key-confusion forgery uses).
        """
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    # -- tokens -------------------------------------------------------------------

    def now(self) -> float:
        """
        The issuer's idea of the time: its clock, or the wall clock without one.
        """
        return self.clock.seconds() if self.clock is not None else time.time()

    def claims(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        subject: str = "user-1",
        audience: Any = "kubernetes",
        expires_in: float = 3600,
        issued_at: float | None = None,
    ) -> dict[str, Any]:
        """
        The claims a token would carry: iss, sub, aud, iat, exp, merged with ``claims``.

        Times are whole seconds, as issuers send them.
        """
        now = self.now()
        iat = now if issued_at is None else issued_at
        base = {
            "iss": self.issuer_url,
            "sub": subject,
            "aud": audience,
            "iat": math.floor(iat),
            "exp": math.floor(now + expires_in),
        }
        return _merge(base, claims)

    def token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        subject: str = "user-1",
        audience: Any = "kubernetes",
        expires_in: float = 3600,
        issued_at: float | None = None,
        alg: str | None = None,
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
        key: Any = None,
    ) -> str:
        """
        A signed ID token.

        It is signed with the current key, or ``key`` (a private key object) if
        given; the header's kid is the current kid unless ``kid`` or ``headers`` say
        otherwise (``headers={"kid": REMOVE}`` leaves it out).  ``alg`` defaults to
        the current key's algorithm; it must suit the key (RS/PS for RSA).
        """
        payload = self.claims(
            claims,
            subject=subject,
            audience=audience,
            expires_in=expires_in,
            issued_at=issued_at,
        )
        private_key = key if key is not None else self.private_key
        alg = alg or self.alg
        header = _merge({"alg": alg, "typ": "JWT", "kid": kid or self.kid}, headers)
        algorithm = _ALGORITHMS[alg]
        return compact(header, payload, lambda data: algorithm.sign(data, private_key))

    def forged_token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "none",
        secret: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
        **claim_options: Any,
    ) -> str:
        """
        A token no honest issuer makes: ``alg: none`` with an empty signature, or
        HS256/384/512 keyed with ``secret`` (by default the current public key PEM,
        the classic key-confusion attack).  Built by hand: PyJWT refuses to.
        """
        payload = self.claims(claims, **claim_options)
        header = _merge({"alg": alg, "typ": "JWT", "kid": self.kid}, headers)
        if alg == "none":
            return compact(header, payload, lambda data: b"")
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[
            alg
        ]
        secret = self.public_pem() if secret is None else secret
        return compact(
            header, payload, lambda data: hmac.new(secret, data, digest).digest()
        )

    def unsigned_token(self, claims: Mapping[str, Any] | None = None, **options: Any) -> str:
        """
        An ``alg: none`` token with an empty signature (`forged_token` with its default).
        """
        return self.forged_token(claims, alg="none", **options)

    # -- refresh tokens -------------------------------------------------------------

    def issue_refresh_token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        client_id: str = "kubernetes",
        subject: str = "user-1",
    ) -> str:
        """
        A new refresh token for ``client_id``: the token endpoint exchanges it for ID
        tokens with ``claims`` (merged as in `token`), ``sub`` = ``subject`` and
        ``aud`` = ``client_id``.
        """
        refresh_token = "rt-" + secrets.token_urlsafe(24)
        self._refresh_tokens[refresh_token] = _RefreshGrant(client_id, subject, dict(claims or {}))
        return refresh_token

    def revoke_refresh_token(self, refresh_token: str) -> None:
        """
        Make ``refresh_token`` unusable (the token endpoint answers ``invalid_grant``).
        """
        self._refresh_tokens.pop(refresh_token, None)

    def refresh_token_valid(self, refresh_token: str) -> bool:
        """
        Whether the token endpoint would accept ``refresh_token`` now.
        """
        return refresh_token in self._refresh_tokens

    def _token_response(self, request: Request) -> bytes:
        self.token_requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if self.token_status != 200:
            request.setResponseCode(self.token_status)
            return _json({"error": "temporarily_unavailable"})
        form = {
            key.decode("utf-8", "replace"): values[0].decode("utf-8", "replace")
            for key, values in (request.args or {}).items()
            if values
        }
        basic = _basic_credentials(request.getHeader(b"authorization"))
        client_id = basic[0] if basic else form.get("client_id", "")
        secret = basic[1] if basic else form.get("client_secret")

        def error(status: int, code: str, description: str) -> bytes:
            request.setResponseCode(status)
            if status == 401:
                request.setHeader(b"WWW-Authenticate", b'Basic realm="token"')
            return _json({"error": code, "error_description": description})

        if form.get("grant_type") != "refresh_token":
            return error(400, "unsupported_grant_type", "only refresh_token is supported")
        if not client_id:
            return error(400, "invalid_request", "client_id is missing")
        expected_secret = self.client_secrets.get(client_id)
        if expected_secret is not None and not (
            secret is not None and hmac.compare_digest(secret, expected_secret)
        ):
            return error(401, "invalid_client", "client authentication failed")
        refresh_token = form.get("refresh_token", "")
        grant = self._refresh_tokens.get(refresh_token)
        if grant is None or grant.client_id != client_id:
            return error(400, "invalid_grant", "the refresh token is invalid, expired or revoked")
        self.token_grants += 1
        body: dict[str, Any] = {
            "access_token": "at-" + secrets.token_urlsafe(16),
            "token_type": "Bearer",
            "expires_in": int(self.id_token_lifetime),
            "id_token": self.token(
                grant.claims,
                subject=grant.subject,
                audience=grant.client_id,
                expires_in=self.id_token_lifetime,
            ),
        }
        if self.rotate_refresh_tokens:
            del self._refresh_tokens[refresh_token]
            rotated = "rt-" + secrets.token_urlsafe(24)
            self._refresh_tokens[rotated] = grant
            body["refresh_token"] = rotated
        return _json(body)

    def config(self, **overrides: Any) -> OIDCConfig:
        """
        An ``[oidc]`` configuration that trusts this issuer (client id ``kubernetes``).
        """
        values: dict[str, Any] = {
            "issuer_url": self.issuer_url,
            "client_id": "kubernetes",
            "signing_algs": (self.alg,),
        }
        values.update(overrides)
        return OIDCConfig(**values)

    # -- serving ------------------------------------------------------------------

    def discovery_document(self) -> dict[str, Any]:
        """
        The discovery document as served.
        """
        base = self.issuer_url.rstrip("/")
        document = {
            "issuer": self.issuer_url,
            "jwks_uri": base + "/keys",
            "authorization_endpoint": base + "/authorize",
            "token_endpoint": base + "/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self._keys}),
        }
        return _merge(document, self.discovery_overrides)

    def resource(self) -> IResource:
        """
        A resource to serve at the root of a site: it answers the issuer's discovery
        and JWKS paths (taken from ``issuer_url`` at request time) and 404 otherwise.
        """
        return _IssuerResource(self)

    def stub_treq(self) -> StubTreq:
        """
        A ``StubTreq`` whose requests reach this issuer in memory.
        """
        stub = StubTreq(self.resource())
        self._stubs.append(stub)
        return stub

    def release_jwks(self) -> None:
        """
        Answer the JWKS requests held by ``hold_jwks`` and deliver the answers.
        """
        held, self.held = self.held, []
        for request in held:
            self._write_jwks(request)
            request.finish()
        for stub in self._stubs:
            stub.flush()

    def _drop_held(self, request: Request) -> None:
        # The client went away (a cancelled or timed-out fetch).
        if request in self.held:
            self.held.remove(request)

    def _write_jwks(self, request: Request) -> None:
        if self.jwks_status != 200:
            request.setResponseCode(self.jwks_status)
            request.write(b'{"error": "unavailable"}')
            return
        request.setHeader(b"Content-Type", b"application/json")
        body = self.jwks_body if self.jwks_body is not None else _json(self.jwks())
        request.write(body)

    def _render(self, request: Request) -> Any:
        self.requests.append(request.path)
        base = urlsplit(self.issuer_url).path.rstrip("/").encode("utf-8")
        if request.path == base + b"/.well-known/openid-configuration":
            self.discovery_fetches += 1
            if self.discovery_status != 200:
                request.setResponseCode(self.discovery_status)
                return b'{"error": "unavailable"}'
            request.setHeader(b"Content-Type", b"application/json")
            return _json(self.discovery_document())
        if request.path == base + b"/token":
            if request.method != b"POST":
                request.setResponseCode(405)
                request.setHeader(b"Allow", b"POST")
                return b'{"error": "method not allowed"}'
            return self._token_response(request)
        if request.path == base + b"/keys":
            self.jwks_fetches += 1
            if self.hold_jwks:
                self.held.append(request)
                request.notifyFinish().addErrback(lambda _: self._drop_held(request))
                return NOT_DONE_YET
            self._write_jwks(request)
            return b""
        request.setResponseCode(404)
        return b'{"error": "not found"}'


class _IssuerResource(Resource):
    """
    Serves an `OIDCIssuer` at whatever path its ``issuer_url`` has.
    """

    isLeaf = True

    def __init__(self, issuer: OIDCIssuer) -> None:
        super().__init__()
        self._issuer = issuer

    def render_GET(self, request: Request) -> Any:
        return self._issuer._render(request)

    render_POST = render_GET


class _RefreshGrant:
    """
    What a refresh token stands for: the client it was issued to and the ID token
    claims it yields.
    """

    def __init__(self, client_id: str, subject: str, claims: dict[str, Any]) -> None:
        self.client_id = client_id
        self.subject = subject
        self.claims = claims


def _basic_credentials(header: bytes | None) -> tuple[str, str] | None:
    """
    The client id and secret of an HTTP basic ``Authorization`` header (RFC 6749
    section 2.3.1: both form-urlencoded before base64), or None.
    """
    if not header or not header[:6].lower() == b"basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(user), unquote_plus(password)
