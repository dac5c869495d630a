"""
Tests for `banyan_kproxy.tls`: certificate files, reload, listeners, the HTTPS client
policy and the absence of log noise, mostly against real loopback peers (``curl``,
``openssl s_client`` and Twisted's ``Agent``).
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from banyan_kproxy.config import Address
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.tls import (
    CertificateReloader,
    ServerTLS,
    TLSConfigError,
    https_policy,
    listen_tcp,
    listen_tls,
)

LOOPBACK = "127.0.0.1"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _subject(server_tls: ServerTLS) -> str:
    return server_tls.certificate.subject.rfc4514_string()


class LogCapture:
    """
    Collects every log event published while it is installed.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def at_least(self, level: Any) -> list[str]:
        """
        The formatted events at ``level`` or above, and any carrying a failure.
        """
        order = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
        return [
            formatEvent(e) + (" " + repr(e["log_failure"].value) if "log_failure" in e else "")
            for e in self.events
            if "log_failure" in e or order.index(e.get("log_level", LogLevel.info)) >= order.index(level)
        ]


class _Collect(ProcessProtocol):
    """
    Closes the child's stdin at once and gathers its output and exit code.
    """

    def __init__(self, done: Deferred[tuple[bytes, int]]) -> None:
        self.done = done
        self.output: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback((b"".join(self.output), reason.value.exitCode))


def run(*argv: str) -> Deferred[tuple[bytes, int]]:
    """
    Run a program without blocking the reactor; its stdout and stderr together, and its
    exit code.  Killed after 20 seconds.
    """
    executable = shutil.which(argv[0])
    if executable is None:
        raise SkipTest(f"{argv[0]} is not on PATH")
    reactor = _reactor()
    protocol: _Collect

    def kill(d: Deferred[Any]) -> None:
        protocol.transport.signalProcess("KILL")

    done: Deferred[tuple[bytes, int]] = Deferred(kill)
    protocol = _Collect(done)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    reactor.spawnProcess(protocol, executable, argv, env=env)
    return done.addTimeout(20, reactor)


def s_client(port: int, ca_file: str, *args: str) -> Deferred[tuple[bytes, int]]:
    """
    Run ``openssl s_client`` against a loopback port, verifying with ``ca_file``.
    """
    target = f"{LOOPBACK}:{port}"
    return run("openssl", "s_client", "-connect", target, "-servername", "localhost", "-CAfile", ca_file, *args)


def curl(url: str, *args: str) -> Deferred[tuple[bytes, int]]:
    """
    Run ``curl -sS`` (which offers ALPN h2 and http/1.1 for https URLs).
    """
    return run("curl", "-sS", "--max-time", "15", *args, url)


class _Hello(Resource):
    """
    Answers ``hello <client certificate CN>`` (``anonymous`` without one).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        peer = request.transport.getPeerCertificate()
        name = peer.get_subject().CN if peer is not None else "anonymous"
        return b"hello " + name.encode()


class _CountingSite(Site):
    """
    A ``Site`` that counts the connections it was given and lost, so that tests can
    wait until the server has seen every connection end.
    """

    def __init__(self) -> None:
        super().__init__(_Hello())
        self.made = 0
        self.lost = 0
        self._waiting: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.made += 1
        connectionLost = channel.connectionLost

        def lost(reason: Any) -> None:
            connectionLost(reason)
            self.lost += 1
            if self.lost == self.made:
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.callback(None)

        channel.connectionLost = lost
        return channel

    def all_lost(self) -> Deferred[None]:
        """
        Fires when every connection made so far has been lost.
        """
        if self.lost == self.made:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d.addTimeout(10, _reactor())


class _Files:
    """
    A CA and a directory for certificate files.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        self.ca = CertificateAuthority.generate()
        self.ca_file = self.ca.write_cert(self.directory)

    def server(self, name: str = "server", cn: str = "localhost", **kw: Any) -> tuple[str, str]:
        """
        Write a server certificate for localhost and 127.0.0.1 (by default) and its key.
        """
        kw.setdefault("dns_names", ["localhost"])
        kw.setdefault("ip_addresses", [LOOPBACK])
        return self.ca.issue(cn, **kw).write(self.directory, name)

    def path(self, name: str, data: bytes | None = None) -> str:
        """
        The path of a file in the directory, written with ``data`` when given.
        """
        path = os.path.join(self.directory, name)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        return path


class ServerTLSFileTests(SynchronousTestCase):
    """
    Loading and reloading the server's certificate files.
    """

    def setUp(self) -> None:
        self.files = _Files(self)
        self.cert, self.key = self.files.server(cn="first")
        self.logs = LogCapture(self)

    def assertProblem(self, cert: str, key: str, *expected: str, client_ca: str | None = None) -> None:
        """
        Loading the files fails with a `TLSConfigError` whose message contains each of ``expected``.
        """
        e = self.assertRaises(TLSConfigError, ServerTLS.from_files, cert, key, client_ca)
        for text in expected:
            self.assertIn(text, str(e))

    def test_loads(self) -> None:
        """
        A certificate and matching key load and the certificate's subject and expiry are logged.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        self.assertEqual(_subject(server_tls), "CN=first")
        self.assertEqual(
            self.logs.at_least(LogLevel.info),
            [
                f"Loaded TLS certificate CN=first (valid until "
                f"{server_tls.not_valid_after.isoformat()}) from {self.cert}"
            ],
        )
        self.assertIsNotNone(server_tls.not_valid_after.tzinfo)

    def test_missing_files(self) -> None:
        """
        A missing certificate or key file is named in the error.
        """
        missing = self.files.path("nothing.crt")
        self.assertProblem(missing, self.key, f"tls_cert_file {missing}: cannot read", "No such file")
        self.assertProblem(self.cert, missing, f"tls_key_file {missing}: cannot read")

    def test_not_pem(self) -> None:
        """
        Files without PEM blocks, or with a broken one, are refused, naming the file.
        """
        empty = self.files.path("empty.pem", b"")
        self.assertProblem(empty, self.key, f"tls_cert_file {empty}: no PEM certificate found")
        self.assertProblem(self.cert, empty, f"tls_key_file {empty}: no PEM private key found")
        broken = self.files.path(
            "broken.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        self.assertProblem(broken, self.key, f"tls_cert_file {broken}: certificate #1 is not valid PEM")

    def test_key_does_not_match(self) -> None:
        """
        A key that belongs to another certificate is refused, naming both files.
        """
        _, other_key = self.files.server("other")
        self.assertProblem(
            self.cert, other_key, f"tls_key_file {other_key} does not match", f"tls_cert_file {self.cert}"
        )

    def test_chain_in_wrong_order(self) -> None:
        """
        A chain with the intermediate before the server certificate gets a hint about the order.
        """
        intermediate = self.files.ca.issue_intermediate("intermediate")
        issued = intermediate.issue("localhost", dns_names=["localhost"])
        cert = self.files.path("reversed.crt", issued.intermediates_pem + issued.cert_pem)
        key = self.files.path("reversed.key", issued.key_pem)
        self.assertProblem(cert, key, "matches certificate #2", "must come first")

    def test_encrypted_key(self) -> None:
        """
        An encrypted key is refused with a message saying so.
        """
        from cryptography.hazmat.primitives import serialization

        with open(self.key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), None)
        encrypted = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        key = self.files.path("encrypted.key", encrypted)
        self.assertProblem(self.cert, key, f"tls_key_file {key}: the key is encrypted")

    def test_missing_client_ca(self) -> None:
        """
        A missing client CA file is named in the error.
        """
        missing = self.files.path("no-ca.crt")
        self.assertProblem(self.cert, self.key, f"client_ca_file {missing}: cannot read", client_ca=missing)

    def test_reload_if_changed(self) -> None:
        """
        Unchanged files are not reloaded; new files are, and the new subject is logged.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        self.assertFalse(server_tls.reload_if_changed())
        self.files.server(cn="second")
        self.assertTrue(server_tls.reload_if_changed())
        self.assertEqual(_subject(server_tls), "CN=second")
        self.assertFalse(server_tls.reload_if_changed())
        self.assertEqual(
            [e for e in self.logs.at_least(LogLevel.info) if e.startswith("Reloaded")],
            [
                f"Reloaded TLS certificate CN=second (valid until "
                f"{server_tls.not_valid_after.isoformat()}) from {self.cert}"
            ],
        )

    def test_broken_files_keep_old_certificate(self) -> None:
        """
        A broken new key keeps the old certificate and logs one error line, however
        often the files are checked, until they are fixed.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        old_context = server_tls.getContext()
        self.files.server(cn="second")
        with open(self.key, "wb") as f:
            f.write(b"not a key\n")
        for _ in range(3):
            self.assertFalse(server_tls.reload_if_changed())
        self.assertIs(server_tls.getContext(), old_context)
        self.assertEqual(_subject(server_tls), "CN=first")
        self.assertEqual(
            self.logs.at_least(LogLevel.warn),
            [f"Keeping the current TLS certificate: tls_key_file {self.key}: no PEM private key found"],
        )
        self.files.server(cn="third")
        self.assertTrue(server_tls.reload_if_changed())
        self.assertEqual(_subject(server_tls), "CN=third")

    def test_half_written_pair(self) -> None:
        """
        A new certificate whose key is not written yet is refused, and taken once the key arrives.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        issued = self.files.ca.issue("second", dns_names=["localhost"])
        with open(self.cert, "wb") as f:
            f.write(issued.cert_pem)
        self.assertFalse(server_tls.reload_if_changed())
        self.assertEqual(_subject(server_tls), "CN=first")
        with open(self.key, "wb") as f:
            f.write(issued.key_pem)
        self.assertTrue(server_tls.reload_if_changed())
        self.assertEqual(_subject(server_tls), "CN=second")

    def test_deleted_files(self) -> None:
        """
        Files that disappear keep the old certificate and log an error naming the file.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        os.remove(self.cert)
        self.assertFalse(server_tls.reload_if_changed())
        self.assertEqual(_subject(server_tls), "CN=first")
        self.assertEqual(len(self.logs.at_least(LogLevel.warn)), 1)
        self.assertIn(f"tls_cert_file {self.cert}: cannot read", self.logs.at_least(LogLevel.warn)[0])

    def test_reload_forces(self) -> None:
        """
        ``reload`` builds a new context even when nothing changed.
        """
        server_tls = ServerTLS.from_files(self.cert, self.key)
        old_context = server_tls.getContext()
        self.assertTrue(server_tls.reload())
        self.assertIsNot(server_tls.getContext(), old_context)

    def test_expired_certificate_warns(self) -> None:
        """
        An expired certificate loads, with a warning that it is not valid now.
        """
        cert, key = self.files.server("expired", cn="old", not_valid_after_days=-1)
        ServerTLS.from_files(cert, key)
        [warning] = self.logs.at_least(LogLevel.warn)
        self.assertIn("TLS certificate CN=old", warning)
        self.assertIn("is not valid now", warning)


class _Exploding:
    """
    A stand-in for `ServerTLS` whose check always raises.
    """

    cert_file = "/nowhere/tls.crt"

    def __init__(self) -> None:
        self.calls = 0

    def reload_if_changed(self) -> bool:
        self.calls += 1
        raise RuntimeError("boom")


class CertificateReloaderTests(SynchronousTestCase):
    """
    The polling service.
    """

    def test_polls(self) -> None:
        """
        New files are picked up one interval after they change, not before.
        """
        files = _Files(self)
        cert, key = files.server(cn="first")
        server_tls = ServerTLS.from_files(cert, key)
        clock = Clock()
        reloader = CertificateReloader(server_tls, clock, interval=5)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        files.server(cn="second")
        clock.advance(4.9)
        self.assertEqual(_subject(server_tls), "CN=first")
        clock.advance(0.1)
        self.assertEqual(_subject(server_tls), "CN=second")

    def test_survives_errors(self) -> None:
        """
        A check that raises is logged and the next check still happens.
        """
        target = _Exploding()
        clock = Clock()
        reloader = CertificateReloader(target, clock)  # type: ignore[arg-type]
        reloader.startService()
        self.addCleanup(reloader.stopService)
        clock.advance(5)
        clock.advance(5)
        self.assertEqual(target.calls, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stops(self) -> None:
        """
        After ``stopService`` nothing is scheduled and no more checks happen.
        """
        target = _Exploding()
        clock = Clock()
        reloader = CertificateReloader(target, clock)  # type: ignore[arg-type]
        reloader.startService()
        reloader.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(60)
        self.assertEqual(target.calls, 0)
        self.assertFalse(reloader.running)


class _LoopbackTestCase(TestCase):
    """
    Real listeners on 127.0.0.1, closed after each test.
    """

    timeout = 30

    def setUp(self) -> None:
        self.reactor = _reactor()
        self.files = _Files(self)
        self.logs = LogCapture(self)

    def serve(self, server_tls: ServerTLS) -> tuple[int, _CountingSite]:
        """
        Listen with TLS on a loopback port; the cleanup waits for the server to see every
        connection end, then closes the port.
        """
        site = _CountingSite()
        listening = listen_tls(self.reactor, Address(LOOPBACK, 0), site, server_tls)
        self.addCleanup(listening.stopListening)
        self.addCleanup(site.all_lost)
        return listening.getHost().port, site


class ListenerTests(_LoopbackTestCase):
    """
    The TLS listener against ``curl`` and ``openssl s_client``.
    """

    def setUp(self) -> None:
        super().setUp()
        intermediate = self.files.ca.issue_intermediate("banyan-kproxy intermediate")
        issued = intermediate.issue("localhost", dns_names=["localhost"], ip_addresses=[LOOPBACK])
        self.cert, self.key = issued.write(self.files.directory, "chain")
        self.server_tls = ServerTLS.from_files(self.cert, self.key)

    async def _curl_alpn(self) -> None:
        port, _ = self.serve(self.server_tls)
        output, code = await curl(f"https://localhost:{port}/", "-v", "--cacert", self.files.ca_file)
        self.assertEqual(code, 0, output)
        self.assertTrue(output.endswith(b"hello anonymous"), output)
        self.assertIn(b"ALPN: offers h2,http/1.1", output)
        self.assertIn(b"ALPN: server accepted http/1.1", output)

    def test_curl_alpn(self) -> None:
        """
        curl, offering ALPN h2 and http/1.1, gets http/1.1 and a normal response; the
        intermediate is sent, so a client trusting only the root verifies the chain.
        """
        return ensureDeferred(self._curl_alpn())

    async def _s_client_alpn(self) -> None:
        port, _ = self.serve(self.server_tls)
        output, code = await s_client(port, self.files.ca_file, "-alpn", "h2,http/1.1")
        self.assertEqual(code, 0, output)
        self.assertIn(b"ALPN protocol: http/1.1", output)
        self.assertIn(b"Verify return code: 0 (ok)", output)

    def test_s_client_alpn(self) -> None:
        """
        ``openssl s_client -alpn h2,http/1.1`` negotiates http/1.1 and verifies the chain.
        """
        return ensureDeferred(self._s_client_alpn())

    async def _h2_only(self) -> None:
        port, _ = self.serve(self.server_tls)
        output, code = await s_client(port, self.files.ca_file, "-alpn", "h2")
        self.assertEqual(code, 0, output)
        self.assertIn(b"No ALPN negotiated", output)
        self.assertNotIn(b"internal error", output)

    def test_h2_only_client(self) -> None:
        """
        A client offering only h2 completes the handshake without ALPN instead of
        getting an ``internal_error`` alert.
        """
        return ensureDeferred(self._h2_only())

    async def _versions(self) -> None:
        port, _ = self.serve(self.server_tls)
        output, code = await s_client(port, self.files.ca_file, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        self.assertNotEqual(code, 0, output)
        self.assertIn(b"alert protocol version", output)
        output, code = await s_client(port, self.files.ca_file, "-tls1_2")
        self.assertEqual(code, 0, output)
        self.assertIn(b"Protocol  : TLSv1.2", output)

    def test_tls_versions(self) -> None:
        """
        A TLS 1.1 client is refused with a protocol_version alert; TLS 1.2 is accepted.
        """
        return ensureDeferred(self._versions())

    async def _reload(self) -> None:
        cert, key = self.files.server("rotating", cn="first")
        server_tls = ServerTLS.from_files(cert, key)
        port, _ = self.serve(server_tls)
        clock = Clock()
        reloader = CertificateReloader(server_tls, clock)
        reloader.startService()
        self.addCleanup(reloader.stopService)

        output, code = await s_client(port, self.files.ca_file)
        self.assertIn(b"subject=CN = first", output)

        self.files.server("rotating", cn="second")
        clock.advance(5)
        output, code = await s_client(port, self.files.ca_file)
        self.assertEqual(code, 0, output)
        self.assertIn(b"subject=CN = second", output)
        self.assertIn(b"Verify return code: 0 (ok)", output)

        with open(key, "wb") as f:
            f.write(b"garbage\n")
        clock.advance(5)
        output, code = await s_client(port, self.files.ca_file)
        self.assertIn(b"subject=CN = second", output)
        self.assertEqual(len(self.logs.at_least(LogLevel.error)), 1)

    def test_reload(self) -> None:
        """
        After the files are replaced the next connection gets the new certificate
        without a restart; broken files leave the last good one in use.
        """
        return ensureDeferred(self._reload())

    async def _listen_ssl(self) -> None:
        cert, key = self.files.server("plain-listen", cn="first")
        server_tls = ServerTLS.from_files(cert, key)
        site = _CountingSite()
        listening = self.reactor.listenSSL(0, site, server_tls, interface=LOOPBACK)
        self.addCleanup(listening.stopListening)
        self.addCleanup(site.all_lost)
        port = listening.getHost().port
        output, code = await s_client(port, self.files.ca_file, "-alpn", "h2,http/1.1")
        self.assertIn(b"subject=CN = first", output)
        self.files.server("plain-listen", cn="second")
        self.assertTrue(server_tls.reload_if_changed())
        output, code = await s_client(port, self.files.ca_file, "-alpn", "h2,http/1.1")
        self.assertEqual(code, 0, output)
        self.assertIn(b"subject=CN = second", output)
        self.assertIn(b"ALPN protocol: http/1.1", output)

    def test_listen_ssl(self) -> None:
        """
        ``reactor.listenSSL`` given a `ServerTLS` also serves the current certificate after a reload.
        """
        return ensureDeferred(self._listen_ssl())

    async def _noise(self) -> None:
        port, site = self.serve(self.server_tls)
        endpoint = TCP4ClientEndpoint(self.reactor, LOOPBACK, port)

        # A TCP health check: connect and close without a byte.
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        client.transport.loseConnection()
        # The same, closed with a reset.
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        client.transport.abortConnection()
        # Bytes that are not a TLS handshake.
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        client.transport.write(b"\x16\x03\x01\x00\x05hello")
        client.transport.loseConnection()
        # Plain HTTP to the TLS port.
        output, code = await curl(f"http://{LOOPBACK}:{port}/")
        self.assertNotEqual(code, 0, output)
        # Failed handshakes: an old protocol, and a client that rejects the certificate.
        output, code = await s_client(port, self.files.ca_file, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        self.assertNotEqual(code, 0, output)
        output, code = await curl(f"https://localhost:{port}/")
        self.assertEqual(code, 60, output)
        await site.all_lost()
        self.assertEqual(site.made, 6)

        output, code = await curl(f"https://localhost:{port}/", "--cacert", self.files.ca_file)
        self.assertEqual((output, code), (b"hello anonymous", 0))
        await site.all_lost()
        self.assertEqual(self.logs.at_least(LogLevel.warn), [])

    def test_no_noise(self) -> None:
        """
        Health checks that connect and close, plain HTTP, garbage and failed handshakes
        log nothing above info, and a normal request still works afterwards.
        """
        return ensureDeferred(self._noise())


class HTTPSPolicyTests(_LoopbackTestCase):
    """
    ``https_policy`` with Twisted's ``Agent`` against loopback TLS servers.
    """

    async def get(self, url: str, policy: Any) -> bytes:
        """
        GET ``url`` with ``policy`` on a new connection, closed after the response; the body.
        """
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        agent = Agent(self.reactor, contextFactory=policy, pool=pool, connectTimeout=10)
        response = await agent.request(b"GET", url.encode())
        self.assertEqual(response.code, 200)
        return await readBody(response)

    async def fails(self, url: str, policy: Any) -> str:
        """
        GET ``url`` with ``policy`` expecting failure; the text of every reason.
        """
        try:
            await self.get(url, policy)
        except Exception as e:
            reasons = getattr(e, "reasons", None) or [e]
            return " ".join(repr(getattr(r, "value", r)) for r in reasons)
        self.fail(f"{url} succeeded")

    async def _ip_and_name(self) -> None:
        port, _ = self.serve(ServerTLS.from_files(*self.files.server()))
        policy = https_policy(self.files.ca_file)
        self.assertEqual(await self.get(f"https://{LOOPBACK}:{port}/", policy), b"hello anonymous")
        self.assertEqual(await self.get(f"https://localhost:{port}/", policy), b"hello anonymous")

    def test_ip_address_and_dns_name(self) -> None:
        """
        A server certificate for 127.0.0.1 and localhost is accepted at both URLs.
        """
        return ensureDeferred(self._ip_and_name())

    async def _ip_checked(self) -> None:
        port, _ = self.serve(ServerTLS.from_files(*self.files.server("dns-only", ip_addresses=[])))
        policy = https_policy(self.files.ca_file)
        self.assertEqual(await self.get(f"https://localhost:{port}/", policy), b"hello anonymous")
        self.assertIn("VerificationError", await self.fails(f"https://{LOOPBACK}:{port}/", policy))

    def test_ip_address_checked(self) -> None:
        """
        A certificate without the IP address is refused when the URL names the server by IP.
        """
        return ensureDeferred(self._ip_checked())

    async def _wrong_ca(self) -> None:
        port, _ = self.serve(ServerTLS.from_files(*self.files.server()))
        other = CertificateAuthority.generate("another CA")
        other_file = self.files.path("other-ca.crt", other.cert_pem)
        reasons = await self.fails(f"https://localhost:{port}/", https_policy(other_file))
        self.assertIn("certificate verify failed", reasons)
        # A bundle holding the other CA first and the right one second is fine.
        bundle = self.files.path("bundle.crt", other.cert_pem + self.files.ca.cert_pem)
        body = await self.get(f"https://localhost:{port}/", https_policy(bundle))
        self.assertEqual(body, b"hello anonymous")

    def test_wrong_ca(self) -> None:
        """
        A server whose CA is not in ``ca_file`` is refused; a bundle that includes it works.
        """
        return ensureDeferred(self._wrong_ca())

    async def _system_roots(self) -> None:
        port, _ = self.serve(ServerTLS.from_files(*self.files.server()))
        reasons = await self.fails(f"https://localhost:{port}/", https_policy())
        self.assertIn("certificate verify failed", reasons)

    def test_system_roots(self) -> None:
        """
        Without ``ca_file`` the system roots are used, which do not include a test CA.
        """
        return ensureDeferred(self._system_roots())

    async def _client_certificate(self) -> None:
        client_ca = CertificateAuthority.generate("client CA")
        client_ca_file = client_ca.write_cert(self.files.directory, "client-ca")
        cert, key = self.files.server()
        port, site = self.serve(ServerTLS.from_files(cert, key, client_ca_file))
        url = f"https://localhost:{port}/"

        alice = client_ca.issue("alice", organizations=["dev"], client=True)
        alice_cert, alice_key = alice.write(self.files.directory, "alice")
        policy = https_policy(self.files.ca_file, alice_cert, alice_key)
        self.assertEqual(await self.get(url, policy), b"hello alice")

        # Through an intermediate, sent by the client, in one combined file.
        intermediate = client_ca.issue_intermediate("client intermediate")
        bob = intermediate.issue("bob", client=True)
        combined = self.files.path("bob.pem", bob.chain_pem + bob.key_pem)
        policy = https_policy(self.files.ca_file, combined, combined)
        self.assertEqual(await self.get(url, policy), b"hello bob")

        await site.all_lost()
        self.assertIn("certificate required", await self.fails(url, https_policy(self.files.ca_file)))
        self.assertEqual(self.logs.at_least(LogLevel.warn), [])

    def test_client_certificate(self) -> None:
        """
        The client certificate (with its intermediate when given) reaches a server that
        requires one; without it the request fails.
        """
        return ensureDeferred(self._client_certificate())

    async def _optional_client_certificate(self) -> None:
        client_ca = CertificateAuthority.generate("client CA")
        client_ca_file = client_ca.write_cert(self.files.directory, "client-ca")
        cert, key = self.files.server()
        server_tls = ServerTLS.from_files(
            cert, key, client_ca_file, require_client_certificate=False
        )
        port, site = self.serve(server_tls)
        url = f"https://localhost:{port}/"

        self.assertEqual(await self.get(url, https_policy(self.files.ca_file)), b"hello anonymous")
        alice = client_ca.issue("alice", client=True)
        policy = https_policy(self.files.ca_file, *alice.write(self.files.directory, "alice"))
        self.assertEqual(await self.get(url, policy), b"hello alice")

        # A certificate from another CA is refused, not ignored.
        await site.all_lost()
        mallory = CertificateAuthority.generate("other CA").issue("mallory", client=True)
        policy = https_policy(self.files.ca_file, *mallory.write(self.files.directory, "mallory"))
        self.assertIn("unknown ca", await self.fails(url, policy))

    def test_optional_client_certificate(self) -> None:
        """
        With ``require_client_certificate=False`` a client without a certificate is served
        as anonymous, one with a certificate from the client CA is seen as its CN, and
        one from another CA is refused.
        """
        return ensureDeferred(self._optional_client_certificate())


class HTTPSPolicyFileTests(SynchronousTestCase):
    """
    ``https_policy`` refuses unusable files, naming them.
    """

    def setUp(self) -> None:
        self.files = _Files(self)

    def test_missing_ca_file(self) -> None:
        """
        A missing CA file is named.
        """
        missing = self.files.path("missing.crt")
        e = self.assertRaises(TLSConfigError, https_policy, missing)
        self.assertIn(f"ca_file {missing}: cannot read", str(e))

    def test_ca_file_without_certificates(self) -> None:
        """
        A CA file with no certificate in it is named.
        """
        empty = self.files.path("empty.crt", b"\n")
        e = self.assertRaises(TLSConfigError, https_policy, empty)
        self.assertEqual(str(e), f"ca_file {empty}: no PEM certificate found")

    def test_half_a_client_certificate(self) -> None:
        """
        A client certificate without its key (or the reverse) is refused.
        """
        cert, key = self.files.server()
        e = self.assertRaises(TLSConfigError, https_policy, self.files.ca_file, cert, None)
        self.assertIn("client_cert_file is set but client_key_file is not", str(e))
        e = self.assertRaises(TLSConfigError, https_policy, self.files.ca_file, None, key)
        self.assertIn("client_key_file is set but client_cert_file is not", str(e))

    def test_client_key_mismatch(self) -> None:
        """
        A client key that does not match the client certificate is refused, naming both.
        """
        cert, _ = self.files.server("one")
        _, key = self.files.server("two")
        e = self.assertRaises(TLSConfigError, https_policy, self.files.ca_file, cert, key)
        self.assertEqual(
            str(e), f"client_key_file {key} does not match the certificate in client_cert_file {cert}"
        )


class ListenTests(TestCase):
    """
    ``listen_tcp`` and ``listen_tls`` on addresses, with and without ``SO_REUSEPORT``.
    """

    timeout = 30

    def setUp(self) -> None:
        self.reactor = _reactor()

    def listen(self, address: Address, reuse_port: bool = False, factory: Any = None) -> Any:
        """
        ``listen_tcp`` with a factory that counts connections; the port is closed afterwards.
        """
        factory = factory or _Counting()
        port = listen_tcp(self.reactor, address, factory, reuse_port=reuse_port)
        self.addCleanup(port.stopListening)
        port.counting = factory
        return port

    def test_bind_failure_names_address(self) -> None:
        """
        Listening on a port in use raises ``CannotListenError`` naming host and port.
        """
        first = self.listen(Address(LOOPBACK, 0))
        taken = first.getHost().port
        for reuse_port in (False, True):
            e = self.assertRaises(
                CannotListenError, listen_tcp, self.reactor, Address(LOOPBACK, taken), _Counting(), reuse_port
            )
            self.assertIn(f"{LOOPBACK}:{taken}", str(e))

    def test_ipv6(self) -> None:
        """
        An IPv6 literal is listened on, and a bind failure names it in brackets.
        """
        if not socket.has_ipv6:
            raise SkipTest("no IPv6")
        try:
            first = self.listen(Address("::1", 0))
        except CannotListenError as e:
            raise SkipTest(f"no IPv6 loopback: {e}")
        self.assertEqual(first.getHost().host, "::1")
        taken = first.getHost().port
        e = self.assertRaises(CannotListenError, listen_tcp, self.reactor, Address("::1", taken), _Counting())
        self.assertIn(f"[::1]:{taken}", str(e))
        second = self.listen(Address("::1", 0), reuse_port=True)
        self.assertEqual(second.getHost().host, "::1")

    async def _reuse_port(self) -> None:
        first = self.listen(Address(LOOPBACK, 0), reuse_port=True)
        port = first.getHost().port
        second = self.listen(Address(LOOPBACK, port), reuse_port=True)
        self.assertEqual(second.getHost().port, port)
        endpoint = TCP4ClientEndpoint(self.reactor, LOOPBACK, port)
        for _ in range(40):
            client = await endpoint.connect(Factory.forProtocol(Protocol))
            client.transport.loseConnection()
        for _ in range(500):
            if first.counting.lost + second.counting.lost == 40:
                break
            await _later(self.reactor)
        self.assertEqual(first.counting.count + second.counting.count, 40)
        self.assertGreater(first.counting.count, 0)
        self.assertGreater(second.counting.count, 0)

    def test_reuse_port_shares(self) -> None:
        """
        Two listeners with ``reuse_port`` on one port both listen, and the kernel spreads
        connections over both.
        """
        return ensureDeferred(self._reuse_port())

    def test_reuse_port_closes_its_descriptor(self) -> None:
        """
        Once the socket is adopted, only the reactor's descriptor listens on the port.
        """
        port = listen_tcp(self.reactor, Address(LOOPBACK, 0), _Counting(), reuse_port=True)
        self.addCleanup(port.stopListening)
        self.assertEqual(_listening_descriptors(port.getHost().port), [port.fileno()])

    async def _reuse_port_tls(self) -> None:
        files = _Files(self)
        server_tls = ServerTLS.from_files(*files.server())
        sites = [_CountingSite(), _CountingSite()]
        first = listen_tls(self.reactor, Address(LOOPBACK, 0), sites[0], server_tls, reuse_port=True)
        self.addCleanup(first.stopListening)
        port = first.getHost().port
        second = listen_tls(self.reactor, Address(LOOPBACK, port), sites[1], server_tls, reuse_port=True)
        self.addCleanup(second.stopListening)
        for site in sites:
            self.addCleanup(site.all_lost)
        self.assertEqual(second.getHost().port, port)
        output, code = await curl(f"https://localhost:{port}/", "--cacert", files.ca_file)
        self.assertEqual((output, code), (b"hello anonymous", 0))

    def test_reuse_port_tls(self) -> None:
        """
        Two TLS listeners with ``reuse_port`` on one port both start and serve TLS.
        """
        return ensureDeferred(self._reuse_port_tls())


class _Counting(Factory):
    """
    Counts the connections it was given and lost.
    """

    def __init__(self) -> None:
        self.count = 0
        self.lost = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        factory = self

        class Counted(Protocol):
            def connectionLost(self, reason: Any) -> None:
                factory.lost += 1

        return Counted()


def _listening_descriptors(port: int) -> list[int]:
    """
    This process's descriptors that are TCP sockets listening on ``port``.
    """
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            address = sock.getsockname()
            if (
                isinstance(address, tuple)
                and address[1] == port
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                found.append(int(name))
        except OSError:
            pass
        finally:
            sock.close()
    return found


def _later(reactor: Any) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d



class ListenBacklogTests(SynchronousTestCase):
    """
    Listeners ask the kernel for a queue of `LISTEN_BACKLOG` pending connections,
    so a crowd of reconnecting watch clients is not turned away.
    """

    def test_tcp_and_tls(self) -> None:
        """
        `listen_tcp` and `listen_tls` pass `LISTEN_BACKLOG` to the reactor.
        """
        from twisted.internet.testing import MemoryReactor

        from banyan_kproxy.tls import LISTEN_BACKLOG

        reactor = MemoryReactor()
        cert, key = _Files(self).server()
        listen_tcp(reactor, Address(LOOPBACK, 0), Factory())
        listen_tls(reactor, Address(LOOPBACK, 0), Factory(), ServerTLS.from_files(cert, key))
        self.assertEqual([server[2] for server in reactor.tcpServers], [LISTEN_BACKLOG, LISTEN_BACKLOG])
        self.assertGreaterEqual(LISTEN_BACKLOG, 1024)
