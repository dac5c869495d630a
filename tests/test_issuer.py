"""
Tests for `banyan_kproxy.testing.issuer`, the OIDC issuer test double.
"""

from __future__ import annotations

import jwt
import treq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from banyan_kproxy.testing.issuer import REMOVE, OIDCIssuer


class IssuerTests(SynchronousTestCase):
    """
    The issuer serves discovery and a JWKS and mints standard tokens.
    """

    def get_json(self, issuer: OIDCIssuer, url: str) -> object:
        """
        GET ``url`` from ``issuer`` in memory and decode the JSON answer.
        """
        response = self.successResultOf(issuer.stub_treq().get(url))
        self.assertEqual(response.code, 200)
        return self.successResultOf(treq.json_content(response))

    def test_discovery_follows_issuer_url(self) -> None:
        """Discovery is served under the issuer's path as it is when the request arrives."""
        issuer = OIDCIssuer()
        issuer.issuer_url = "http://127.0.0.1:8123/realms/test"
        document = self.get_json(
            issuer, "http://127.0.0.1:8123/realms/test/.well-known/openid-configuration"
        )
        self.assertEqual(document["issuer"], "http://127.0.0.1:8123/realms/test")
        self.assertEqual(document["jwks_uri"], "http://127.0.0.1:8123/realms/test/keys")
        self.assertEqual(issuer.discovery_fetches, 1)

    def test_unknown_path(self) -> None:
        """Paths other than discovery and the JWKS answer 404."""
        issuer = OIDCIssuer()
        response = self.successResultOf(
            issuer.stub_treq().get("https://issuer.test/v2/other")
        )
        self.assertEqual(response.code, 404)

    def test_tokens_verify_with_pyjwt(self) -> None:
        """Each algorithm's token verifies with PyJWT against the published JWK."""
        for alg in ("RS256", "PS384", "ES256", "ES384", "ES512"):
            issuer = OIDCIssuer(alg=alg)
            jwks = self.get_json(issuer, "https://issuer.test/v2/keys")
            self.assertEqual(issuer.jwks_fetches, 1)
            [jwk] = jwks["keys"]
            self.assertEqual((jwk["kid"], jwk["alg"], jwk["use"]), (issuer.kid, alg, "sig"))
            token = issuer.token({"groups": ["a"]}, subject="bob")
            claims = jwt.decode(
                token,
                jwt.PyJWK(jwk).key,
                algorithms=[alg],
                audience="kubernetes",
                issuer="https://issuer.test/v2",
            )
            self.assertEqual((claims["sub"], claims["groups"]), ("bob", ["a"]))
            self.assertEqual(jwt.get_unverified_header(token)["kid"], issuer.kid)

    def test_claims_follow_clock(self) -> None:
        """iat and exp come from the issuer's clock; claims merge and REMOVE drops one."""
        clock = Clock()
        clock.advance(1000)
        issuer = OIDCIssuer(clock=clock)
        claims = issuer.claims({"aud": ["a", "b"], "sub": REMOVE}, expires_in=60)
        self.assertEqual(
            claims,
            {"iss": "https://issuer.test/v2", "aud": ["a", "b"], "iat": 1000, "exp": 1060},
        )

    def test_rotate(self) -> None:
        """Rotation makes a new current kid and keeps or drops the old key as asked."""
        issuer = OIDCIssuer()
        first = issuer.kid
        second = issuer.rotate()
        self.assertEqual(issuer.kid, second)
        self.assertEqual([k["kid"] for k in issuer.jwks()["keys"]], [first, second])
        third = issuer.rotate("ES256", keep_old=False)
        self.assertEqual([k["kid"] for k in issuer.jwks()["keys"]], [third])
        self.assertEqual(issuer.alg, "ES256")

    def test_forged_tokens(self) -> None:
        """Forged tokens carry alg none with no signature, or an HMAC PyJWT refuses to check."""
        issuer = OIDCIssuer()
        unsigned = issuer.forged_token()
        self.assertTrue(unsigned.endswith("."))
        self.assertEqual(jwt.get_unverified_header(unsigned)["alg"], "none")
        hs = issuer.forged_token(alg="HS256")
        self.assertEqual(jwt.get_unverified_header(hs)["alg"], "HS256")
        self.assertRaises(
            jwt.InvalidKeyError, jwt.decode, hs, issuer.public_pem(), algorithms=["HS256"]
        )

    def test_kid_settable(self) -> None:
        """Setting kid renames the current key in tokens and in the JWKS."""
        issuer = OIDCIssuer()
        issuer.kid = "borrowed"
        self.assertEqual(jwt.get_unverified_header(issuer.token())["kid"], "borrowed")
        self.assertEqual([k["kid"] for k in issuer.jwks()["keys"]], ["borrowed"])

    def test_unsigned_token(self) -> None:
        """unsigned_token makes an alg none token with the given claims."""
        issuer = OIDCIssuer()
        token = issuer.unsigned_token({"email": "a@b.c"}, audience="x")
        claims = jwt.decode(token, options={"verify_signature": False})
        self.assertEqual((claims["email"], claims["aud"]), ("a@b.c", "x"))
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "none")

    def test_hold_and_release_jwks(self) -> None:
        """Held JWKS requests are answered when released."""
        issuer = OIDCIssuer()
        issuer.hold_jwks = True
        stub = issuer.stub_treq()
        d = stub.get("https://issuer.test/v2/keys")
        self.assertNoResult(d)
        issuer.release_jwks()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_failure_statuses(self) -> None:
        """discovery_status and jwks_status make the issuer answer with errors."""
        issuer = OIDCIssuer()
        issuer.discovery_status = 500
        issuer.jwks_status = 503
        stub = issuer.stub_treq()
        self.assertEqual(
            self.successResultOf(
                stub.get("https://issuer.test/v2/.well-known/openid-configuration")
            ).code,
            500,
        )
        self.assertEqual(
            self.successResultOf(stub.get("https://issuer.test/v2/keys")).code, 503
        )
