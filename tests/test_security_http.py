"""
Hostile HTTP against a real proxy listener on 127.0.0.1 (issue 9, point 2).

The listener is the daemon's own: `ProxySite` in front of `KubeProxyResource`, over TLS
from `listen_tls`, with a recording stand-in for the apiserver that answers every
request it gets with a small 200.  Clients are raw TCP or TLS protocols that write
exactly the bytes a test gives them.  Each test asserts the client's outcome (a
status, or a closed connection), that nothing reached the apiserver that should not
have, and that the listener still serves a good request afterwards.  Deadlines are
injected small (half a second) so slow-client tests take about a second.

Twisted 22.4 and 26.10 differ in details (26.10 refuses NUL in header values, the
wording of some 400s); where they differ the assertion is the safe outcome common to
both.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
import functools
from collections.abc import Callable, Coroutine

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.python.failure import Failure

from banyan_kproxy.config import Address, ImpersonationConfig, UpstreamConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.proxy.resource import KubeProxyResource, ProxyMetrics
from banyan_kproxy.proxy.site import ProxySite
from banyan_kproxy.proxy.upstream import TokenFile, Upstream
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.tls import ServerTLS, listen_tls
from tests.test_proxy import GOOD, FakeUpstreamTransport, FakeVerifier

#: Deadlines injected into the listener under test.
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.8
MAX_BODY = 64 * 1024
#: Longest any single wait in these tests may take, seconds.
WAIT = 5.0


def deferred_test(method: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """
    Run an ``async def`` test as a Deferred (trial 22.4 does not await coroutines).
    """

    @functools.wraps(method)
    def run(self: Any) -> Deferred[None]:
        return ensureDeferred(method(self))

    return run


class _OK:
    """
    A small 200 response from the apiserver stand-in.
    """

    code = 200
    phrase = b"OK"
    length = 2

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"application/json"]})

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(FakeUpstreamTransport())
        protocol.dataReceived(b"{}")
        protocol.connectionLost(Failure(ResponseDone()))


class AnsweringAgent:
    """
    An IAgent that records every request and answers it with `_OK`.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers, body: Any = None) -> Deferred:
        self.requests.append((method, uri, headers))
        return succeed(_OK())

    def paths(self) -> list[bytes]:
        return [uri.split(b":6443", 1)[1] for _, uri, _ in self.requests]


class RawClient(Protocol):
    """
    Writes what it is told, collects what comes back, notes when the connection ends.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def status(self) -> int | None:
        """
        The status code of the first response, or None if none came.
        """
        if not self.data.startswith(b"HTTP/1."):
            return None
        return int(self.data.split(b" ", 2)[1])


class HostileHTTPTests(TestCase):
    """
    Malformed, ambiguous, oversized and slow requests against the TLS listener.
    """

    timeout = 30

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.generate()
        self.ca_cert = Certificate.loadPEM(ca.cert_pem)
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(directory, "server")
        token_path = os.path.join(directory, "token")
        with open(token_path, "w") as f:
            f.write("proxy-sa-token\n")
        token = TokenFile(token_path, reactor)
        token.load()
        self.agent = AnsweringAgent()
        upstream = Upstream(UpstreamConfig("https://10.0.0.1:6443/"), self.agent, token)
        resource = KubeProxyResource(
            verifier=FakeVerifier(), upstream=upstream, impersonation=ImpersonationConfig(),
            metrics=ProxyMetrics.create(Metrics()), clock=reactor,
        )
        self.site = ProxySite(resource, reactor=reactor)
        self.site.header_timeout = HEADER_TIMEOUT
        self.site.body_timeout = BODY_TIMEOUT
        self.site.max_request_body = MAX_BODY
        port = listen_tls(reactor, Address("127.0.0.1", 0), self.site,
                          ServerTLS.from_files(cert, key))
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    # -- clients -------------------------------------------------------------------

    async def connect(self, tls: bool = True) -> RawClient:
        client = RawClient()
        endpoint: Any = HostnameEndpoint(reactor, "127.0.0.1", self.port)
        if tls:
            endpoint = wrapClientTLS(optionsForClientTLS("127.0.0.1", trustRoot=self.ca_cert), endpoint)
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection() if not client.lost.called else None)
        return client

    async def wait_for(self, condition: Any, what: str, limit: float = WAIT) -> float:
        """
        Wait (at most ``limit`` seconds) for ``condition()``; returns the time taken.
        """
        start = reactor.seconds()
        while not condition():
            if reactor.seconds() - start > limit:
                self.fail(f"timed out after {limit}s waiting for {what}")
            await deferLater(reactor, 0.02, lambda: None)
        return reactor.seconds() - start

    async def send(self, data: bytes, tls: bool = True) -> RawClient:
        """
        Connect, send ``data``, and wait for the connection to be closed by the proxy.
        """
        client = await self.connect(tls)
        client.transport.write(data)
        await self.wait_for(lambda: client.lost.called, "the proxy to close the connection")
        return client

    async def good_request(self) -> None:
        """
        The listener still serves a good request: 200, and it reached upstream.
        """
        before = len(self.agent.requests)
        client = await self.connect()
        client.transport.write(self.head(b"GET /api/v1/pods?good=1", close=True))
        await self.wait_for(lambda: client.lost.called, "the good request's answer")
        self.assertEqual(client.status(), 200, client.data[:200])
        self.assertEqual(self.agent.paths()[before:], [b"/api/v1/pods?good=1"])

    def head(self, request_line: bytes, *lines: bytes, token: bool = True, close: bool = False) -> bytes:
        out = [request_line + b" HTTP/1.1", b"Host: proxy"]
        if token:
            out.append(b"Authorization: Bearer " + GOOD.encode())
        if close:
            out.append(b"Connection: close")
        out.extend(lines)
        return b"\r\n".join(out) + b"\r\n\r\n"

    def assert_refused(self, client: RawClient, codes: tuple[int, ...] = (400,)) -> None:
        """
        The client got one of ``codes`` or a closed connection with no response, and
        nothing reached the apiserver.
        """
        self.assertIn(client.status(), (*codes, None), client.data[:200])
        self.assertEqual(self.agent.requests, [])

    # -- request smuggling -----------------------------------------------------------

    @deferred_test
    async def test_content_length_and_chunked(self) -> None:
        """
        Content-Length with Transfer-Encoding: chunked is a 400 and the connection
        closes; the request hidden in the body never reaches upstream.
        """
        smuggled = self.head(b"GET /smuggled")
        client = await self.send(
            self.head(b"POST /api/v1/namespaces/default/configmaps",
                      b"Content-Length: %d" % (len(smuggled) + 5),
                      b"Transfer-Encoding: chunked") + b"0\r\n\r\n" + smuggled
        )
        self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_chunked_then_content_length(self) -> None:
        """
        The same with the headers the other way round (TE first, CL second).
        """
        smuggled = self.head(b"GET /smuggled")
        client = await self.send(
            self.head(b"POST /api/v1/pods", b"Transfer-Encoding: chunked",
                      b"Content-Length: 4") + b"0\r\n\r\n" + smuggled
        )
        self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_two_content_lengths(self) -> None:
        """
        Two Content-Length headers, different or equal, are a 400.
        """
        for lengths in ((b"0", b"30"), (b"5", b"5")):
            self.agent.requests.clear()
            client = await self.send(
                self.head(b"POST /api/v1/pods", b"Content-Length: " + lengths[0],
                          b"Content-Length: " + lengths[1]) + b"hello" + self.head(b"GET /smuggled")
            )
            self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_content_length_with_sign_or_junk(self) -> None:
        """
        Content-Length ``+5``, ``-1``, ``0x5``, ``5 5`` or ``5,5`` is a 400.
        """
        for value in (b"+5", b"-1", b"0x5", b"5 5", b"5,5"):
            client = await self.send(
                self.head(b"POST /api/v1/pods", b"Content-Length: " + value) + b"hello"
                + self.head(b"GET /smuggled")
            )
            self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_transfer_encoding_variants(self) -> None:
        """
        ``Transfer-Encoding: chunked, identity``, ``xchunked`` or an obs-folded
        ``chunked`` is a 400 (or a close), never a request framed two ways.
        """
        for lines in ([b"Transfer-Encoding: chunked, identity"], [b"Transfer-Encoding: xchunked"],
                      [b"Transfer-Encoding:", b" chunked"]):
            client = await self.send(
                self.head(b"POST /api/v1/pods", *lines, close=True) + b"0\r\n\r\n"
                + self.head(b"GET /smuggled")
            )
            self.assertIn(client.status(), (200, 400, None), client.data[:200])
            self.assertNotIn(b"/smuggled", b" ".join(self.agent.paths()))
        self.agent.requests.clear()
        await self.good_request()

    @deferred_test
    async def test_obs_fold(self) -> None:
        """
        An obs-folded line never becomes a header of its own: a request whose folded
        line spells a Content-Length is still framed by its real headers, and the
        request behind it is a separate, authenticated request or nothing.
        """
        client = await self.send(
            self.head(b"GET /api/v1/pods?folded=1", b"X-Note: a", b" Content-Length: 40", close=True)
        )
        self.assertIn(client.status(), (200, 400), client.data[:200])
        self.assertTrue(all(p.startswith(b"/api/v1/pods?folded=1") for p in self.agent.paths()))
        for _, _, headers in self.agent.requests:
            self.assertNotIn(b"40", b"".join(headers.getRawHeaders(b"content-length", [])))
        self.agent.requests.clear()
        await self.good_request()

    @deferred_test
    async def test_bare_lf(self) -> None:
        """
        A request with bare LF line endings is never forwarded: it is answered 400
        or the connection is closed within the header deadline.
        """
        client = await self.send(
            b"GET /api/v1/pods HTTP/1.1\nHost: proxy\nAuthorization: Bearer "
            + GOOD.encode() + b"\n\n"
        )
        self.assert_refused(client)
        await self.good_request()

    # -- size limits -------------------------------------------------------------------

    @deferred_test
    async def test_oversized_header(self) -> None:
        """
        A 20 KB header (over Twisted's 16 KiB for the whole head) is a 400 and a close.
        """
        client = await self.send(self.head(b"GET /api/v1/pods", b"X-Big: " + b"a" * 20000))
        self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_oversized_uri(self) -> None:
        """
        A 20 KB request target is refused (400, 414 or a close), not forwarded.
        """
        client = await self.send(self.head(b"GET /api/v1/pods?x=" + b"a" * 20000))
        self.assert_refused(client, (400, 414))
        await self.good_request()

    @deferred_test
    async def test_too_many_headers(self) -> None:
        """
        600 small headers (over Twisted's 500) are a 400 and a close.
        """
        client = await self.send(self.head(b"GET /api/v1/pods", *[b"X-%d: 1" % i for i in range(600)]))
        self.assert_refused(client)
        await self.good_request()

    @deferred_test
    async def test_oversized_body(self) -> None:
        """
        A declared body over the limit is answered 413 at once, before it is read or
        the request authenticated, and the connection is closed.
        """
        client = await self.connect()
        client.transport.write(self.head(b"POST /api/v1/pods", b"Content-Length: %d" % (MAX_BODY + 1),
                                         token=False))
        await self.wait_for(lambda: client.lost.called, "the 413 and the close " + repr(client.data))
        self.assertEqual(client.status(), 413, client.data[:200])
        self.assertIn(b'"reason":"RequestEntityTooLarge"', client.data.replace(b" ", b""))
        self.assertEqual(self.agent.requests, [])
        await self.good_request()

    @deferred_test
    async def test_oversized_chunked_body(self) -> None:
        """
        A chunked body that grows past the limit is answered 413 and cut off.
        """
        client = await self.connect()
        client.transport.write(self.head(b"POST /api/v1/pods", b"Transfer-Encoding: chunked"))
        chunk = b"%x\r\n" % 8192 + b"a" * 8192 + b"\r\n"
        for _ in range(MAX_BODY // 8192 + 2):
            if client.lost.called:
                break
            client.transport.write(chunk)
            await deferLater(reactor, 0, lambda: None)
        await self.wait_for(lambda: client.lost.called, "the 413 and the close")
        self.assertEqual(client.status(), 413, client.data[:200])
        self.assertEqual(self.agent.requests, [])
        await self.good_request()

    @deferred_test
    async def test_body_at_limit(self) -> None:
        """
        A body exactly at the limit is accepted and forwarded (the control).
        """
        client = await self.connect()
        client.transport.write(self.head(b"POST /api/v1/pods", b"Content-Length: %d" % MAX_BODY,
                                         close=True) + b"a" * MAX_BODY)
        await self.wait_for(lambda: client.lost.called, "the answer")
        self.assertEqual(client.status(), 200, client.data[:200])
        self.assertEqual(self.agent.paths(), [b"/api/v1/pods"])

    # -- slow and broken clients ----------------------------------------------------

    @deferred_test
    async def test_slowloris_head(self) -> None:
        """
        A head sent a byte at a time (each byte resetting Twisted's idle timeout) is
        cut off by the header deadline, and nothing reaches upstream.
        """
        client = await self.connect()
        head = self.head(b"GET /api/v1/pods")
        start = reactor.seconds()
        for byte in head[:-4]:
            if client.lost.called:
                break
            client.transport.write(bytes([byte]))
            await deferLater(reactor, 0.05, lambda: None)
            if reactor.seconds() - start > WAIT:
                break
        await self.wait_for(lambda: client.lost.called, "the header deadline")
        self.assertLess(reactor.seconds() - start, HEADER_TIMEOUT + 2.0)
        self.assert_refused(client, ())
        await self.good_request()

    @deferred_test
    async def test_silent_connection(self) -> None:
        """
        A TLS connection that never sends a request is closed by the header deadline.
        """
        client = await self.connect()
        waited = await self.wait_for(lambda: client.lost.called, "the header deadline")
        self.assertLess(waited, HEADER_TIMEOUT + 2.0)
        self.assertEqual(client.data, b"")
        await self.good_request()

    @deferred_test
    async def test_stalled_tls_handshake(self) -> None:
        """
        A TCP connection that sends half a TLS ClientHello and stalls is closed by the
        header deadline.
        """
        client = await self.connect(tls=False)
        client.transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        waited = await self.wait_for(lambda: client.lost.called, "the header deadline")
        self.assertLess(waited, HEADER_TIMEOUT + 2.0)
        await self.good_request()

    @deferred_test
    async def test_slow_body(self) -> None:
        """
        A body that stops arriving is cut off by the body deadline; the request is
        never forwarded.
        """
        client = await self.connect()
        client.transport.write(self.head(b"POST /api/v1/pods", b"Content-Length: 100") + b"a" * 10)
        waited = await self.wait_for(lambda: client.lost.called, "the body deadline")
        self.assertLess(waited, BODY_TIMEOUT + 2.0)
        self.assertGreaterEqual(waited, HEADER_TIMEOUT * 0.5)
        self.assert_refused(client, ())
        await self.good_request()

    @deferred_test
    async def test_keep_alive_then_idle(self) -> None:
        """
        After a served request, a kept-alive connection that sends half of a second
        head is closed by the header deadline; the first request was served.
        """
        client = await self.connect()
        client.transport.write(self.head(b"GET /api/v1/pods?first=1"))
        await self.wait_for(lambda: client.status() == 200, "the first answer")
        client.transport.write(b"GET /api/v1/pods?second=1 HTTP/1.1\r\nHost: pro")
        await self.wait_for(lambda: client.lost.called, "the header deadline")
        self.assertEqual(self.agent.paths(), [b"/api/v1/pods?first=1"])
        await self.good_request()

    @deferred_test
    async def test_reset_mid_head(self) -> None:
        """
        A client that resets the connection in the middle of its head leaves nothing
        behind: no upstream request, no error, the listener serves the next client.
        """
        for _ in range(5):
            client = await self.connect()
            client.transport.write(b"GET /api/v1/pods HTTP/1.1\r\nHost: pro")
            await deferLater(reactor, 0.01, lambda: None)
            client.transport.abortConnection()
            await client.lost
        self.assertEqual(self.agent.requests, [])
        await self.good_request()

    @deferred_test
    async def test_reset_after_request(self) -> None:
        """
        A client that sends a whole request and resets at once does not break the
        listener (its request may or may not have been forwarded, as sent).
        """
        for _ in range(5):
            client = await self.connect()
            client.transport.write(self.head(b"GET /api/v1/pods?reset=1"))
            client.transport.abortConnection()
            await client.lost
        self.assertTrue(all(p == b"/api/v1/pods?reset=1" for p in self.agent.paths()))
        self.agent.requests.clear()
        await self.good_request()

    @deferred_test
    async def test_half_close_after_head(self) -> None:
        """
        A TCP client that half-closes (FIN) after a partial plain-text head, on the
        TLS port, is closed and leaves no upstream request.
        """
        client = await self.connect(tls=False)
        client.transport.write(b"GET / HTTP/1.1\r\n")
        client.transport.loseWriteConnection()
        await self.wait_for(lambda: client.lost.called, "the close")
        self.assertEqual(self.agent.requests, [])
        await self.good_request()

    # -- TLS garbage -------------------------------------------------------------------

    @deferred_test
    async def test_plain_http_on_tls_port(self) -> None:
        """
        Plain HTTP to the TLS port is closed (a TLS alert at most); nothing upstream.
        """
        client = await self.send(self.head(b"GET /api/v1/pods"), tls=False)
        self.assertFalse(client.data.startswith(b"HTTP/"))
        self.assertEqual(self.agent.requests, [])
        await self.good_request()

    @deferred_test
    async def test_tls_garbage(self) -> None:
        """
        Random bytes, a TLS record with an absurd length and an SSLv2-style hello are
        each closed; the listener keeps serving.
        """
        for data in (os.urandom(512), b"\x16\x03\x01\xff\xff" + os.urandom(64),
                     b"\x80\x2e\x01\x00\x02\x00\x15" + os.urandom(40)):
            client = await self.send(data, tls=False)
            self.assertFalse(client.data.startswith(b"HTTP/"))
        self.assertEqual(self.agent.requests, [])
        await self.good_request()
