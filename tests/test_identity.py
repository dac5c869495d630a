"""
Tests for `banyan_kproxy.identity`: OIDC discovery, the JWKS cache and token checks.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from itertools import pairwise
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from banyan_kproxy.identity import (
    REJECTION_REASONS,
    Identity,
    ITokenVerifier,
    OIDCVerifier,
    TokenRejected,
    VerifiedToken,
)
from banyan_kproxy.testing.issuer import REMOVE, OIDCIssuer, b64url, generate_private_key

#: A plausible "now" for the test clock.
NOW = 1_700_000_000.0

#: Claims every test token carries unless a test says otherwise.
DEFAULT_CLAIMS = {
    "email": "alice@example.com",
    "email_verified": True,
    "roles": ["dev", "ops"],
    "jti": "token-1",
}


class RecordingHTTP:
    """
    A treq-like client that records every URL asked for, then asks ``http``.
    """

    def __init__(self, http: Any) -> None:
        self.http = http
        self.urls: list[str] = []

    def get(self, url: str, **kwargs: Any) -> Any:
        """
        Record ``url`` and fetch it.
        """
        self.urls.append(url)
        return self.http.get(url, **kwargs)


class VerifierTestCase(SynchronousTestCase):
    """
    Builds a verifier over an in-memory issuer, on a test clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.issuer = OIDCIssuer(clock=self.clock)
        # Runs after every verifier's stop(): nothing may be left scheduled.
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def make(
        self,
        issuer: OIDCIssuer | None = None,
        start: bool = True,
        http: Any = None,
        verifier_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> OIDCVerifier:
        """
        A verifier trusting ``issuer`` with the seed's mapping, started unless told not to.
        """
        issuer = issuer or self.issuer
        options = {
            "username_claim": "email",
            "username_prefix": "banyan:",
            "groups_claim": "roles",
            "groups_prefix": "banyan:",
        }
        options.update(overrides)
        verifier = OIDCVerifier(
            issuer.config(**options),
            http if http is not None else issuer.stub_treq(),
            self.clock,
            **(verifier_options or {}),
        )
        self.addCleanup(verifier.stop)
        if start:
            verifier.start()
        return verifier

    def token(
        self, claims: dict[str, Any] | None = None, issuer: OIDCIssuer | None = None, **kwargs: Any
    ) -> str:
        """
        A token from ``issuer`` with `DEFAULT_CLAIMS` merged with ``claims``.
        """
        merged = dict(DEFAULT_CLAIMS)
        merged.update(claims or {})
        return (issuer or self.issuer).token(merged, **kwargs)

    def accepted(self, verifier: OIDCVerifier, token: str) -> VerifiedToken:
        """
        The result of verifying ``token``, which must already have succeeded.
        """
        result = self.successResultOf(verifier.verify(token))
        self.assertIsInstance(result, VerifiedToken)
        return result

    def rejected(self, verifier: OIDCVerifier, token: Any, reason: str) -> TokenRejected:
        """
        The rejection of ``token``, which must already have failed for ``reason``.
        """
        failure = self.failureResultOf(verifier.verify(token), TokenRejected)
        error = failure.value
        self.assertEqual(error.reason, reason, error.detail)
        self.assertIn(error.reason, REJECTION_REASONS)
        self.assertEqual(str(error), error.detail)
        if isinstance(token, str) and token:
            self.assertNotIn(token, error.detail)
            signature = token.rsplit(".", 1)[-1]
            if len(signature) > 8:
                self.assertNotIn(signature, error.detail)
        return error


class VerifyTests(VerifierTestCase):
    """
    A valid token maps to an identity; the verifier's public surface.
    """

    def test_valid_token(self) -> None:
        """A valid token yields the prefixed user and groups, its exp, iss, sub and jti."""
        verifier = self.make()
        result = self.accepted(verifier, self.token())
        self.assertEqual(
            result,
            VerifiedToken(
                identity=Identity(
                    user="banyan:alice@example.com", groups=("banyan:dev", "banyan:ops")
                ),
                expires_at=NOW + 3600,
                issuer="https://issuer.test/v2",
                subject="user-1",
                jti="token-1",
            ),
        )

    def test_provides_interface(self) -> None:
        """The verifier provides ITokenVerifier."""
        self.assertTrue(verifyObject(ITokenVerifier, self.make()))

    def test_bytes_token(self) -> None:
        """A token given as bytes is verified like the same token as text."""
        verifier = self.make()
        token = self.token()
        self.assertEqual(
            self.accepted(verifier, token.encode("ascii")).identity.user,
            "banyan:alice@example.com",
        )

    def test_no_groups_claim_configured(self) -> None:
        """With no groups_claim configured the identity has no groups."""
        verifier = self.make(groups_claim="")
        self.assertEqual(self.accepted(verifier, self.token()).identity.groups, ())

    def test_username_from_sub(self) -> None:
        """With username_claim sub and no prefix the user is the subject itself."""
        verifier = self.make(username_claim="sub", username_prefix="")
        self.assertEqual(
            self.accepted(verifier, self.token(subject="u-42")).identity.user, "u-42"
        )

    def test_rejection_reasons(self) -> None:
        """Every rejection in this module uses a label from REJECTION_REASONS."""
        self.assertEqual(len(REJECTION_REASONS), 14)
        self.assertEqual(TokenRejected("expired", "why").reason, "expired")


class LoadingTests(VerifierTestCase):
    """
    Discovery, the first JWKS load, retries, refreshes and stopping.
    """

    def test_ready_after_keys_load(self) -> None:
        """The verifier is not ready until the JWKS arrives, then ready with no error."""
        self.issuer.hold_jwks = True
        verifier = self.make()
        self.assertFalse(verifier.ready)
        self.assertIsNone(verifier.keys_loaded_at)
        self.clock.advance(2)
        self.issuer.release_jwks()
        self.assertTrue(verifier.ready)
        self.assertIsNone(verifier.last_error)
        self.assertEqual(verifier.keys_loaded_at, NOW + 2)
        self.assertEqual(verifier.jwks_fetches, 1)
        self.assertEqual(self.issuer.jwks_fetches, 1)

    def test_not_started(self) -> None:
        """A verifier that was never started refuses tokens as keys_unavailable."""
        verifier = self.make(start=False)
        self.assertFalse(verifier.ready)
        self.rejected(verifier, self.token(), "keys_unavailable")
        self.assertEqual(self.issuer.discovery_fetches, 0)

    def test_verify_waits_for_first_load_in_flight(self) -> None:
        """A token arriving while the first JWKS fetch is in flight waits for it."""
        self.issuer.hold_jwks = True
        verifier = self.make()
        d = verifier.verify(self.token())
        self.assertNoResult(d)
        self.issuer.release_jwks()
        self.assertEqual(
            self.successResultOf(d).identity.user, "banyan:alice@example.com"
        )

    def test_keys_unavailable_fails_fast(self) -> None:
        """With discovery failing and no fetch in flight, a token is refused at once."""
        self.issuer.discovery_status = 500
        verifier = self.make()
        self.assertFalse(verifier.ready)
        self.assertIn("HTTP 500", verifier.last_error)
        error = self.rejected(verifier, self.token(), "keys_unavailable")
        self.assertIn("HTTP 500", error.detail)

    def test_backoff(self) -> None:
        """Failed loads are retried after 1, 2, 4 ... seconds, capped at 60."""
        self.issuer.discovery_status = 503
        self.make()
        self.assertEqual(self.issuer.discovery_fetches, 1)
        attempts = [self.clock.seconds()]
        for _ in range(10):
            self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
            attempts.append(self.clock.seconds())
        gaps = [b - a for a, b in pairwise(attempts)]
        self.assertEqual(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60])
        self.assertEqual(self.issuer.discovery_fetches, 11)

    def test_recovers_after_failures(self) -> None:
        """Once the issuer recovers the keys load, the error clears and refresh is hourly."""
        self.issuer.jwks_status = 500
        verifier = self.make(jwks_refresh_interval=3600)
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(self.issuer.jwks_fetches, 3)
        self.assertFalse(verifier.ready)
        self.issuer.jwks_status = 200
        self.clock.advance(4)
        self.assertTrue(verifier.ready)
        self.assertIsNone(verifier.last_error)
        self.assertEqual(self.issuer.jwks_fetches, 4)
        self.clock.advance(3599)
        self.assertEqual(self.issuer.jwks_fetches, 4)
        self.clock.advance(1)
        self.assertEqual(self.issuer.jwks_fetches, 5)

    def test_discovery_issuer_mismatch(self) -> None:
        """A discovery document naming another issuer is refused and its keys never fetched."""
        self.issuer.discovery_overrides = {"issuer": "https://evil.test/v2"}
        verifier = self.make()
        self.assertFalse(verifier.ready)
        self.assertIn("https://evil.test/v2", verifier.last_error)
        self.assertIn("refusing its keys", verifier.last_error)
        self.assertEqual(self.issuer.jwks_fetches, 0)
        self.assertEqual(verifier.jwks_fetches, 0)
        self.rejected(verifier, self.token(), "keys_unavailable")

    def test_discovery_issuer_trailing_slash_mismatch(self) -> None:
        """An issuer that differs only by a trailing slash is still a mismatch."""
        self.issuer.discovery_overrides = {"issuer": "https://issuer.test/v2/"}
        verifier = self.make()
        self.assertFalse(verifier.ready)
        self.assertEqual(self.issuer.jwks_fetches, 0)

    def test_issuer_url_with_trailing_slash(self) -> None:
        """An issuer URL ending in a slash is discovered once-slashed and matched exactly."""
        issuer = OIDCIssuer("https://issuer.test/v2/", clock=self.clock)
        verifier = self.make(issuer)
        self.assertEqual(issuer.requests[0], b"/v2/.well-known/openid-configuration")
        self.assertTrue(verifier.ready)
        self.accepted(verifier, self.token(issuer=issuer))
        self.rejected(
            verifier,
            self.token({"iss": "https://issuer.test/v2"}, issuer=issuer),
            "issuer",
        )

    def test_discovery_without_jwks_uri(self) -> None:
        """A discovery document without a jwks_uri loads no keys."""
        self.issuer.discovery_overrides = {"jwks_uri": REMOVE}
        verifier = self.make()
        self.assertIn("no jwks_uri", verifier.last_error)

    def test_plain_http_jwks_uri_refused(self) -> None:
        """An https issuer's jwks_uri must be https too."""
        self.issuer.discovery_overrides = {"jwks_uri": "http://issuer.test/v2/keys"}
        verifier = self.make()
        self.assertFalse(verifier.ready)
        self.assertIn("jwks_uri", verifier.last_error)
        self.assertEqual(self.issuer.jwks_fetches, 0)

    def test_discovery_not_an_object(self) -> None:
        """A discovery document that is not a JSON object loads no keys."""
        self.issuer.discovery_document = lambda: ["not", "an", "object"]  # type: ignore
        verifier = self.make()
        self.assertIn("not a JSON object", verifier.last_error)
        self.assertEqual(self.issuer.jwks_fetches, 0)

    def test_keys_kept_when_issuer_down(self) -> None:
        """When the issuer starts failing, the keys already loaded keep verifying tokens."""
        verifier = self.make(jwks_refresh_interval=600)
        self.issuer.discovery_status = 500
        self.issuer.jwks_status = 500
        self.clock.advance(600)
        self.assertTrue(verifier.ready)
        self.assertIn("HTTP 500", verifier.last_error)
        self.accepted(verifier, self.token())

    def test_failing_since(self) -> None:
        """
        ``failing_since`` is the time of the first failed fetch after a success and
        ``fetch_failures`` counts every failure; both show the keys are stale until
        a fetch succeeds again, which clears ``failing_since`` and ``last_error``.
        """
        verifier = self.make(jwks_refresh_interval=600)
        self.assertEqual((verifier.failing_since, verifier.fetch_failures), (None, 0))
        loaded = verifier.keys_loaded_at
        self.issuer.discovery_status = 503
        self.clock.advance(600)
        first = self.clock.seconds()
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual((verifier.failing_since, verifier.fetch_failures), (first, 3))
        self.assertEqual(verifier.keys_loaded_at, loaded)
        self.issuer.discovery_status = 200
        self.clock.advance(4)
        self.assertEqual((verifier.failing_since, verifier.last_error), (None, None))
        self.assertEqual(verifier.fetch_failures, 3)
        self.assertEqual(verifier.keys_loaded_at, self.clock.seconds())

    def test_bad_jwks_json_keeps_keys(self) -> None:
        """A JWKS that is not JSON keeps the old keys and is retried after a second."""
        verifier = self.make(jwks_refresh_interval=600)
        self.issuer.jwks_body = b"<html>oops</html>"
        self.clock.advance(600)
        self.assertIn("not JSON", verifier.last_error)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.issuer.jwks_body = None
        self.clock.advance(1)
        self.assertEqual(self.issuer.jwks_fetches, 3)
        self.assertIsNone(verifier.last_error)
        self.accepted(verifier, self.token())

    def test_jwks_without_keys_array(self) -> None:
        """A JSON document without a keys array is not a JWKS."""
        self.issuer.jwks_body = b'{"kys": []}'
        verifier = self.make()
        self.assertIn("'keys' array", verifier.last_error)
        self.assertFalse(verifier.ready)

    def test_jwks_with_no_usable_keys_keeps_keys(self) -> None:
        """A JWKS whose keys are all unusable does not replace the keys loaded before."""
        verifier = self.make(jwks_refresh_interval=600)
        self.issuer.jwks_body = b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
        self.clock.advance(600)
        self.assertIn("no usable signing keys", verifier.last_error)
        self.accepted(verifier, self.token())

    def test_oversized_jwks(self) -> None:
        """A JWKS larger than the document limit is refused."""
        self.issuer.extra_jwks = [{"kty": "oct", "k": "A" * 5000}]
        verifier = self.make(verifier_options={"max_document_size": 4096})
        self.assertIn("larger than 4096 bytes", verifier.last_error)
        self.assertFalse(verifier.ready)

    def test_fetch_timeout(self) -> None:
        """A JWKS that never arrives times out, is retried, and waiting tokens are refused."""
        self.issuer.hold_jwks = True
        verifier = self.make(verifier_options={"fetch_timeout": 10})
        d = verifier.verify(self.token())
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertIn("did not arrive within 10s", verifier.last_error)
        failure = self.failureResultOf(d, TokenRejected)
        self.assertEqual(failure.value.reason, "keys_unavailable")
        self.issuer.hold_jwks = False
        self.clock.advance(1)
        self.assertTrue(verifier.ready)

    def test_periodic_refresh(self) -> None:
        """The JWKS is fetched again every jwks_refresh_interval."""
        verifier = self.make(jwks_refresh_interval=300)
        self.assertEqual(self.issuer.jwks_fetches, 1)
        self.clock.advance(299)
        self.assertEqual(self.issuer.jwks_fetches, 1)
        self.clock.advance(1)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.assertEqual(self.issuer.discovery_fetches, 2)
        self.clock.advance(300)
        self.assertEqual(self.issuer.jwks_fetches, 3)
        self.assertEqual(verifier.keys_loaded_at, NOW + 600)

    def test_periodic_refresh_picks_up_rotation(self) -> None:
        """A key rotated in without the old one is used after the next periodic refresh."""
        verifier = self.make(jwks_refresh_interval=300)
        self.issuer.rotate(keep_old=False)
        self.clock.advance(300)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.accepted(verifier, self.token())
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_stop_cancels_in_flight_fetch(self) -> None:
        """Stopping cancels a fetch in flight, refuses tokens waiting on it, and leaves no timers."""
        self.issuer.hold_jwks = True
        verifier = self.make()
        d = verifier.verify(self.token())
        verifier.stop()
        self.assertEqual(self.failureResultOf(d, TokenRejected).value.reason, "keys_unavailable")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(verifier.ready)
        self.assertIsNone(verifier.last_error)

    def test_stopped_verifier_does_not_refetch(self) -> None:
        """After stop() the loaded keys still verify, but unknown kids fetch nothing."""
        verifier = self.make()
        verifier.stop()
        self.clock.advance(60)
        self.accepted(verifier, self.token())
        self.rejected(verifier, self.token(kid="other"), "unknown_kid")
        self.assertEqual(self.issuer.jwks_fetches, 1)

    def test_stop_then_start(self) -> None:
        """A stopped verifier can be started again."""
        verifier = self.make()
        verifier.stop()
        verifier.start()
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_start_twice(self) -> None:
        """Starting a running verifier does not start a second refresh loop."""
        verifier = self.make()
        verifier.start()
        self.assertEqual(self.issuer.jwks_fetches, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_unusable_keys_skipped(self) -> None:
        """Encryption keys, HMAC keys and garbage in the JWKS are skipped; the rest load."""
        self.issuer.extra_jwks = [
            dict(self.issuer.jwks()["keys"][0], kid="enc", use="enc"),
            dict(self.issuer.jwks()["keys"][0], kid="ops", key_ops=["encrypt"]),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            dict(self.issuer.jwks()["keys"][0], kid="rsa-oaep", alg="RSA-OAEP"),
            "not an object",
        ]
        verifier = self.make()
        self.assertTrue(verifier.ready)
        self.accepted(verifier, self.token())
        for kid in ("enc", "ops", "hmac", "broken", "rsa-oaep"):
            self.clock.advance(10)
            self.rejected(verifier, self.token(kid=kid), "unknown_kid")


class RefetchTests(VerifierTestCase):
    """
    The JWKS is fetched again for unknown key ids, sparingly.
    """

    def test_rotation_refetch(self) -> None:
        """A token signed with a newly rotated key is accepted after exactly one refetch."""
        verifier = self.make()
        self.clock.advance(10)
        self.issuer.rotate()
        self.accepted(verifier, self.token())
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.assertEqual(verifier.jwks_fetches, 2)
        self.assertEqual(self.issuer.discovery_fetches, 1)
        self.accepted(verifier, self.token({"jti": "another"}))
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_refetch_rate_limited(self) -> None:
        """Within jwks_min_refetch_interval of the last fetch an unknown kid is refused unfetched."""
        verifier = self.make()
        self.clock.advance(9)
        self.issuer.rotate()
        self.rejected(verifier, self.token(), "unknown_kid")
        self.assertEqual(self.issuer.jwks_fetches, 1)
        self.clock.advance(1)
        self.accepted(verifier, self.token())
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_still_unknown_after_refetch(self) -> None:
        """A kid the refetched JWKS does not have either is refused as unknown_kid."""
        verifier = self.make()
        self.clock.advance(10)
        error = self.rejected(verifier, self.token(kid="no-such-key"), "unknown_kid")
        self.assertIn("no-such-key", error.detail)
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_forged_kid_flood(self) -> None:
        """A flood of made-up kids causes at most one JWKS fetch per min refetch interval."""
        verifier = self.make(jwks_min_refetch_interval=10)
        self.clock.advance(10)
        for _ in range(100):
            self.rejected(verifier, self.token(kid=secrets.token_hex(8)), "unknown_kid")
            self.clock.advance(0.5)
        # The initial load, then refetches at +10, +20, +30, +40 and +50 seconds.
        self.assertEqual(self.issuer.jwks_fetches, 6)
        self.assertEqual(verifier.jwks_fetches, 6)

    def test_concurrent_unknown_kids_share_fetch(self) -> None:
        """Verifications waiting on a refetch share one in-flight JWKS fetch."""
        verifier = self.make()
        self.clock.advance(10)
        self.issuer.rotate()
        self.issuer.hold_jwks = True
        waiting = [verifier.verify(self.token({"jti": str(i)})) for i in range(5)]
        forged = verifier.verify(self.token(kid="forged"))
        for d in waiting + [forged]:
            self.assertNoResult(d)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.issuer.release_jwks()
        for d in waiting:
            self.assertEqual(
                self.successResultOf(d).identity.user, "banyan:alice@example.com"
            )
        self.assertEqual(self.failureResultOf(forged, TokenRejected).value.reason, "unknown_kid")
        self.assertEqual(self.issuer.jwks_fetches, 2)

    def test_refetch_failure(self) -> None:
        """When the refetch fails the token is refused as unknown_kid and the error kept."""
        verifier = self.make()
        self.clock.advance(10)
        self.issuer.rotate()
        self.issuer.jwks_status = 502
        self.rejected(verifier, self.token(), "unknown_kid")
        self.assertIn("HTTP 502", verifier.last_error)
        self.assertTrue(verifier.ready)

    def test_cancel_waiting_verification(self) -> None:
        """Cancelling a verification waiting on a refetch leaves the fetch to the others."""
        verifier = self.make()
        self.clock.advance(10)
        self.issuer.rotate()
        self.issuer.hold_jwks = True
        first = verifier.verify(self.token({"jti": "1"}))
        second = verifier.verify(self.token({"jti": "2"}))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.issuer.release_jwks()
        self.successResultOf(second)

    def test_periodic_refresh_during_refetch(self) -> None:
        """A periodic refresh due while a refetch is in flight runs after it, not beside it."""
        verifier = self.make(jwks_refresh_interval=20, verifier_options={"fetch_timeout": 100})
        self.clock.advance(15)
        self.issuer.rotate()
        self.issuer.hold_jwks = True
        d = verifier.verify(self.token())
        self.clock.advance(5)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.issuer.hold_jwks = False
        self.issuer.release_jwks()
        self.successResultOf(d)
        self.assertEqual(self.issuer.jwks_fetches, 3)
        self.assertEqual(self.issuer.discovery_fetches, 2)

    def test_no_kid_after_rotation(self) -> None:
        """A token without a kid signed by a new key is accepted after one refetch."""
        verifier = self.make()
        self.clock.advance(10)
        self.issuer.rotate()
        self.accepted(verifier, self.token(headers={"kid": REMOVE}))
        self.assertEqual(self.issuer.jwks_fetches, 2)


class AlgorithmTests(VerifierTestCase):
    """
    Only the configured asymmetric algorithms are accepted, before any key lookup.
    """

    def test_es_and_ps_algorithms(self) -> None:
        """ES256/384/512 and PS256/384/512 tokens verify when configured."""
        for alg in ("ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS384", "RS512"):
            issuer = OIDCIssuer(alg=alg, clock=self.clock)
            verifier = self.make(issuer, signing_algs=(alg,))
            self.assertEqual(
                self.accepted(verifier, self.token(issuer=issuer)).identity.user,
                "banyan:alice@example.com",
            )

    def test_es256_not_configured(self) -> None:
        """An ES256 token is refused when signing_algs lists only RS256, without a fetch."""
        issuer = OIDCIssuer(alg="ES256", clock=self.clock)
        verifier = self.make(issuer, signing_algs=("RS256",))
        self.clock.advance(10)
        error = self.rejected(verifier, self.token(issuer=issuer), "algorithm")
        self.assertIn("ES256", error.detail)
        self.assertEqual(issuer.jwks_fetches, 1)

    def test_ps256_not_configured(self) -> None:
        """A PS256 token made with the issuer's RSA key is refused when only RS256 is allowed."""
        verifier = self.make(signing_algs=("RS256",))
        self.rejected(verifier, self.token(alg="PS256"), "algorithm")

    def test_jwk_alg_binds_key(self) -> None:
        """A key published with alg RS256 does not verify a PS256 signature it made."""
        verifier = self.make(signing_algs=("RS256", "PS256"))
        error = self.rejected(verifier, self.token(alg="PS256"), "signature")
        self.assertIn("cannot check PS256 signatures", error.detail)

    def test_none_refused(self) -> None:
        """An unsigned alg none token is refused even when the configuration lists none."""
        verifier = self.make(signing_algs=("RS256", "none"))
        self.rejected(verifier, self.issuer.forged_token(DEFAULT_CLAIMS), "algorithm")
        self.rejected(
            verifier,
            self.issuer.forged_token(DEFAULT_CLAIMS, alg="none", headers={"alg": "None"}),
            "algorithm",
        )

    def test_hs256_with_public_key_refused(self) -> None:
        """An HS256 token keyed with the issuer's public key is refused even if HS256 is listed."""
        verifier = self.make(signing_algs=("RS256", "HS256"))
        forged = self.issuer.forged_token(DEFAULT_CLAIMS, alg="HS256")
        self.rejected(verifier, forged, "algorithm")

    def test_key_type_mismatch(self) -> None:
        """An RS256 token naming an EC key's kid is refused as a bad signature."""
        issuer = OIDCIssuer(alg="ES256", clock=self.clock)
        ec_kid = issuer.kid
        issuer.rotate("RS256")
        verifier = self.make(issuer, signing_algs=("RS256", "ES256"))
        self.rejected(verifier, self.token(issuer=issuer, kid=ec_kid), "signature")

    def test_ec_curve_must_match(self) -> None:
        """An ES256 signature is not checked against a P-384 key."""
        issuer = OIDCIssuer(alg="ES384", clock=self.clock)
        verifier = self.make(issuer, signing_algs=("ES256", "ES384"))
        # Publish the P-384 key without an alg so only the curve can rule it out.
        jwk = dict(issuer.jwks()["keys"][0])
        del jwk["alg"]
        issuer.extra_jwks = [dict(jwk, kid="p384-no-alg")]
        self.clock.advance(10)
        forged = issuer.token(dict(DEFAULT_CLAIMS), alg="ES256", kid="p384-no-alg",
                              key=generate_private_key("ES256"))
        error = self.rejected(verifier, forged, "signature")
        self.assertIn("cannot check ES256 signatures", error.detail)

    def test_bad_signature(self) -> None:
        """A token signed by another key under the issuer's kid is refused as a bad signature."""
        verifier = self.make()
        other = generate_private_key("RS256")
        error = self.rejected(verifier, self.token(key=other), "signature")
        self.assertIn(self.issuer.kid, error.detail)

    def test_tampered_payload(self) -> None:
        """Changing the payload of a signed token breaks its signature."""
        verifier = self.make()
        header, _, signature = self.token().split(".")
        claims = self.issuer.claims(dict(DEFAULT_CLAIMS, roles=["admin"]))
        payload = b64url(json.dumps(claims).encode())
        self.rejected(verifier, f"{header}.{payload}.{signature}", "signature")

    def test_truncated_signatures(self) -> None:
        """Empty, short or padded signatures are bad signatures, for RSA and EC alike."""
        issuer = OIDCIssuer(alg="ES256", clock=self.clock)
        verifier = self.make(issuer, signing_algs=("ES256",))
        rsa_verifier = self.make()
        for v, token in ((verifier, self.token(issuer=issuer)), (rsa_verifier, self.token())):
            signing_input, signature = token.rsplit(".", 1)
            for bad in ("", signature[:10], signature + "AAAA"):
                self.rejected(v, f"{signing_input}.{bad}", "signature")

    def test_no_kid(self) -> None:
        """A token without a kid is checked against the keys that fit its algorithm."""
        issuer = OIDCIssuer(alg="ES256", clock=self.clock)
        issuer.rotate("RS256")
        verifier = self.make(issuer, signing_algs=("RS256", "ES256"))
        self.accepted(verifier, self.token(issuer=issuer, headers={"kid": REMOVE}))

    def test_no_kid_bad_signature(self) -> None:
        """A token without a kid that no key verifies is refused as a bad signature."""
        verifier = self.make()
        self.clock.advance(10)
        forged = self.token(headers={"kid": REMOVE}, key=generate_private_key("RS256"))
        self.rejected(verifier, forged, "signature")

    def test_key_url_headers_ignored(self) -> None:
        """jku, x5u, jwk and x5c headers are never fetched or trusted."""
        http = RecordingHTTP(self.issuer.stub_treq())
        verifier = self.make(http=http)
        attacker = OIDCIssuer("https://evil.test/v2", clock=self.clock)
        headers = {
            "jku": "https://evil.test/v2/keys",
            "x5u": "https://evil.test/v2/cert.pem",
            "jwk": attacker.jwks()["keys"][0],
            "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
        }
        self.accepted(verifier, self.token(headers=headers))
        self.clock.advance(10)
        forged = self.token(headers=headers, key=attacker.private_key, kid=attacker.kid)
        self.rejected(verifier, forged, "unknown_kid")
        self.clock.advance(10)
        forged = self.token(headers=headers, key=attacker.private_key)
        self.rejected(verifier, forged, "signature")
        base = "https://issuer.test/v2"
        self.assertEqual(
            http.urls,
            [base + "/.well-known/openid-configuration", base + "/keys", base + "/keys"],
        )
        self.assertEqual(attacker.jwks_fetches, 0)


class MalformedTests(VerifierTestCase):
    """
    Things that are not compact JWS tokens are refused as malformed.
    """

    def test_malformed(self) -> None:
        """Empty strings, wrong segment counts, bad base64 and non-object JSON are malformed."""
        verifier = self.make()
        good = self.token()
        header, payload, signature = good.split(".")
        array = b64url(b"[1, 2]")
        nan = b64url(b'{"exp": NaN}')
        no_alg = b64url(b'{"typ": "JWT"}')
        kid_number = b64url(b'{"alg": "RS256", "kid": 7}')
        crit = b64url(b'{"alg": "RS256", "crit": ["exp"]}')
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "a.b.c.d.e",
            f"{header}.{payload}",
            f"{header}!.{payload}.{signature}",
            f"{header}.{payload}.{signature}=",
            f"{b64url(b'not json')}.{payload}.{signature}",
            f"{array}.{payload}.{signature}",
            f"{header}.{array}.{signature}",
            f"{header}.{nan}.{signature}",
            f"{no_alg}.{payload}.{signature}",
            f"{kid_number}.{payload}.{signature}",
            f"{crit}.{payload}.{signature}",
            f"{header}.{payload}.{signature}" + "A" * 70000,
            "é.é.é",
            b"\xff.\xff.\xff",
        ]:
            self.rejected(verifier, token, "malformed")

    def test_jwe_named(self) -> None:
        """An encrypted token is refused with a detail saying so."""
        verifier = self.make()
        error = self.rejected(verifier, "a.b.c.d.e", "malformed")
        self.assertIn("JWE", error.detail)


class ClaimTests(VerifierTestCase):
    """
    The claims of a signed token: issuer, audience, times, required claims.
    """

    def test_issuer_mismatch(self) -> None:
        """A token from another issuer is refused without looking for its key."""
        verifier = self.make()
        self.clock.advance(10)
        token = self.token({"iss": "https://evil.test/v2"}, kid="unknown")
        error = self.rejected(verifier, token, "issuer")
        self.assertIn("https://evil.test/v2", error.detail)
        self.assertEqual(self.issuer.jwks_fetches, 1)

    def test_missing_issuer(self) -> None:
        """A token without iss is refused as missing_claim."""
        verifier = self.make()
        self.rejected(verifier, self.token({"iss": REMOVE}), "missing_claim")

    def test_audience_string_and_list(self) -> None:
        """aud may be the client id or a list containing it."""
        verifier = self.make()
        self.accepted(verifier, self.token(audience="kubernetes"))
        self.accepted(verifier, self.token(audience=["other", "kubernetes"]))

    def test_audience_mismatch(self) -> None:
        """A token for another audience is refused, naming the audience."""
        verifier = self.make()
        error = self.rejected(verifier, self.token(audience=["other", "x"]), "audience")
        self.assertIn("'other'", error.detail)
        self.rejected(verifier, self.token(audience="kubernetes-not"), "audience")
        self.rejected(verifier, self.token(audience=[1, "kubernetes"]), "audience")

    def test_missing_audience(self) -> None:
        """A token without aud is refused as missing_claim."""
        verifier = self.make()
        self.rejected(verifier, self.token({"aud": REMOVE}), "missing_claim")

    def test_expired(self) -> None:
        """A token is accepted until exp plus leeway on the verifier's clock, then expired."""
        verifier = self.make(leeway=30)
        token = self.token(expires_in=60)
        self.clock.advance(89)
        self.accepted(verifier, token)
        self.clock.advance(1)
        error = self.rejected(verifier, token, "expired")
        self.assertIn("sub 'user-1'", error.detail)

    def test_missing_exp(self) -> None:
        """A token without exp is refused as missing_claim."""
        verifier = self.make()
        self.rejected(verifier, self.token({"exp": REMOVE}), "missing_claim")

    def test_exp_not_a_number(self) -> None:
        """exp as a string, a boolean or an overflowing number is an invalid claim."""
        verifier = self.make()
        for value in ("1700003600", True, 10**400):
            self.rejected(verifier, self.token({"exp": value}), "invalid_claim")

    def test_not_yet_valid(self) -> None:
        """A token whose nbf is beyond the leeway is refused; within it, accepted."""
        verifier = self.make(leeway=30)
        self.rejected(verifier, self.token({"nbf": NOW + 31}), "not_yet_valid")
        self.accepted(verifier, self.token({"nbf": NOW + 30}))

    def test_issued_in_future(self) -> None:
        """A token whose iat is beyond the leeway is refused; within it, accepted."""
        verifier = self.make(leeway=30)
        self.rejected(verifier, self.token(issued_at=NOW + 31), "issued_in_future")
        self.accepted(verifier, self.token(issued_at=NOW + 30))

    def test_times_follow_clock_not_wall_clock(self) -> None:
        """Times are judged by the injected clock, even far from the real time."""
        self.clock.advance(10 * 365 * 86400)
        verifier = self.make()
        self.accepted(verifier, self.token())

    def test_required_claims(self) -> None:
        """Each required claim must be present with the configured string value."""
        verifier = self.make(required_claims=(("hd", "example.com"), ("tier", "1")))
        self.accepted(verifier, self.token({"hd": "example.com", "tier": "1"}))
        error = self.rejected(verifier, self.token({"tier": "1"}), "required_claim")
        self.assertIn("hd", error.detail)
        self.rejected(
            verifier, self.token({"hd": "evil.com", "tier": "1"}), "required_claim"
        )
        self.rejected(
            verifier, self.token({"hd": "example.com", "tier": 1}), "required_claim"
        )

    def test_missing_subject(self) -> None:
        """A token without sub is refused as missing_claim."""
        verifier = self.make()
        self.rejected(verifier, self.token({"sub": REMOVE}), "missing_claim")


class UserTests(VerifierTestCase):
    """
    The user name claim, email_verified, and header safety of the user name.
    """

    def test_missing_username_claim(self) -> None:
        """A token without the user name claim is refused as missing_claim."""
        verifier = self.make()
        error = self.rejected(verifier, self.token({"email": REMOVE}), "missing_claim")
        self.assertIn("email", error.detail)

    def test_username_not_a_string(self) -> None:
        """An empty or non-string user name claim is an invalid claim."""
        verifier = self.make()
        for value in ("", 42, None, ["alice"]):
            self.rejected(verifier, self.token({"email": value}), "invalid_claim")

    def test_email_verified(self) -> None:
        """email_verified must be true or absent; false or the string "true" is refused."""
        verifier = self.make()
        self.accepted(verifier, self.token({"email_verified": True}))
        self.accepted(verifier, self.token({"email_verified": REMOVE}))
        for value in (False, "true", 1, None):
            self.rejected(
                verifier, self.token({"email_verified": value}), "email_unverified"
            )

    def test_email_verified_only_for_email(self) -> None:
        """email_verified is not consulted when the user name comes from another claim."""
        verifier = self.make(username_claim="sub")
        self.assertEqual(
            self.accepted(verifier, self.token({"email_verified": False})).identity.user,
            "banyan:user-1",
        )

    def test_control_characters_in_user(self) -> None:
        """CR, LF, NUL, other controls, DEL, C1 and surrounding whitespace in the user are refused."""
        verifier = self.make()
        for value in (
            "alice\r\nImpersonate-Group: system:masters",
            "alice\n",
            "al\x00ice",
            "al\x1bice",
            "al\x7fice",
            "al\x85ice",
            "al\x9fice",
            " alice",
            "alice\t",
            "alice\u00a0",
            "al\ud800ice",
        ):
            error = self.rejected(verifier, self.token({"email": value}), "invalid_claim")
            self.assertIn("email", error.detail)
            self.assertNotIn("\n", error.detail)
            self.assertNotIn("\r", error.detail)

    def test_non_ascii_user(self) -> None:
        """Printable non-ASCII characters are allowed in the user name."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"email": "zoë@exämple.com"})).identity.user,
            "banyan:zoë@exämple.com",
        )

    def test_system_user_refused(self) -> None:
        """A user name under system: after prefixing is refused."""
        verifier = self.make(username_claim="sub", username_prefix="")
        self.rejected(verifier, self.token(subject="system:admin"), "invalid_claim")


class GroupTests(VerifierTestCase):
    """
    The groups claim: absent, string, array, or refused.
    """

    def test_groups_string(self) -> None:
        """A single string becomes one prefixed group."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": "dev"})).identity.groups,
            ("banyan:dev",),
        )

    def test_groups_array(self) -> None:
        """An array of strings becomes prefixed groups in order, without duplicates."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": ["b", "a", "b"]})).identity.groups,
            ("banyan:b", "banyan:a"),
        )

    def test_groups_absent_or_null(self) -> None:
        """An absent or null groups claim means no groups."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": REMOVE})).identity.groups, ()
        )
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": None})).identity.groups, ()
        )

    def test_groups_wrong_type(self) -> None:
        """A number, an object, or an array holding a non-string is an invalid claim."""
        verifier = self.make()
        for value in (7, {"a": "b"}, ["dev", 7], [["dev"]], True):
            error = self.rejected(verifier, self.token({"roles": value}), "invalid_claim")
            self.assertIn("roles", error.detail)

    def test_group_count_capped(self) -> None:
        """1000 groups are accepted; 1001 are an invalid claim."""
        verifier = self.make()
        groups = [f"g{i}" for i in range(1000)]
        self.assertEqual(
            len(self.accepted(verifier, self.token({"roles": groups})).identity.groups),
            1000,
        )
        self.rejected(verifier, self.token({"roles": groups + ["one-more"]}), "invalid_claim")

    def test_control_characters_in_group(self) -> None:
        """A group with CR, LF, NUL, a control character or surrounding whitespace is refused."""
        verifier = self.make()
        for value in ("dev\r\n", "d\nev", "d\x00ev", "d\x01ev", "d\x7fev", "d\x80ev",
                      " dev", "dev ", ""):
            error = self.rejected(
                verifier, self.token({"roles": ["ok", value]}), "invalid_claim"
            )
            self.assertIn("roles", error.detail)

    def test_non_ascii_group(self) -> None:
        """Printable non-ASCII characters are allowed in groups."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": ["Entwickler-Ü", "开发"]})).identity.groups,
            ("banyan:Entwickler-Ü", "banyan:开发"),
        )

    def test_system_group_refused_without_prefix(self) -> None:
        """Without a groups prefix a system: group such as system:masters is refused."""
        verifier = self.make(groups_prefix="")
        error = self.rejected(
            verifier, self.token({"roles": ["dev", "system:masters"]}), "invalid_claim"
        )
        self.assertIn("system:masters", error.detail)

    def test_system_group_prefixed(self) -> None:
        """With a groups prefix a group named system:masters is harmless and kept."""
        verifier = self.make()
        self.assertEqual(
            self.accepted(verifier, self.token({"roles": ["system:masters"]})).identity.groups,
            ("banyan:system:masters",),
        )


class CacheTests(VerifierTestCase):
    """
    Verified tokens are cached until exp; rejections are not.
    """

    def test_cache_hit_skips_signature_check(self) -> None:
        """A cached token is accepted even after its key leaves the JWKS, until exp."""
        verifier = self.make(jwks_refresh_interval=600)
        token = self.token()
        first = self.accepted(verifier, token)
        old_key, old_kid = self.issuer.private_key, self.issuer.kid
        self.issuer.rotate(keep_old=False)
        self.clock.advance(600)
        self.assertEqual(self.issuer.jwks_fetches, 2)
        self.assertIs(self.accepted(verifier, token), first)
        uncached = self.token({"jti": "new"}, key=old_key, kid=old_kid)
        self.rejected(verifier, uncached, "unknown_kid")

    def test_cache_expires_at_exp(self) -> None:
        """A cached token is not served at or after its exp."""
        verifier = self.make(leeway=0)
        token = self.token(expires_in=100)
        self.accepted(verifier, token)
        self.assertEqual(verifier.cached_tokens, 1)
        self.clock.advance(99)
        self.accepted(verifier, token)
        self.clock.advance(1)
        self.rejected(verifier, token, "expired")
        self.assertEqual(verifier.cached_tokens, 0)

    def test_cache_bounded_lru(self) -> None:
        """The cache holds token_cache_size entries, evicting the least recently used."""
        verifier = self.make(token_cache_size=3, jwks_refresh_interval=600)
        tokens = [self.token({"jti": str(i)}) for i in range(4)]
        for token in tokens[:3]:
            self.accepted(verifier, token)
        self.accepted(verifier, tokens[0])
        self.accepted(verifier, tokens[3])
        self.assertEqual(verifier.cached_tokens, 3)
        # Remove the signing key: only cached tokens still pass.
        self.issuer.rotate(keep_old=False)
        self.clock.advance(600)
        self.accepted(verifier, tokens[0])
        self.accepted(verifier, tokens[2])
        self.accepted(verifier, tokens[3])
        self.rejected(verifier, tokens[1], "unknown_kid")

    def test_cached_lookup(self) -> None:
        """cached() answers only for a verified token that has not expired."""
        verifier = self.make(leeway=0)
        token = self.token(expires_in=100)
        self.assertIsNone(verifier.cached(token))
        result = self.accepted(verifier, token)
        self.assertIs(verifier.cached(token), result)
        self.assertIs(verifier.cached(token.encode("ascii")), result)
        self.clock.advance(100)
        self.assertIsNone(verifier.cached(token))

    def test_cache_disabled(self) -> None:
        """A cache size of zero caches nothing."""
        verifier = self.make(token_cache_size=0)
        self.accepted(verifier, self.token())
        self.assertEqual(verifier.cached_tokens, 0)

    def test_rejections_not_cached(self) -> None:
        """A token refused as not yet valid is accepted once its nbf has passed."""
        verifier = self.make(leeway=0)
        token = self.token({"nbf": NOW + 60})
        self.rejected(verifier, token, "not_yet_valid")
        self.assertEqual(verifier.cached_tokens, 0)
        self.clock.advance(60)
        self.accepted(verifier, token)

    def test_cache_keyed_by_hash(self) -> None:
        """The cache is keyed by the token's SHA-256, never the token itself."""
        verifier = self.make()
        token = self.token()
        self.accepted(verifier, token)
        self.assertEqual(
            list(verifier._cache), [hashlib.sha256(token.encode("ascii")).digest()]
        )


class LoggingTests(VerifierTestCase):
    """
    What the verifier logs, and that it never logs a token.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self) -> str:
        """
        Everything logged so far from the identity package, formatted.
        """
        return "\n".join(
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace", "").startswith("banyan_kproxy.identity")
        )

    def test_logs_key_loads_and_failures_never_tokens(self) -> None:
        """Key loads name the kids, fetch failures say why, and no token is ever logged."""
        self.issuer.extra_jwks = [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}]
        verifier = self.make(jwks_refresh_interval=600)
        tokens = [
            self.token(),
            self.token({"email": "bad\r\nname"}),
            self.token(kid="forged"),
            self.issuer.forged_token(DEFAULT_CLAIMS),
            self.token(expires_in=-3600),
        ]
        outcomes = [verifier.verify(token) for token in tokens]
        self.successResultOf(outcomes[0])
        for outcome in outcomes[1:]:
            self.failureResultOf(outcome, TokenRejected)
        self.issuer.jwks_status = 500
        self.clock.advance(600)
        text = self.logged()
        self.assertIn(self.issuer.kid, text)
        self.assertIn("Skipping a key", text)
        self.assertIn("'hmac'", text)
        self.assertIn("HTTP 500", text)
        self.assertIn("retrying in 1s", text)
        for token in tokens:
            for segment in token.split("."):
                if len(segment) > 16:
                    self.assertNotIn(segment, text)
