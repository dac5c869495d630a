"""
Tests for `banyan_kproxy.connect.credential`, the exec credential plugin, and the
test issuer's token endpoint it talks to: in memory with ``StubTreq`` and a
``Clock``, then as real processes against the issuer on loopback.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import stat
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from banyan_kproxy.config import OIDCClientConfig
from banyan_kproxy.connect.credential import (
    EXEC_API_VERSION,
    CachedToken,
    CredentialError,
    TokenSource,
    cache_path,
    lock_path,
    run_credential,
    unverified_claims,
)
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.testing.issuer import OIDCIssuer
from banyan_kproxy.testing.loopback import serve
from banyan_kproxy.tls import ServerTLS

NOW = 1_700_000_000.0
ISSUER = "https://issuer.test/v2"
CLIENT = "external-services"
CLAIMS = {"email": "myuser@example.com", "email_verified": True, "roles": ["any-employee-personal-device"]}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class TokenEndpointTests(SynchronousTestCase):
    """
    The test issuer answers the refresh-token grant as RFC 6749 section 6 says.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.issuer = OIDCIssuer(ISSUER, clock=self.clock)
        self.http = self.issuer.stub_treq()
        self.refresh = self.issuer.issue_refresh_token(CLAIMS, client_id=CLIENT, subject="u1")

    def post(self, form: dict[str, str], headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        response = self.successResultOf(
            self.http.post(ISSUER + "/token", data=form, headers=headers or {})
        )
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_discovery_names_token_endpoint(self) -> None:
        """The discovery document names the token endpoint under the issuer's path."""
        self.assertEqual(self.issuer.discovery_document()["token_endpoint"], ISSUER + "/token")

    def test_grant(self) -> None:
        """A valid refresh token yields an ID token for its claims, audience the client id."""
        code, body = self.post({"grant_type": "refresh_token", "refresh_token": self.refresh,
                                "client_id": CLIENT})
        self.assertEqual(code, 200)
        claims = unverified_claims(body["id_token"])
        self.assertEqual((claims["aud"], claims["sub"], claims["email"], claims["iss"]),
                         (CLIENT, "u1", "myuser@example.com", ISSUER))
        self.assertEqual(claims["exp"], NOW + 3600)
        self.assertNotIn("refresh_token", body)
        self.assertEqual((self.issuer.token_requests, self.issuer.token_grants), (1, 1))

    def test_rotation(self) -> None:
        """With rotation on, the answer carries a new refresh token and the old one is refused."""
        self.issuer.rotate_refresh_tokens = True
        form = {"grant_type": "refresh_token", "refresh_token": self.refresh, "client_id": CLIENT}
        code, body = self.post(form)
        self.assertEqual(code, 200)
        self.assertNotEqual(body["refresh_token"], self.refresh)
        self.assertEqual(self.post(form), (400, {
            "error": "invalid_grant",
            "error_description": "the refresh token is invalid, expired or revoked",
        }))
        form["refresh_token"] = body["refresh_token"]
        self.assertEqual(self.post(form)[0], 200)

    def test_revoked_and_wrong_client(self) -> None:
        """A revoked refresh token, or one presented by another client, is invalid_grant."""
        code, body = self.post({"grant_type": "refresh_token", "refresh_token": self.refresh,
                                "client_id": "other"})
        self.assertEqual((code, body["error"]), (400, "invalid_grant"))
        self.issuer.revoke_refresh_token(self.refresh)
        code, body = self.post({"grant_type": "refresh_token", "refresh_token": self.refresh,
                                "client_id": CLIENT})
        self.assertEqual((code, body["error"]), (400, "invalid_grant"))

    def test_client_secret(self) -> None:
        """A client with a secret must present it, in HTTP basic or in the form."""
        self.issuer.client_secrets[CLIENT] = "s3cret"
        form = {"grant_type": "refresh_token", "refresh_token": self.refresh, "client_id": CLIENT}
        self.assertEqual(self.post(form)[0], 401)
        self.assertEqual(self.post(dict(form, client_secret="s3cret"))[0], 200)
        basic = b"Basic " + base64.b64encode(f"{CLIENT}:s3cret".encode())
        self.assertEqual(self.post(form, {b"Authorization": [basic]})[0], 200)
        wrong = b"Basic " + base64.b64encode(f"{CLIENT}:nope".encode())
        self.assertEqual(self.post(form, {b"Authorization": [wrong]})[1]["error"], "invalid_client")

    def test_other_grant_type(self) -> None:
        """Only the refresh-token grant is supported."""
        code, body = self.post({"grant_type": "password", "client_id": CLIENT})
        self.assertEqual((code, body["error"]), (400, "unsupported_grant_type"))


class TokenSourceTests(SynchronousTestCase):
    """
    `TokenSource` caches, refreshes, rotates and explains, in memory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.issuer = OIDCIssuer(ISSUER, clock=self.clock)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.refresh_file = os.path.join(self.directory, "refresh-token")
        self.save_refresh(self.issuer.issue_refresh_token(CLAIMS, client_id=CLIENT))

    def save_refresh(self, token: str) -> None:
        with open(self.refresh_file, "w") as f:
            f.write(token + "\n")

    def source(self, **config: Any) -> TokenSource:
        values: dict[str, Any] = {"issuer_url": ISSUER, "client_id": CLIENT,
                                  "refresh_token_file": self.refresh_file}
        values.update(config)
        return TokenSource(OIDCClientConfig(**values), self.issuer.stub_treq(), self.clock)

    def get(self, source: TokenSource) -> CachedToken:
        return self.successResultOf(Deferred.fromCoroutine(source.get()))

    def error(self, source: TokenSource) -> str:
        return str(self.failureResultOf(Deferred.fromCoroutine(source.get()), CredentialError).value)

    def test_first_refreshes_second_cached(self) -> None:
        """The first call refreshes and caches (0600); the second answers from the cache."""
        token = self.get(self.source())
        self.assertEqual(self.issuer.token_grants, 1)
        self.assertEqual(token.expiry, NOW + 3600)
        self.assertEqual(unverified_claims(token.id_token)["email"], "myuser@example.com")
        cache = cache_path(self.source().config)
        self.assertEqual(cache, self.refresh_file + ".id-token.json")
        self.assertEqual(_mode(cache), 0o600)
        requests = len(self.issuer.requests)
        again = self.get(self.source())
        self.assertEqual(again, token)
        self.assertEqual((self.issuer.token_grants, len(self.issuer.requests)), (1, requests))

    def test_expiring_token_refreshed(self) -> None:
        """A cached token within refresh_before of its expiry is replaced by a new one."""
        first = self.get(self.source(refresh_before=60.0))
        self.clock.advance(3600 - 61)
        self.assertEqual(self.get(self.source(refresh_before=60.0)), first)
        self.clock.advance(2)
        second = self.get(self.source(refresh_before=60.0))
        self.assertEqual(self.issuer.token_grants, 2)
        self.assertEqual(second.expiry, self.clock.seconds() + 3600)

    def test_short_lived_token(self) -> None:
        """A token living shorter than twice refresh_before is handed out for half its life."""
        self.issuer.id_token_lifetime = 60
        token = self.get(self.source(refresh_before=60.0))
        self.assertEqual(token.fresh_until(60.0), NOW + 30)
        self.clock.advance(29)
        self.get(self.source(refresh_before=60.0))
        self.assertEqual(self.issuer.token_grants, 1)

    def test_rotated_refresh_token_saved(self) -> None:
        """A rotated refresh token replaces the file's content, mode 0600, and keeps working."""
        self.issuer.rotate_refresh_tokens = True
        os.chmod(self.refresh_file, 0o644)
        with open(self.refresh_file) as f:
            old = f.read().strip()
        self.get(self.source())
        with open(self.refresh_file) as f:
            new = f.read().strip()
        self.assertNotEqual(new, old)
        self.assertTrue(self.issuer.refresh_token_valid(new))
        self.assertFalse(self.issuer.refresh_token_valid(old))
        self.assertEqual(_mode(self.refresh_file), 0o600)
        self.assertEqual([n for n in os.listdir(self.directory) if n.startswith(".")], [])
        # The cache is for the new refresh token: no refresh needed.
        self.get(self.source())
        self.assertEqual(self.issuer.token_grants, 1)

    def test_new_refresh_token_file_invalidates_cache(self) -> None:
        """Saving another refresh token (another user) makes the next call refresh."""
        self.get(self.source())
        self.save_refresh(self.issuer.issue_refresh_token({"email": "other@example.com"}, client_id=CLIENT))
        token = self.get(self.source())
        self.assertEqual(unverified_claims(token.id_token)["email"], "other@example.com")
        self.assertEqual(self.issuer.token_grants, 2)

    def test_invalid_refresh_token(self) -> None:
        """A refused refresh token says so, names the file and tells the user what to do."""
        self.save_refresh("rt-not-a-real-one")
        message = self.error(self.source())
        self.assertEqual(
            message,
            f"the identity provider refused the refresh token in {self.refresh_file} (invalid_grant: "
            "the refresh token is invalid, expired or revoked): it has expired or been revoked. "
            "Get a new refresh token (Banyan Command Center: your initials > My Profile > Refresh "
            f"Token), save it in {self.refresh_file}, and run kubectl again.",
        )
        self.assertNotIn("rt-not-a-real-one", message)

    def test_empty_refresh_token_file(self) -> None:
        """An empty refresh token file is explained without asking the issuer."""
        self.save_refresh("")
        self.assertIn(f"the refresh token file {self.refresh_file} is empty", self.error(self.source()))
        self.assertEqual(self.issuer.token_requests, 0)

    def test_client_secret_basic(self) -> None:
        """A client secret from client_secret_file goes to the token endpoint."""
        self.issuer.client_secrets[CLIENT] = "s3cret"
        secret_file = os.path.join(self.directory, "secret")
        with open(secret_file, "w") as f:
            f.write("s3cret\n")
        self.get(self.source(client_secret_file=secret_file))
        self.assertEqual(self.issuer.token_grants, 1)
        with open(secret_file, "w") as f:
            f.write("wrong\n")
        self.assertIn("refused the client (invalid_client: client authentication failed): check "
                      "[oidc_client] client_id ('external-services') and client_secret_file",
                      self.error(self.source(client_secret_file=secret_file, cache_file=secret_file + ".c")))

    def test_client_secret_post(self) -> None:
        """An issuer that supports only client_secret_post gets the secret in the form."""
        self.issuer.client_secrets[CLIENT] = "s3cret"
        self.issuer.discovery_overrides["token_endpoint_auth_methods_supported"] = ["client_secret_post"]
        secret_file = os.path.join(self.directory, "secret")
        with open(secret_file, "w") as f:
            f.write("s3cret\n")
        self.get(self.source(client_secret_file=secret_file))
        self.assertEqual(self.issuer.token_grants, 1)

    def test_wrong_issuer_url(self) -> None:
        """An issuer that names itself differently is reported with the value to use."""
        self.issuer.discovery_overrides["issuer"] = "https://issuer.test/v3"
        self.assertIn("calls itself 'https://issuer.test/v3', not 'https://issuer.test/v2': set "
                      "[oidc_client] issuer_url = https://issuer.test/v3", self.error(self.source()))

    def test_issuer_down(self) -> None:
        """A failing token endpoint is one line with the status, and nothing is cached."""
        self.issuer.token_status = 503
        self.assertEqual(self.error(self.source()),
                         f"the token endpoint {ISSUER}/token answered HTTP 503 (temporarily_unavailable); "
                         "try again later")
        self.assertFalse(os.path.exists(self.refresh_file + ".id-token.json"))

    def test_waits_for_lock(self) -> None:
        """While another process holds the lock, the call waits; then it uses that process's token."""
        winner = self.source()
        self.get(winner)
        self.clock.advance(3600)  # the cached token is now stale
        fd = os.open(lock_path(winner.config), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            waiting = Deferred.fromCoroutine(self.source().get())
            self.clock.advance(1)
            self.assertNoResult(waiting)
            # The holder refreshes, then releases.
            fresh = self.successResultOf(Deferred.fromCoroutine(winner.refresh(winner.read_refresh_token())))
            winner._write_cache(fresh)
        finally:
            os.close(fd)
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(waiting), fresh)
        self.assertEqual(self.issuer.token_grants, 2)

    def test_lock_timeout(self) -> None:
        """A lock held for longer than lock_timeout ends the wait with a message."""
        source = self.source()
        source.lock_timeout = 5
        fd = os.open(lock_path(source.config), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiting = Deferred.fromCoroutine(source.get())
        self.clock.pump([0.05] * 120)
        self.assertIn("has held", str(self.failureResultOf(waiting, CredentialError).value))
        self.assertEqual(self.issuer.token_requests, 0)

    def test_run_credential_output(self) -> None:
        """The plugin prints one v1 ExecCredential: the token and when to ask again."""
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(Deferred.fromCoroutine(run_credential(self.source(), False, out, err)))
        self.assertEqual((code, err.getvalue()), (0, ""))
        credential = json.loads(out.getvalue())
        self.assertEqual(credential["apiVersion"], EXEC_API_VERSION)
        self.assertEqual(credential["kind"], "ExecCredential")
        self.assertEqual(unverified_claims(credential["status"]["token"])["email"], "myuser@example.com")
        self.assertEqual(credential["status"]["expirationTimestamp"], "2023-11-14T23:12:20Z")

    def test_print_token_shows_claims_not_token(self) -> None:
        """--print-token shows the claims and the expiry, and never the token."""
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(Deferred.fromCoroutine(run_credential(self.source(), True, out, err)))
        self.assertEqual(code, 0)
        text = out.getvalue()
        token = self.get(self.source()).id_token
        self.assertNotIn(token.split(".")[1], text)
        self.assertNotIn(token.split(".")[2], text)
        self.assertIn('"email": "myuser@example.com"', text)
        self.assertIn('"iss": "https://issuer.test/v2"', text)
        self.assertIn("expires: 2023-11-14T23:13:20Z (valid for 3600s more)", text)

    def test_run_credential_error(self) -> None:
        """A refused refresh token gives exit status 1 and the message on stderr, nothing on stdout."""
        self.save_refresh("rt-bad")
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(Deferred.fromCoroutine(run_credential(self.source(), False, out, err)))
        self.assertEqual((code, out.getvalue()), (1, ""))
        self.assertTrue(err.getvalue().startswith("banyan-kproxy credential: the identity provider refused"))


class CredentialProcessTests(TestCase):
    """
    ``banyan-kproxy credential`` as kubectl runs it: separate processes against the
    issuer served over TLS on loopback.
    """

    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        ca = CertificateAuthority.generate()
        self.ca_file = ca.write_cert(self.directory)
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(self.directory, "issuer")
        self.issuer = OIDCIssuer("https://127.0.0.1/v2")
        self.issuer.rotate_refresh_tokens = True
        served = serve(reactor, Site(self.issuer.resource()), tls=ServerTLS.from_files(cert, key))
        self.addCleanup(served.stop)
        self.issuer.issuer_url = served.url + "/v2"
        self.refresh_file = os.path.join(self.directory, "refresh-token")
        with open(self.refresh_file, "w") as f:
            f.write(self.issuer.issue_refresh_token(CLAIMS, client_id=CLIENT) + "\n")
        self.ini = os.path.join(self.directory, "connect.ini")
        with open(self.ini, "w") as f:
            f.write(f"[oidc_client]\nissuer_url = {self.issuer.issuer_url}\nclient_id = {CLIENT}\n"
                    f"refresh_token_file = refresh-token\nca_file = ca.crt\n")

    def plugin(self, *extra: str) -> Deferred[tuple[bytes, bytes, int]]:
        env = {"PYTHONPATH": ROOT, "HOME": self.directory, "PATH": os.environ.get("PATH", "")}
        return getProcessOutputAndValue(
            sys.executable, ["-m", "banyan_kproxy.cli", "credential", "--config", self.ini, *extra],
            env=env, reactor=reactor,
        ).addTimeout(60, reactor)

    def test_refresh_then_cache(self) -> None:
        """The first run refreshes (saving the rotated token); the second answers from the cache."""

        async def go() -> None:
            out, err, code = await self.plugin()
            self.assertEqual((code, err), (0, b""))
            first = json.loads(out)
            self.assertEqual(first["status"]["token"].count("."), 2)
            self.assertEqual(self.issuer.token_grants, 1)
            self.assertEqual(_mode(self.refresh_file), 0o600)
            out, err, code = await self.plugin()
            self.assertEqual((code, json.loads(out)), (0, first))
            self.assertEqual(self.issuer.token_requests, 1)

        return ensureDeferred(go())

    def test_twenty_at_once_refresh_once(self) -> None:
        """Twenty plugin processes started together make exactly one refresh and print the same token."""

        async def go() -> None:
            results = await gatherResults([self.plugin() for _ in range(20)])
            self.assertEqual([(code, err) for _, err, code in results], [(0, b"")] * 20)
            tokens = {json.loads(out)["status"]["token"] for out, _, _ in results}
            self.assertEqual(len(tokens), 1)
            self.assertEqual((self.issuer.token_requests, self.issuer.token_grants), (1, 1))

        return ensureDeferred(go())

    def test_invalid_refresh_token(self) -> None:
        """A revoked refresh token: exit status 1, a message saying what to do, no traceback."""

        async def go() -> None:
            with open(self.refresh_file) as f:
                self.issuer.revoke_refresh_token(f.read().strip())
            out, err, code = await self.plugin()
            self.assertEqual((code, out), (1, b""))
            text = err.decode()
            self.assertNotIn("Traceback", text)
            self.assertEqual(len(text.strip().splitlines()), 1, text)
            self.assertIn("it has expired or been revoked. Get a new refresh token", text)

        return ensureDeferred(go())

    def test_print_token(self) -> None:
        """--print-token prints the claims for troubleshooting and exits 0."""

        async def go() -> None:
            out, err, code = await self.plugin("--print-token")
            self.assertEqual((code, err), (0, b""), err)
            self.assertIn(b'"email": "myuser@example.com"', out)
            self.assertIn(b"valid for", out)

        return ensureDeferred(go())

    def test_missing_section(self) -> None:
        """A file without [oidc_client] is one line on stderr and exit status 1."""

        async def go() -> None:
            with open(self.ini, "w") as f:
                f.write("[kubeconfig]\nserver = https://mykube.corp.example.com:8443\n")
            out, err, code = await self.plugin()
            self.assertEqual((code, out), (1, b""))
            self.assertIn(b"no [oidc_client] section", err)

        return ensureDeferred(go())
