"""
A bounded fuzz run (issue 9, point 2) with ``hypothesis``: the token verifier, the
header policy and the CONNECT head parser, fed generated and mutated input.

hypothesis is used rather than hand-written generators because it shrinks a failure
to a minimal example and replays it from its database, which a loop over
``random`` cannot.  Every property runs a fixed number of examples with no
per-example deadline, so the whole module takes seconds in CI
(``max_examples`` is set per property below).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from banyan_kproxy.config import OIDCConfig
from banyan_kproxy.identity import Identity, OIDCVerifier, TokenRejected, VerifiedToken
from banyan_kproxy.identity.claims import check_claims
from banyan_kproxy.proxy.headers import (
    passthrough_request_headers,
    upstream_request_headers,
    websocket_bearer_token,
)
from banyan_kproxy.proxy.upgrade import request_head
from banyan_kproxy.testing.issuer import OIDCIssuer, b64url

NOW = 1_700_000_000.0
ISSUER = "https://issuer.test/v2"

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Bytes a header value must never carry upstream.
_UNSAFE = re.compile(rb"[\r\n\x00]")

_VERIFIER: dict[str, Any] = {}


def verifier() -> tuple[OIDCVerifier, OIDCIssuer, Clock]:
    """
    One started verifier for the module (keys loaded once), with its issuer and clock.
    """
    if not _VERIFIER:
        clock = Clock()
        clock.advance(NOW)
        issuer = OIDCIssuer(ISSUER, clock=clock)
        config = issuer.config(
            username_claim="email", username_prefix="banyan:", groups_claim="roles",
            groups_prefix="banyan:", jwks_min_refetch_interval=1e9, token_cache_size=0,
        )
        v = OIDCVerifier(config, issuer.stub_treq(), clock)
        v.start()
        assert v.ready
        _VERIFIER.update(verifier=v, issuer=issuer, clock=clock)
    return _VERIFIER["verifier"], _VERIFIER["issuer"], _VERIFIER["clock"]


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=max_leaves,
    )


#: Claim sets around the interesting names, with any JSON values.
claim_sets = st.dictionaries(
    st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "email", "email_verified",
                     "roles", "jti", "azp"]) | st.text(max_size=6),
    json_values(),
    max_size=10,
)

#: Token headers, including key references that must be ignored.
token_headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "HS256", "none", "None", "ES256", "PS256", "RS512", ""])
     | st.text(max_size=6)},
    optional={
        "kid": st.text(max_size=12) | st.integers(),
        "typ": st.text(max_size=5),
        "jku": st.just("https://evil.test/keys"),
        "x5u": st.just("https://evil.test/cert"),
        "jwk": st.dictionaries(st.text(max_size=3), st.text(max_size=8), max_size=3),
        "crit": st.lists(st.text(max_size=4), max_size=2),
    },
)


def _encode(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


class TokenVerifierFuzz(SynchronousTestCase):
    """
    The verifier refuses every forged or mangled token with `TokenRejected` alone.
    """

    def outcome(self, token: Any) -> VerifiedToken | TokenRejected:
        v, _, _ = verifier()
        d = v.verify(token)
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "verify() did not answer synchronously")
        [result] = results
        if isinstance(result, VerifiedToken):
            return result
        self.assertTrue(result.check(TokenRejected), result.getTraceback())
        return result.value

    @FUZZ
    @given(st.text(max_size=300) | st.binary(max_size=300))
    def test_random_strings(self, token: Any) -> None:
        """
        Any string or bytes is refused with TokenRejected.
        """
        self.assertIsInstance(self.outcome(token), TokenRejected)

    @FUZZ
    @given(token_headers, claim_sets, st.binary(max_size=300))
    def test_forged_signatures(self, header: dict[str, Any], claims: dict[str, Any],
                               signature: bytes) -> None:
        """
        A token with any header and claims and a signature not made with the
        issuer's key is refused.
        """
        token = f"{_encode(header)}.{_encode(claims)}.{b64url(signature)}"
        self.assertIsInstance(self.outcome(token), TokenRejected)

    @FUZZ
    @given(st.data())
    def test_mutated_good_token(self, data: st.DataObject) -> None:
        """
        A good token changed in any one place (a character replaced, inserted or
        removed, segments swapped or dropped) is refused, unless the change left
        it byte-for-byte the same.
        """
        _, issuer, _ = verifier()
        good = issuer.token({"email": "a@example.com", "email_verified": True, "roles": ["dev"]})
        self.assertIsInstance(self.outcome(good), VerifiedToken)
        kind = data.draw(st.sampled_from(["replace", "insert", "delete", "segments"]))
        position = data.draw(st.integers(0, len(good) - 1))
        char = data.draw(st.characters(min_codepoint=0, max_codepoint=0x2FF))
        if kind == "replace":
            token = good[:position] + char + good[position + 1:]
        elif kind == "insert":
            token = good[:position] + char + good[position:]
        elif kind == "delete":
            token = good[:position] + good[position + 1:]
        else:
            parts = good.split(".")
            order = data.draw(st.lists(st.sampled_from([0, 1, 2]), max_size=5))
            token = ".".join(parts[i] for i in order)
        result = self.outcome(token)
        if token != good and base64_equivalent(token) != base64_equivalent(good):
            self.assertIsInstance(result, TokenRejected)

    @FUZZ
    @given(claim_sets)
    def test_signed_claims_map_to_safe_identities(self, claims: dict[str, Any]) -> None:
        """
        A token really signed by the issuer, with any claims, is either refused with
        TokenRejected or maps to an identity whose every value can be a header value
        and is never a Kubernetes ``system:`` name.
        """
        _, issuer, _ = verifier()
        base = {"iss": ISSUER, "aud": "kubernetes", "exp": NOW + 60, "sub": "s"}
        result = self.outcome(issuer.token({**base, **claims}))
        if isinstance(result, VerifiedToken):
            for value in (result.identity.user, *result.identity.groups):
                self.assertIsNone(_UNSAFE.search(value.encode("utf-8", "surrogatepass")))
                self.assertFalse(value.startswith("system:"))


def base64_equivalent(token: str) -> str:
    """
    ``token`` with each segment decoded and re-encoded, for deciding whether a
    mutation changed what the token says (a change in the unused low bits of the
    last base64 character does not).
    """
    out = []
    for part in token.split("."):
        try:
            out.append(base64.urlsafe_b64encode(
                base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))).decode())
        except Exception:  # noqa: BLE001 - undecodable: keep as it is
            out.append(part)
    return ".".join(out)


#: Header names: identity headers in every spelling, and others.
header_names = st.one_of(
    st.sampled_from([
        "Impersonate-User", "impersonate-group", "IMPERSONATE-UID", "Impersonate-Extra-scopes",
        "Impersonate_User", "impersonate_group", "X-Remote-User", "x-remote-group",
        "X-Remote-Extra-Scopes", "X_Remote_User", "Authorization", "authorization",
        "Proxy-Authorization", "Connection", "Upgrade", "Transfer-Encoding", "Host",
        "X-Forwarded-For", "Audit-ID", "Sec-WebSocket-Protocol", "Accept", "User-Agent",
    ]),
    st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z"),
    st.builds(lambda p, s: p + s,
              st.sampled_from(["Impersonate", "impersonate", "X-Remote", "x_remote", "IMPERSONATE"]),
              st.from_regex(r"\A[-_][A-Za-z0-9_-]{0,10}\Z")),
)
header_values = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
identity_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), min_size=1,
    max_size=30,
).map(str.strip).filter(bool)


#: kube-apiserver's front-proxy (requestheader) identity headers.
_FRONT_PROXY = (b"x-remote-user", b"x-remote-group", b"x-remote-extra-")


def _normal(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


class HeaderPolicyFuzz(SynchronousTestCase):
    """
    No client header set gets an identity assertion or a client credential upstream.
    """

    @FUZZ
    @given(st.lists(st.tuples(header_names, header_values), max_size=25), identity_text,
           st.lists(identity_text, max_size=4))
    def test_upstream_headers(self, pairs: list[tuple[str, bytes]], user: str,
                              groups: list[str]) -> None:
        """
        Whatever the client sends, upstream gets no client Authorization, no
        Impersonate-* or X-Remote-* header in any spelling but the proxy's own, and
        exactly the verified user.
        """
        client = Headers()
        for name, value in pairs:
            client.addRawHeader(name.encode("ascii"), value)
        identity = Identity(user=user, groups=tuple(groups))
        out = upstream_request_headers(client, identity, "192.0.2.7")
        own = {b"impersonate-user", b"impersonate-group"}
        for name, values in out.getAllRawHeaders():
            normal = _normal(name)
            self.assertNotIn(normal, (b"authorization", b"proxy-authorization"))
            if normal.startswith((b"impersonate-", *_FRONT_PROXY)):
                self.assertIn(name.lower(), own)
            if name.lower() == b"sec-websocket-protocol":
                self.assertNotIn(b"bearer.authorization.k8s.io", b"".join(values))
        self.assertEqual(out.getRawHeaders(b"impersonate-user"), [user.encode("utf-8")])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.7"])
        passthrough = passthrough_request_headers(client, "192.0.2.7")
        for name, _ in passthrough.getAllRawHeaders():
            normal = _normal(name)
            self.assertFalse(normal.startswith(_FRONT_PROXY))
            if normal.startswith(b"impersonate-"):
                # Kept for the apiserver to judge with the caller's own token, but
                # only in the spelling it reads.
                self.assertTrue(name.lower().startswith(b"impersonate-"))

    @FUZZ
    @given(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=5)
           | st.text(max_size=20))
    def test_claims_never_make_unsafe_headers(self, email: str, roles: Any) -> None:
        """
        Claims with any characters either refuse the token or become header values
        without CR, LF or NUL, in the headers and in an upgrade's raw request head.
        """
        config = OIDCConfig(issuer_url=ISSUER, client_id="k", username_claim="email",
                            groups_claim="roles", groups_prefix="", username_prefix="")
        claims = {"iss": ISSUER, "sub": "s", "aud": "k", "exp": NOW + 60, "email": email,
                  "roles": roles}
        try:
            verified = check_claims(claims, config, NOW)
        except TokenRejected:
            return
        out = upstream_request_headers(Headers(), verified.identity, None)
        for _, values in out.getAllRawHeaders():
            for value in values:
                self.assertIsNone(_UNSAFE.search(value))
        head = request_head(b"GET", b"/api", b"h", out, 0)
        lines = head.split(b"\r\n")
        self.assertEqual(lines[-2:], [b"", b""])
        for line in lines[1:-2]:
            self.assertIsNone(_UNSAFE.search(line))

    @FUZZ
    @given(st.lists(st.binary(max_size=80), max_size=4))
    def test_websocket_protocol_header(self, values: list[bytes]) -> None:
        """
        Any Sec-WebSocket-Protocol values give a token that is ASCII without spaces
        or controls, or a problem, never an exception.
        """
        headers = Headers()
        for value in values:
            headers.addRawHeader(b"Sec-WebSocket-Protocol", value.replace(b"\r", b"").replace(b"\n", b""))
        token, problem, _ = websocket_bearer_token(headers)
        if token is not None:
            self.assertIsNone(problem)
            self.assertTrue(token.isascii())
            self.assertIsNone(re.search(r"[\s\x00-\x1f]", token))


try:
    from banyan_kproxy import connectserver
    from tests.test_connectserver import Harness as ConnectHarness
except ImportError:  # pragma: no cover - the CONNECT server is optional in this tree
    connectserver = None  # type: ignore[assignment]


class ConnectParserFuzz(SynchronousTestCase):
    """
    The CONNECT listener's head parser, fed arbitrary heads.
    """

    def setUp(self) -> None:
        if connectserver is None:
            raise self.skipTest("banyan_kproxy.connectserver is not in this tree")  # type: ignore[misc]

    @FUZZ
    @given(st.text(max_size=60))
    def test_parse_authority(self, target: str) -> None:
        """
        parse_authority returns a port in 1-65535 and a host without separators, or
        raises ValueError.
        """
        try:
            host, port = connectserver.parse_authority(target)
        except ValueError:
            return
        self.assertTrue(0 < port < 65536)
        self.assertFalse(set(host) & set("/@?# \r\n\x00"))

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda method, target, version, lines: b"%s %s %s\r\n%s\r\n" % (
                method, target, version, b"".join(line + b"\r\n" for line in lines)),
            st.sampled_from([b"CONNECT", b"connect", b"GET", b"CONNECT "]),
            st.sampled_from([b"example.com:443", b"[::1]:6443", b"a:0", b"a:65536", b"/x",
                             b"user@h:1", b"h:1/", b"10.0.0.1:443"]) | st.binary(max_size=20),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]),
            st.lists(st.binary(max_size=40), max_size=6),
        ),
    ), st.integers(1, 7))
    def test_protocol_heads(self, data: bytes, pieces: int) -> None:
        """
        Any bytes, in any number of reads, leave the CONNECT protocol either asking
        its policy for a destination that parses as host:port (only for a
        ``CONNECT`` request line) or answering/closing; never an exception.
        """
        harness = ConnectHarness()
        protocol, transport = harness.connect()
        assert isinstance(transport, StringTransportWithDisconnection)
        size = max(1, len(data) // pieces)
        for start in range(0, len(data), size):
            if transport.disconnecting:
                break
            protocol.dataReceived(data[start:start + size])
        for request in harness.policy.requests:
            self.assertTrue(data.startswith(b"CONNECT "))
            self.assertEqual(connectserver.parse_authority(request.target), (request.host, request.port))
        protocol.connectionLost(Failure(ConnectionDone()))
        for pending in harness.policy.pending:
            self.assertTrue(pending.called or harness.policy.cancelled)
