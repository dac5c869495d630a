"""
The impersonation and authentication bypass table (issue 9, point 1).

Each test is one attempt to get a privilege past the proxy: an identity header the
apiserver might honour, a token that should not verify, a claim that should not
become a header, a WebSocket or upgrade request that tries to skip authentication.
Each asserts what the client got back and exactly what reached the recording
upstream (or that nothing did).  Everything runs in memory: Twisted's real HTTP
server parser over a ``StringTransport``, the real `OIDCVerifier` over the in-memory
`OIDCIssuer`, a recording stand-in for the apiserver.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.config import ImpersonationConfig
from banyan_kproxy.identity import Identity, ImpersonationAuthorizer, OIDCVerifier
from banyan_kproxy.identity.impersonation import RequestedImpersonation
from banyan_kproxy.proxy.headers import WEBSOCKET_TOKEN_PREFIX
from banyan_kproxy.testing.issuer import OIDCIssuer, b64url, generate_private_key
from tests.test_identity import NOW, RecordingHTTP
from tests.test_proxy import ProxyHarness, sent_headers

ISSUER = "https://issuer.test/v2"
EMAIL = "alice@example.com"
USER = "banyan:" + EMAIL
GROUPS = ["banyan:dev", "banyan:ops", "system:authenticated"]

#: Headers the proxy adds itself to every upstream request.
PROXY_ADDED = {"authorization", "impersonate-user", "impersonate-group", "x-forwarded-for",
               "audit-id"}


class RecordingAuthorizer:
    """
    Allows every ``kubectl --as`` request and records the SubjectAccessReview checks
    the real authorizer would ask for.
    """

    def __init__(self) -> None:
        self.checks: list[Any] = []

    def authorize(self, requester: Identity, requested: RequestedImpersonation) -> Deferred[Identity]:
        self.checks.extend(requested.checks())
        return succeed(requested.identity(requester))


class BypassHarness(ProxyHarness):
    """
    The proxy behind a real HTTP channel, verifying tokens of an in-memory issuer with
    the seed's claim mapping (``email``, ``roles``, prefixes ``banyan:``).
    """

    def __init__(self, case: SynchronousTestCase, impersonation: ImpersonationConfig | None = None,
                 authorizer: Any = None, **oidc: Any) -> None:
        super().__init__(case, impersonation)
        # The test clock jumps to NOW; the connection the harness made would time out.
        self.channel.connectionLost(None)
        self.clock.advance(NOW)
        self.transport = StringTransport(peerAddress=self.transport.getPeer())
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.issuer = OIDCIssuer(ISSUER, clock=self.clock)
        options = {
            "username_claim": "email",
            "username_prefix": "banyan:",
            "groups_claim": "roles",
            "groups_prefix": "banyan:",
        }
        options.update(oidc)
        self.http = RecordingHTTP(self.issuer.stub_treq())
        self.verifier = OIDCVerifier(self.issuer.config(**options), self.http, self.clock)
        self.verifier.start()
        case.addCleanup(self.verifier.stop)
        case.assertTrue(self.verifier.ready)
        self.resource.verifier = self.verifier
        self.resource.authorizer = authorizer
        self.connects: list[Any] = []
        self.upstream.connect = self._connect  # type: ignore[method-assign]

    def _connect(self, protocol: Any) -> Deferred[Any]:
        """
        Record an upgrade's raw upstream connection and what it sends.
        """
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connects.append(transport)
        return succeed(protocol)

    def token(self, claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """
        A good token for alice (roles dev and ops), with ``claims`` merged in.
        """
        merged: dict[str, Any] = {"email": EMAIL, "email_verified": True, "roles": ["dev", "ops"]}
        merged.update(claims or {})
        return self.issuer.token(merged, **kwargs)

    def raw(self, head: bytes) -> None:
        """
        Send ``head`` as it is (a request head with its blank line, maybe a body).
        """
        self.channel.dataReceived(head)

    def request(self, lines: list[str], method: str = "GET",
                path: str = "/api/v1/namespaces/default/pods", body: bytes = b"") -> None:
        """
        Send a request with these header lines (and no others but Host).
        """
        head = [f"{method} {path} HTTP/1.1", "Host: kube.example.com", *lines]
        self.raw(("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body)

    def code(self) -> int:
        return self.response()[0]

    def upstream_headers(self) -> dict[str, list[str]]:
        """
        The headers of the one request that reached the apiserver.
        """
        [request] = self.agent.requests
        return sent_headers(request)

    def upgrade_head(self) -> bytes:
        """
        The request head of the one upgrade sent upstream.
        """
        [transport] = self.connects
        return transport.value()


class BypassTestCase(SynchronousTestCase):
    """
    Assertions shared by the bypass tests.
    """

    def refused(self, h: BypassHarness, code: int, reason: str | None = None) -> None:
        """
        The client got ``code`` and nothing reached the apiserver; a 401 was for
        ``reason`` (the verification metric's label).
        """
        self.assertEqual(h.code(), code)
        self.assertEqual(h.agent.requests, [])
        self.assertEqual(h.connects, [])
        if reason is not None:
            self.assertIn(
                b'kproxy_token_verifications_total{outcome="rejected",reason="%s"}' % reason.encode(),
                h.metrics.render(),
            )

    def only_own_identity(self, headers: dict[str, list[str]], user: str = USER,
                          groups: list[str] | None = None) -> None:
        """
        The upstream request asserts exactly the verified identity: the proxy's own
        credential, one user, these groups, and no other identity header in any
        spelling.
        """
        self.assertEqual(headers["authorization"], ["Bearer proxy-sa-token"])
        self.assertEqual(headers["impersonate-user"], [user])
        self.assertEqual(headers["impersonate-group"], GROUPS if groups is None else groups)
        for name in headers:
            normal = name.replace("_", "-")
            if normal.startswith(("impersonate-", "x-remote-")) or normal == "authorization":
                self.assertIn(name, ("impersonate-user", "impersonate-group", "authorization"))


class ImpersonationHeaderTests(BypassTestCase):
    """
    Client ``Impersonate-*`` and front-proxy headers, in every spelling.
    """

    def test_odd_case(self) -> None:
        """
        ``iMPERSONATE-uSER`` is refused with 403 as Impersonate-User is.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "iMPERSONATE-uSER: admin"])
        self.refused(h, 403)

    def test_surrounding_whitespace_in_value(self) -> None:
        """
        Whitespace around the value does not hide an Impersonate-Group header.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-Group: \t system:masters \t"])
        self.refused(h, 403)

    def test_whitespace_before_colon(self) -> None:
        """
        ``Impersonate-User : admin`` (space before the colon) is a 400 from the HTTP
        parser (Twisted 22.4 and 26.10 alike); nothing goes upstream.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-User : admin"])
        self.refused(h, 400)

    def test_obs_fold_cannot_smuggle_a_header(self) -> None:
        """
        An obs-fold continuation line that looks like an Impersonate header is part
        of the previous header's value: it never becomes a header of its own upstream.
        """
        h = BypassHarness(self)
        h.raw(b"GET /api HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer " + h.token().encode()
              + b"\r\nX-Note: a\r\n Impersonate-User: admin\r\n\tImpersonate-Group: system:masters"
              b"\r\n\r\n")
        headers = h.upstream_headers()
        self.only_own_identity(headers)
        self.assertEqual(len(headers["x-note"]), 1)
        self.assertNotIn("\r", headers["x-note"][0])
        self.assertNotIn("\n", headers["x-note"][0])

    def test_duplicates(self) -> None:
        """
        Two Impersonate-User lines are refused, not reconciled.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-User: admin",
                   "impersonate-user: alice"])
        self.refused(h, 403)

    def test_uid_and_extra(self) -> None:
        """
        Impersonate-Uid and Impersonate-Extra-* alone (without a user) are refused too.
        """
        for line in ("Impersonate-Uid: 0", "Impersonate-Extra-Scopes: all"):
            h = BypassHarness(self)
            h.request([f"Authorization: Bearer {h.token()}", line])
            self.refused(h, 403)

    def test_underscore_spellings_dropped(self) -> None:
        """
        ``Impersonate_User`` / ``impersonate_group`` never reach upstream: kube-apiserver
        does not read them, but anything behind it that maps ``_`` to ``-`` would.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate_User: admin",
                   "impersonate_group: system:masters", "Impersonate_Extra-Scopes: all"])
        self.only_own_identity(h.upstream_headers())
        self.assertEqual(set(h.upstream_headers()), PROXY_ADDED)

    def test_front_proxy_headers_dropped(self) -> None:
        """
        X-Remote-User / -Group / -Extra-* in any case are dropped; the verified
        identity alone goes upstream.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "X-Remote-User: admin",
                   "x-REMOTE-group: system:masters", "X-Remote-Extra-Scopes: all",
                   "X-Remote-Username: admin"])
        self.assertEqual(set(h.upstream_headers()), PROXY_ADDED)
        self.only_own_identity(h.upstream_headers())

    def test_front_proxy_underscore_spellings_dropped(self) -> None:
        """
        ``X_Remote_User`` and ``x_remote_group`` are dropped like their hyphenated
        forms.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "X_Remote_User: admin",
                   "x_remote_group: system:masters", "X-Remote_Extra-Scopes: all"])
        self.assertEqual(set(h.upstream_headers()), PROXY_ADDED)

    def test_x_forwarded_for_replaced(self) -> None:
        """
        A client's X-Forwarded-For (two lines of it) is replaced by the real peer.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "X-Forwarded-For: 10.0.0.1",
                   "x-forwarded-for: 127.0.0.1"])
        self.assertEqual(h.upstream_headers()["x-forwarded-for"], ["192.0.2.7"])

    def test_hop_by_hop_cannot_remove_impersonation(self) -> None:
        """
        Naming the impersonation headers in ``Connection:`` cannot make the proxy
        drop its own Impersonate-* or Authorization headers.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}",
                   "Connection: Impersonate-User, Impersonate-Group, Authorization"])
        self.only_own_identity(h.upstream_headers())


class CredentialPlacementTests(BypassTestCase):
    """
    Where a bearer token may (and may not) come from.
    """

    def test_two_authorization_headers(self) -> None:
        """
        Two Authorization headers, both valid, are refused rather than guessed at.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}",
                   f"Authorization: Bearer {h.token(subject='user-2')}"])
        self.refused(h, 401, "missing")

    def test_two_tokens_in_one_header(self) -> None:
        """
        ``Bearer a, Bearer b`` in one header is not a token.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}, Bearer {h.token(subject='user-2')}"])
        self.refused(h, 401, "malformed")

    def test_basic_scheme(self) -> None:
        """
        A token under the Basic scheme does not authenticate.
        """
        h = BypassHarness(self)
        encoded = base64.b64encode(f"x:{h.token()}".encode()).decode()
        h.request([f"Authorization: Basic {encoded}"])
        self.refused(h, 401, "missing")

    def test_query_string_token_does_not_authenticate(self) -> None:
        """
        ``?access_token=<valid token>`` does not authenticate a request.
        """
        h = BypassHarness(self)
        h.request([], path=f"/api/v1/pods?access_token={h.token()}")
        self.refused(h, 401, "missing")

    def test_query_string_token_is_not_the_identity(self) -> None:
        """
        With an Authorization header and another user's token in the query, the
        header's user is impersonated and the query goes upstream unchanged (the
        apiserver does not read tokens from the query).
        """
        h = BypassHarness(self)
        other = h.token({"email": "root@example.com"})
        h.request([f"Authorization: Bearer {h.token()}"], path=f"/api/v1/pods?access_token={other}")
        self.only_own_identity(h.upstream_headers())
        self.assertTrue(h.agent.requests[0]["uri"].endswith(b"?access_token=" + other.encode()))

    def test_proxy_authorization_not_a_credential(self) -> None:
        """
        A token in Proxy-Authorization neither authenticates nor goes upstream.
        """
        h = BypassHarness(self)
        h.request([f"Proxy-Authorization: Bearer {h.token()}"])
        self.refused(h, 401, "missing")


class TokenForgeryTests(BypassTestCase):
    """
    Tokens that must not verify: wrong audience or issuer, algorithm confusion, key
    references in the token header.
    """

    def send_token(self, h: BypassHarness, token: str) -> None:
        h.request([f"Authorization: Bearer {token}"])

    def test_other_audience(self) -> None:
        """
        A token of the right issuer for another client id is refused.
        """
        h = BypassHarness(self)
        self.send_token(h, h.token(audience="another-client"))
        self.refused(h, 401, "audience")

    def test_audience_list_without_client(self) -> None:
        """
        An ``aud`` list that does not contain the client id is refused.
        """
        h = BypassHarness(self)
        self.send_token(h, h.token(audience=["a", "kubernetes-x", "Kubernetes"]))
        self.refused(h, 401, "audience")

    def test_other_issuer_same_kid(self) -> None:
        """
        Another issuer posing with the real issuer's URL and key id, but its own
        key, is refused.
        """
        h = BypassHarness(self)
        impostor = OIDCIssuer(ISSUER, clock=h.clock, fresh_keys=True)
        impostor.kid = h.issuer.kid
        self.send_token(h, impostor.token({"email": EMAIL, "email_verified": True}))
        self.refused(h, 401, "signature")

    def test_issuer_url_variant(self) -> None:
        """
        A real signature over ``iss`` = the issuer URL with a trailing slash is refused.
        """
        h = BypassHarness(self)
        self.send_token(h, h.token({"iss": ISSUER + "/"}))
        self.refused(h, 401, "issuer")

    def test_alg_none(self) -> None:
        """
        ``alg: none`` (and its case variants) with an empty signature is refused.
        """
        for alg in ("none", "None", "NONE"):
            h = BypassHarness(self)
            claims = {"email": EMAIL, "email_verified": True}
            token = h.issuer.unsigned_token(claims, headers={"alg": alg})
            self.send_token(h, token)
            self.refused(h, 401, "algorithm")

    def test_hs256_with_public_key(self) -> None:
        """
        HS256 keyed with the issuer's RSA public key (PEM) is refused.
        """
        h = BypassHarness(self)
        self.send_token(h, h.issuer.forged_token({"email": EMAIL}, alg="HS256"))
        self.refused(h, 401, "algorithm")

    def test_hs256_with_jwk_as_secret(self) -> None:
        """
        HS256 keyed with the published JWK (JSON) or its modulus is refused.
        """
        jwk = None
        for secret_of in (lambda j: json.dumps(j).encode(), lambda j: j["n"].encode()):
            h = BypassHarness(self)
            jwk = h.issuer.jwks()["keys"][0]
            token = h.issuer.forged_token({"email": EMAIL}, alg="HS256", secret=secret_of(jwk))
            self.send_token(h, token)
            self.refused(h, 401, "algorithm")

    def test_kid_path_traversal(self) -> None:
        """
        ``kid: ../../etc/passwd`` is just an unknown key id: refused after at most
        one JWKS refetch, and nothing but the issuer's discovery and JWKS is fetched.
        """
        h = BypassHarness(self)
        before = list(h.http.urls)
        for kid in ("../../etc/passwd", "/dev/zero", "file:///etc/passwd", "' OR 1=1 --"):
            self.send_token(h, h.token(kid=kid))
            self.assertEqual(h.code(), 401)
            h.transport.clear()
        self.assertEqual(h.agent.requests, [])
        self.assertLessEqual(len(h.http.urls) - len(before), 1)
        self.assertTrue(all(url.startswith(ISSUER) for url in h.http.urls))

    def test_key_url_headers_ignored(self) -> None:
        """
        ``jku`` and ``x5u`` pointing at an attacker's key set are never fetched; a
        token signed with the attacker's key is refused.
        """
        h = BypassHarness(self)
        attacker = OIDCIssuer("https://evil.test", clock=h.clock, fresh_keys=True)
        token = attacker.token(
            {"iss": ISSUER, "email": EMAIL, "email_verified": True},
            headers={"jku": "https://evil.test/keys", "x5u": "https://evil.test/cert.pem"},
        )
        self.send_token(h, token)
        self.refused(h, 401, "unknown_kid")
        self.assertFalse(any("evil" in url for url in h.http.urls))
        self.assertEqual(attacker.requests, [])

    def test_embedded_key_headers_ignored(self) -> None:
        """
        A ``jwk`` or ``x5c`` header carrying the attacker's own key, with the real
        issuer's kid, is ignored: the signature is checked with the issuer's key.
        """
        h = BypassHarness(self)
        key = generate_private_key("RS256", fresh=True)
        attacker = OIDCIssuer(ISSUER, clock=h.clock, fresh_keys=True)
        jwk = attacker.jwks()["keys"][0]
        for extra in ({"jwk": jwk}, {"x5c": [b64url(b"not a certificate")]}):
            token = h.issuer.token({"email": EMAIL, "email_verified": True}, key=key,
                                   headers=extra)
            self.send_token(h, token)
            self.assertEqual(h.code(), 401)
            h.transport.clear()
        self.assertEqual(h.agent.requests, [])

    def test_signature_stripped(self) -> None:
        """
        A real token with its signature cut off, or replaced by another token's, is
        refused.
        """
        h = BypassHarness(self)
        good = h.token()
        other = h.token({"email": "root@example.com"})
        for token in (good.rsplit(".", 1)[0] + ".", good.rsplit(".", 1)[0],
                      other.rsplit(".", 1)[0] + "." + good.rsplit(".", 1)[1]):
            self.send_token(h, token)
            self.assertEqual(h.code(), 401)
            h.transport.clear()
        self.assertEqual(h.agent.requests, [])

    def test_crit_header(self) -> None:
        """
        A real signature over a header with ``crit`` extensions is refused.
        """
        h = BypassHarness(self)
        self.send_token(h, h.token(headers={"crit": ["exp"], "exp": 1}))
        self.refused(h, 401, "malformed")


class ClaimTests(BypassTestCase):
    """
    Claims that must not become identities or header values.
    """

    def claims_refused(self, reason: str, claims: dict[str, Any], **oidc: Any) -> None:
        h = BypassHarness(self, **oidc)
        h.request([f"Authorization: Bearer {h.token(claims)}"])
        self.refused(h, 401, reason)

    def test_crlf_in_email(self) -> None:
        """
        CR/LF in the user name claim (header injection) refuses the token.
        """
        self.claims_refused("invalid_claim", {"email": "alice@example.com\r\nImpersonate-Group: system:masters"})

    def test_lf_in_group(self) -> None:
        """
        A bare LF in a group refuses the token.
        """
        self.claims_refused("invalid_claim", {"roles": ["dev", "ops\nImpersonate-User: admin"]})

    def test_nul_and_controls(self) -> None:
        """
        NUL, DEL and C1 controls in a claim refuse the token.
        """
        for value in ("ali\x00ce@example.com", "alice@example.com\x7f", "alice\x85@example.com"):
            self.claims_refused("invalid_claim", {"email": value})

    def test_huge_groups_array(self) -> None:
        """
        More than 1000 groups refuses the token (no 1001-line header block upstream).
        """
        self.claims_refused("invalid_claim", {"roles": [f"g{i}" for i in range(1001)]})

    def test_non_string_user(self) -> None:
        """
        A number, object, list or boolean where the user name should be refuses the
        token.
        """
        for value in (12345, {"email": EMAIL}, [EMAIL], True):
            self.claims_refused("invalid_claim", {"email": value})

    def test_non_string_groups(self) -> None:
        """
        Groups holding numbers, booleans, objects or nulls refuse the token.
        """
        for value in ([1, 2], ["dev", True], [{"name": "system:masters"}], ["dev", None], 7):
            self.claims_refused("invalid_claim", {"roles": value})

    def test_email_verified_string_false(self) -> None:
        """
        ``email_verified: "false"`` (a string) is not ``true``: refused.
        """
        self.claims_refused("email_unverified", {"email_verified": "false"})

    def test_email_verified_string_true(self) -> None:
        """
        ``email_verified: "true"`` (a string) is not ``true`` either (kube-apiserver
        cannot parse it as a boolean and refuses too).
        """
        self.claims_refused("email_unverified", {"email_verified": "true"})

    def test_email_verified_zero_and_null(self) -> None:
        """
        ``email_verified`` 0, 1 or null is refused.
        """
        for value in (0, 1, None):
            self.claims_refused("email_unverified", {"email_verified": value})

    def test_email_verified_missing(self) -> None:
        """
        With ``username_claim = email`` a token without ``email_verified`` is
        accepted, as kube-apiserver accepts it (the claim is checked only when
        present): the issuer is trusted to put only verified addresses in ``email``.
        """
        h = BypassHarness(self)
        token = h.issuer.token({"email": EMAIL, "roles": ["dev", "ops"]})
        h.request([f"Authorization: Bearer {token}"])
        self.only_own_identity(h.upstream_headers())

    def test_system_masters_without_prefix(self) -> None:
        """
        With no groups prefix, a ``system:masters`` group claim refuses the token.
        """
        self.claims_refused("invalid_claim", {"roles": ["dev", "system:masters"]}, groups_prefix="")

    def test_system_masters_with_prefix(self) -> None:
        """
        With the ``banyan:`` prefix, ``system:masters`` becomes the harmless
        ``banyan:system:masters``: the real group never goes upstream.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token({'roles': ['system:masters']})}"])
        self.only_own_identity(
            h.upstream_headers(), groups=["banyan:system:masters", "system:authenticated"]
        )

    def test_system_user_without_prefix(self) -> None:
        """
        With no user prefix, a ``system:`` user name (``system:admin``,
        ``system:kube-controller-manager``) refuses the token.
        """
        for name in ("system:admin", "system:kube-controller-manager"):
            self.claims_refused("invalid_claim", {"email": name}, username_prefix="")
            self.claims_refused("invalid_claim", {"sub": name}, username_prefix="", username_claim="sub")

    def test_whitespace_padded_group(self) -> None:
        """
        `` system:masters`` (leading space) with no prefix cannot slip past the
        reserved-name check: the token is refused.
        """
        self.claims_refused("invalid_claim", {"roles": [" system:masters"]}, groups_prefix="")


class WebSocketTokenTests(BypassTestCase):
    """
    The ``base64url.bearer.authorization.k8s.io.`` sub-protocol in odd places.
    """

    EXEC = "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true"

    def entry(self, token: str) -> str:
        return (WEBSOCKET_TOKEN_PREFIX + base64.urlsafe_b64encode(token.encode()).rstrip(b"=")).decode()

    def websocket(self, lines: list[str]) -> list[str]:
        return ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", *lines]

    def test_upgrade_with_token(self) -> None:
        """
        The sub-protocol token authenticates a WebSocket upgrade and is removed from
        what goes upstream (the control for the tests below).
        """
        h = BypassHarness(self)
        h.request(self.websocket([f"Sec-WebSocket-Protocol: v5.channel.k8s.io, {self.entry(h.token())}"]),
                  path=self.EXEC)
        head = h.upgrade_head()
        self.assertIn(b"\r\nImpersonate-User: " + USER.encode() + b"\r\n", head)
        self.assertIn(b"\r\nsec-websocket-protocol: v5.channel.k8s.io\r\n", head.lower())
        self.assertNotIn(WEBSOCKET_TOKEN_PREFIX, head)

    def test_not_on_plain_request(self) -> None:
        """
        On a request that is not a WebSocket upgrade the sub-protocol token does not
        authenticate.
        """
        h = BypassHarness(self)
        h.request([f"Sec-WebSocket-Protocol: {self.entry(h.token())}"])
        self.refused(h, 401, "missing")

    def test_never_forwarded_on_plain_request(self) -> None:
        """
        A sub-protocol token on an authenticated plain request never goes upstream.
        """
        h = BypassHarness(self)
        other = h.token({"email": "root@example.com"})
        h.request([f"Authorization: Bearer {h.token()}",
                   f"Sec-WebSocket-Protocol: v5.channel.k8s.io, {self.entry(other)}",
                   f"Sec-WebSocket-Protocol: {self.entry(other)}"])
        headers = h.upstream_headers()
        self.only_own_identity(headers)
        self.assertEqual(headers["sec-websocket-protocol"], ["v5.channel.k8s.io"])

    def test_duplicated(self) -> None:
        """
        Two token entries (even the same one twice, in two header lines) are refused.
        """
        h = BypassHarness(self)
        entry = self.entry(h.token())
        h.request(self.websocket([f"Sec-WebSocket-Protocol: v5.channel.k8s.io, {entry}",
                                  f"Sec-WebSocket-Protocol: {entry}"]), path=self.EXEC)
        self.refused(h, 401, "malformed")

    def test_with_authorization(self) -> None:
        """
        A token entry together with an Authorization header is refused, whichever
        is valid.
        """
        h = BypassHarness(self)
        h.request(self.websocket([f"Authorization: Bearer {h.token()}",
                                  f"Sec-WebSocket-Protocol: {self.entry('x.y.z')}"]), path=self.EXEC)
        self.refused(h, 401, "malformed")

    def test_standard_base64_refused(self) -> None:
        """
        The entry must be unpadded base64url, as kube-apiserver requires: padding,
        the standard alphabet or stray characters are refused, not decoded leniently.
        """
        def padded(h: BypassHarness) -> str:
            token, extra = h.token(), ""
            while len(token) % 3 == 0:
                extra += "x"
                token = h.token({"pad": extra})
            encoded = base64.urlsafe_b64encode(token.encode()).decode()
            self.assertTrue(encoded.endswith("="))
            return encoded

        variants = [
            lambda e: e,
            lambda e: "!" + e.rstrip("="),
            lambda e: e.rstrip("=").replace("-", "+").replace("_", "/") + "/",
        ]
        for variant in variants:
            h = BypassHarness(self)
            encoded = variant(padded(h))
            h.request(self.websocket([f"Sec-WebSocket-Protocol: {WEBSOCKET_TOKEN_PREFIX.decode()}{encoded}"]),
                      path=self.EXEC)
            self.refused(h, 401, "malformed")
        # The control: the same token unpadded is accepted.
        h = BypassHarness(self)
        encoded = padded(h).rstrip("=")
        h.request(self.websocket([f"Sec-WebSocket-Protocol: {WEBSOCKET_TOKEN_PREFIX.decode()}{encoded}"]),
                  path=self.EXEC)
        self.assertEqual(len(h.connects), 1)


class UpgradeTests(BypassTestCase):
    """
    Upgrade requests that try to skip authentication.
    """

    EXEC = "/api/v1/namespaces/default/pods/web/exec?command=sh"

    def test_upgrade_without_token(self) -> None:
        """
        An upgrade without a token gets 401 and no upstream connection is opened.
        """
        h = BypassHarness(self)
        h.request(["Connection: Upgrade", "Upgrade: SPDY/3.1"], method="POST", path=self.EXEC)
        self.refused(h, 401, "missing")

    def test_connection_upgrade_without_upgrade(self) -> None:
        """
        ``Connection: Upgrade`` without ``Upgrade`` is an ordinary request: 401
        without a token, and with one it goes upstream without either header.
        """
        h = BypassHarness(self)
        h.request(["Connection: Upgrade"], path=self.EXEC)
        self.refused(h, 401, "missing")
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Connection: Upgrade"], path=self.EXEC)
        headers = h.upstream_headers()
        self.assertEqual(h.connects, [])
        self.assertNotIn("connection", headers)
        self.assertNotIn("upgrade", headers)

    def test_upgrade_without_connection(self) -> None:
        """
        ``Upgrade`` without ``Connection: Upgrade`` is an ordinary request and
        loses its hop-by-hop ``Upgrade`` header.
        """
        h = BypassHarness(self)
        h.request(["Upgrade: websocket"], path=self.EXEC)
        self.refused(h, 401, "missing")
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Upgrade: websocket"], path=self.EXEC)
        self.assertEqual(h.connects, [])
        self.assertNotIn("upgrade", h.upstream_headers())

    def test_h2c_upgrade_not_carried(self) -> None:
        """
        ``Upgrade: h2c`` is never tunnelled (the apiserver would then read HTTP/2
        requests from the client on a connection the proxy authenticated): it goes
        upstream as plain HTTP/1.1 without Upgrade or HTTP2-Settings.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Connection: Upgrade, HTTP2-Settings",
                   "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"])
        self.assertEqual(h.connects, [])
        headers = h.upstream_headers()
        self.only_own_identity(headers)
        for name in ("upgrade", "connection", "http2-settings"):
            self.assertNotIn(name, headers)

    def test_chunked_upgrade_request(self) -> None:
        """
        A chunked upgrade request goes upstream de-chunked with a Content-Length and
        no Transfer-Encoding, after authentication, with the proxy's identity.
        """
        h = BypassHarness(self)
        h.raw(b"POST " + self.EXEC.encode() + b" HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer "
              + h.token().encode() + b"\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        head = h.upgrade_head()
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertTrue(head.endswith(b"\r\nContent-Length: 3\r\n\r\nabc"))
        self.assertIn(b"\r\nImpersonate-User: " + USER.encode() + b"\r\n", head)
        self.assertIn(b"\r\nAuthorization: Bearer proxy-sa-token\r\n", head)

    def test_upgrade_with_length_and_chunked(self) -> None:
        """
        An upgrade request with both Content-Length and Transfer-Encoding is a 400
        from the HTTP parser; nothing goes upstream.
        """
        h = BypassHarness(self)
        h.raw(b"POST " + self.EXEC.encode() + b" HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer "
              + h.token().encode() + b"\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
              b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.refused(h, 400)

    def test_upgrade_identity_headers_dropped(self) -> None:
        """
        An upgrade request's own X-Remote-* and underscore Impersonate headers are
        not in the head the proxy writes upstream.
        """
        h = BypassHarness(self)
        h.request([f"Authorization: Bearer {h.token()}", "Connection: Upgrade",
                   "Upgrade: SPDY/3.1", "X-Remote-User: admin", "Impersonate_User: admin"],
                  method="POST", path=self.EXEC)
        head = h.upgrade_head().lower()
        self.assertNotIn(b"x-remote-user", head)
        self.assertNotIn(b"impersonate_user", head)
        self.assertEqual(head.count(b"\r\nimpersonate-user: "), 1)


class ClientImpersonationTests(BypassTestCase):
    """
    ``kubectl --as`` with ``allow_client_impersonation``: the SubjectAccessReviews
    are asked for exactly what the apiserver will be told.
    """

    def test_extra_key_percent_decoded(self) -> None:
        """
        ``Impersonate-Extra-Scopes%2Fread`` is checked as the key ``scopes/read`` (lower
        case, decoded), and sent upstream encoded once so the apiserver decodes the
        same key.
        """
        authorizer = RecordingAuthorizer()
        h = BypassHarness(self, authorizer=authorizer)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-User: bob",
                   "Impersonate-Extra-Scopes%2FRead: x", "Impersonate-Extra-a%252fb: y"])
        extras = {(c.subresource, c.name) for c in authorizer.checks if c.resource == "userextras"}
        self.assertEqual(extras, {("scopes/read", "x"), ("a%2fb", "y")})
        headers = h.upstream_headers()
        self.assertEqual(headers["impersonate-user"], ["bob"])
        self.assertEqual(headers["impersonate-extra-scopes%2fread"], ["x"])
        self.assertEqual(headers["impersonate-extra-a%252fb"], ["y"])

    def test_original_user_extra_cannot_be_forged(self) -> None:
        """
        The ``originaluser.banyan-kproxy.io/`` extras cannot be asked for, however the
        key is spelled or encoded: 403 and nothing upstream.
        """
        for name in ("Impersonate-Extra-originaluser.banyan-kproxy.io%2Fuser",
                     "Impersonate-Extra-OriginalUser.Banyan-Kproxy.IO%2fgroups",
                     "Impersonate-Extra-%6Friginaluser.banyan-kproxy.io%2Fuser"):
            h = BypassHarness(self)
            h.resource.authorizer = ImpersonationAuthorizer(h.upstream, h.clock)
            h.request([f"Authorization: Bearer {h.token()}", "Impersonate-User: bob",
                       f"{name}: banyan:root@example.com"])
            self.refused(h, 403)

    def test_client_ip_extra_not_spoofed(self) -> None:
        """
        A client that asks for the ``remote-client-ip`` extra (and is allowed it)
        cannot replace the peer address the proxy sends.
        """
        h = BypassHarness(self, ImpersonationConfig(client_ip=True), authorizer=RecordingAuthorizer())
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-User: bob",
                   "Impersonate-Extra-Remote-Client-Ip: 10.0.0.1"])
        self.assertEqual(h.upstream_headers()["impersonate-extra-remote-client-ip"], ["192.0.2.7"])

    def test_without_user_refused(self) -> None:
        """
        Impersonate-Group without Impersonate-User is refused before any review, as
        kube-apiserver refuses it.
        """
        authorizer = RecordingAuthorizer()
        h = BypassHarness(self, authorizer=authorizer)
        h.request([f"Authorization: Bearer {h.token()}", "Impersonate-Group: system:masters"])
        self.assertEqual(h.code(), 500)
        self.assertEqual(h.agent.requests, [])
        self.assertEqual(authorizer.checks, [])
