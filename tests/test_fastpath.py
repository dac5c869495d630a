"""
Tests for the request path's speed-ups: the upstream agent's short path, the cached
endpoints, ``TCP_NODELAY`` and buffer sizes on both sides, the audit id, the
response header copy and the cached metric series.  Each checks that the faster
way gives what the slower one gave.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint

from banyan_kproxy.config import Address
from banyan_kproxy.health import Metrics
from banyan_kproxy.proxy import headers as policy
from banyan_kproxy.proxy import upstream
from banyan_kproxy.proxy.resource import ProxyMetrics, new_audit_id
from banyan_kproxy.proxy.upstream import ApiserverAgent, ApiserverEndpoints, _NoDelayEndpoint
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.tls import CLIENT_BUFFER_SIZE, ServerTLS, https_policy, listen_tls

SERVER = b"https://kube.example.com:6443"


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    """
    Connects in memory: each connection's protocol gets a `StringTransport`.
    """

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


class _MemoryEndpoints:
    """
    An endpoint factory that hands out one `_MemoryEndpoint` per scheme, host and
    port, and records which it was asked for.
    """

    def __init__(self) -> None:
        self.endpoints: dict[tuple[bytes, bytes, int], _MemoryEndpoint] = {}

    def endpointForURI(self, uri: URI) -> _MemoryEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        if key not in self.endpoints:
            self.endpoints[key] = _MemoryEndpoint(b"%s:%d" % (uri.host, uri.port))
        return self.endpoints[key]


def _agents() -> tuple[Any, _MemoryEndpoints, Any, _MemoryEndpoints]:
    reactor = MemoryReactorClock()
    fast_endpoints, plain_endpoints = _MemoryEndpoints(), _MemoryEndpoints()
    fast = ApiserverAgent.for_server(
        reactor, fast_endpoints, HTTPConnectionPool(reactor, persistent=True), SERVER
    )
    plain = Agent.usingEndpointFactory(
        reactor, plain_endpoints, HTTPConnectionPool(reactor, persistent=True)
    )
    return fast, fast_endpoints, plain, plain_endpoints


def _sent(endpoints: _MemoryEndpoints, key: tuple[bytes, bytes, int]) -> bytes:
    [protocol] = endpoints.endpoints[key].protocols
    return protocol.transport.value()


def _head(data: bytes) -> tuple[bytes, list[bytes]]:
    """
    The request line and the sorted header lines of a request head.
    """
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return head[0], sorted(head[1:])


class ApiserverAgentTests(SynchronousTestCase):
    """
    `ApiserverAgent` sends what Twisted's ``Agent`` sends, without parsing URLs on
    its server again.
    """

    KEY = (b"https", b"kube.example.com", 6443)

    def same_request(self, url: bytes, headers: Headers | None = None) -> bytes:
        fast, fast_endpoints, plain, plain_endpoints = _agents()
        fast.request(b"GET", url, headers.copy() if headers else None)
        plain.request(b"GET", url, headers.copy() if headers else None)
        key = (URI.fromBytes(url).scheme, URI.fromBytes(url).host, URI.fromBytes(url).port)
        sent = _sent(fast_endpoints, key)
        self.assertEqual(_head(sent), _head(_sent(plain_endpoints, key)))
        return sent

    def test_same_bytes_as_agent(self) -> None:
        """
        A request with a query to the server goes out with the request line, Host
        header and other headers ``Agent`` writes.
        """
        headers = Headers({b"Accept": [b"application/json"], b"Audit-ID": [b"abc"]})
        sent = self.same_request(SERVER + b"/api/v1/namespaces/default/pods?watch=1&rv=5", headers)
        self.assertTrue(sent.startswith(b"GET /api/v1/namespaces/default/pods?watch=1&rv=5 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: kube.example.com:6443\r\n", sent)

    def test_default_port_host(self) -> None:
        """
        On the default port the Host header has no port, as ``Agent`` sends it.
        """
        fast, endpoints, _, _ = _agents()
        fast = ApiserverAgent.for_server(
            MemoryReactorClock(), endpoints, HTTPConnectionPool(MemoryReactorClock()), b"https://kube.example.com"
        )
        fast.request(b"GET", b"https://kube.example.com/version")
        sent = _sent(endpoints, (b"https", b"kube.example.com", 443))
        self.assertTrue(sent.startswith(b"GET /version HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: kube.example.com\r\n", sent)

    def test_fragment_dropped(self) -> None:
        """
        A URL with a fragment takes ``Agent``'s own path, which leaves the
        fragment out of the request line.
        """
        sent = self.same_request(SERVER + b"/api?x=1#frag")
        self.assertTrue(sent.startswith(b"GET /api?x=1 HTTP/1.1\r\n"))

    def test_other_server(self) -> None:
        """
        A URL on another server is sent there, with that server's Host.
        """
        sent = self.same_request(b"https://other.example.com:7443/healthz")
        self.assertIn(b"\r\nHost: other.example.com:7443\r\n", sent)

    def test_caller_host_kept(self) -> None:
        """
        A Host header the caller set is sent as it is, once.
        """
        sent = self.same_request(SERVER + b"/api", Headers({b"Host": [b"kubernetes.default.svc"]}))
        self.assertEqual(sent.count(b"Host:"), 1)
        self.assertIn(b"\r\nHost: kubernetes.default.svc\r\n", sent)

    def test_invalid_url_refused(self) -> None:
        """
        A URL with a space or a control character is refused, as ``Agent`` refuses
        it, and nothing is sent.
        """
        fast, endpoints, plain, _ = _agents()
        for url in (SERVER + b"/api v1", SERVER + b"/api\r\nX-Evil: 1", SERVER + b"/caf\xc3\xa9"):
            with self.assertRaises(ValueError):
                plain.request(b"GET", url)
            with self.assertRaises(ValueError):
                fast.request(b"GET", url)
        self.assertEqual([e.protocols for e in endpoints.endpoints.values()], [[]])

    def test_connection_shared_with_agent_path(self) -> None:
        """
        Requests on both paths to the server share the pool's connection: the
        second, sent after the first response, opens no new connection.
        """
        fast, endpoints, _, _ = _agents()
        responses: list[Any] = []
        fast.request(b"GET", SERVER + b"/api").addCallback(responses.append)
        [protocol] = endpoints.endpoints[self.KEY].protocols
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(responses), 1)
        protocol.transport.clear()
        fast.request(b"GET", SERVER + b"/apis#x")
        self.assertEqual(len(endpoints.endpoints[self.KEY].protocols), 1)
        self.assertTrue(protocol.transport.value().startswith(b"GET /apis HTTP/1.1\r\n"))


    def test_fast_path_taken(self) -> None:
        """
        On the supported Twisted versions a request to the server does not parse
        its URL (the point of the agent); if a Twisted release changes the private
        method it uses, this says so.
        """
        fast, endpoints, _, _ = _agents()
        self.patch(URI, "fromBytes", classmethod(lambda cls, *a, **k: self.fail("URL parsed")))
        fast.request(b"GET", SERVER + b"/api/v1/pods")
        self.assertTrue(_sent(endpoints, self.KEY).startswith(b"GET /api/v1/pods HTTP/1.1\r\n"))

    def test_without_private_method(self) -> None:
        """
        Where ``Agent._requestWithEndpoint`` is not as expected, every request
        takes ``Agent``'s own path and still goes out right.
        """
        self.patch(upstream, "_fast_path_available", lambda: False)
        reactor = MemoryReactorClock()
        endpoints = _MemoryEndpoints()
        agent = ApiserverAgent.for_server(reactor, endpoints, HTTPConnectionPool(reactor), SERVER)
        self.assertIsNone(agent._server)
        agent.request(b"GET", SERVER + b"/api?x=1")
        sent = _sent(endpoints, self.KEY)
        self.assertTrue(sent.startswith(b"GET /api?x=1 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: kube.example.com:6443\r\n", sent)


class EndpointTests(SynchronousTestCase):
    """
    `ApiserverEndpoints` makes each endpoint once; `_NoDelayEndpoint` switches
    Nagle's algorithm off.
    """

    def test_endpoints_kept(self) -> None:
        """
        The same scheme, host and port give the same endpoint; another port another.
        """
        endpoints = ApiserverEndpoints(MemoryReactorClock(), https_policy())
        first = endpoints.endpointForURI(URI.fromBytes(b"https://kube.example.com:6443/a"))
        again = endpoints.endpointForURI(URI.fromBytes(b"https://kube.example.com:6443/b?c"))
        other = endpoints.endpointForURI(URI.fromBytes(b"https://kube.example.com:7443/a"))
        self.assertIs(first, again)
        self.assertIsNot(first, other)

    def test_unknown_scheme(self) -> None:
        """
        A scheme other than http and https is refused.
        """
        endpoints = ApiserverEndpoints(MemoryReactorClock(), https_policy())
        with self.assertRaises(SchemeNotSupported):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://kube.example.com/"))

    def test_no_delay(self) -> None:
        """
        A connection made through the endpoint has ``TCP_NODELAY`` set.
        """

        class Transport(StringTransport):
            no_delay = False

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.no_delay = enabled

        protocol = Protocol()
        protocol.makeConnection(Transport())

        class Wrapped:
            def connect(self, factory: Any) -> Deferred[Any]:
                return succeed(protocol)

        connected = self.successResultOf(_NoDelayEndpoint(Wrapped()).connect(Factory()))
        self.assertIs(connected, protocol)
        self.assertTrue(protocol.transport.no_delay)


class AuditIdTests(SynchronousTestCase):
    """
    `new_audit_id` gives random version 4 UUIDs in their usual spelling.
    """

    def test_uuid4(self) -> None:
        """
        Each id is a canonical version 4, RFC 4122 UUID, and none repeats.
        """
        ids = [new_audit_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        for text in ids:
            value = uuid.UUID(text)
            self.assertEqual((value.version, value.variant), (4, uuid.RFC_4122))
            self.assertEqual(str(value), text)


class ResponseHeaderTests(SynchronousTestCase):
    """
    `policy.copy_downstream_response_headers` copies what
    `policy.downstream_response_headers` returns.
    """

    def test_same_as_downstream(self) -> None:
        """
        Hop-by-hop headers, those named in Connection and Content-Length are left
        out; the rest are copied with every value.
        """
        upstream = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Content-Length": [b"12"],
                b"Connection": [b"keep-alive, X-Hop"],
                b"X-Hop": [b"1"],
                b"Transfer-Encoding": [b"chunked"],
                b"Warning": [b"299 - a", b"299 - b"],
                b"Audit-Id": [b"abc"],
            }
        )
        into = Headers()
        policy.copy_downstream_response_headers(upstream, into)
        expected = sorted(policy.downstream_response_headers(upstream).getAllRawHeaders())
        self.assertEqual(sorted(into.getAllRawHeaders()), expected)
        self.assertEqual(
            sorted(name.lower() for name, _ in expected), [b"audit-id", b"content-type", b"warning"]
        )
        self.assertEqual(into.getRawHeaders(b"warning"), [b"299 - a", b"299 - b"])

    def test_keeps_own_headers(self) -> None:
        """
        A header the proxy set itself (the drain's ``Connection: close``) stays.
        """
        into = Headers({b"Connection": [b"close"]})
        policy.copy_downstream_response_headers(
            Headers({b"Connection": [b"keep-alive"], b"Content-Type": [b"text/plain"]}), into
        )
        self.assertEqual(into.getRawHeaders(b"connection"), [b"close"])
        self.assertEqual(into.getRawHeaders(b"content-type"), [b"text/plain"])


class MetricsTests(SynchronousTestCase):
    """
    `ProxyMetrics` counts through cached series exactly as through ``labels``.
    """

    def test_counts(self) -> None:
        """
        Requests and verifications show up under their labels; a method the proxy
        does not know counts as OTHER.
        """
        registry = Metrics()
        metrics = ProxyMetrics.create(registry)
        for _ in range(3):
            metrics.count_request(b"GET", 200)
        metrics.count_request(b"BREW", 200)
        metrics.count_request(b"GET", 404)
        metrics.count_verification("accepted")
        metrics.count_verification("rejected", "expired")
        text = registry.render().decode()
        self.assertIn('kproxy_requests_total{method="GET",code="200"} 3', text)
        self.assertIn('kproxy_requests_total{method="OTHER",code="200"} 1', text)
        self.assertIn('kproxy_requests_total{method="GET",code="404"} 1', text)
        self.assertIn('kproxy_token_verifications_total{outcome="accepted",reason=""} 1', text)
        self.assertIn('kproxy_token_verifications_total{outcome="rejected",reason="expired"} 1', text)

    def test_cache_bounded(self) -> None:
        """
        Clients choose methods: however many they send, the cache stays bounded
        and every request is still counted.
        """
        registry = Metrics()
        metrics = ProxyMetrics.create(registry)
        for i in range(2000):
            metrics.count_request(b"M%d" % i, 200)
        self.assertLessEqual(len(metrics._children), 256)
        self.assertIn('kproxy_requests_total{method="OTHER",code="200"} 2000', registry.render().decode())


class _Recorder(Protocol):
    """
    Remembers the last connection made (its transport is the TLS layer).
    """

    made: list[Any] = []

    def connectionMade(self) -> None:
        _Recorder.made.append(self.transport)


class ServerSocketTests(TestCase):
    """
    Connections accepted by `listen_tls` have ``TCP_NODELAY``, the larger buffer
    and a local address looked up once.
    """

    def test_accepted_socket(self) -> None:
        """
        On a real loopback connection the server's socket has ``TCP_NODELAY`` and
        `CLIENT_BUFFER_SIZE`, and ``getHost`` answers the same address twice.
        """
        from twisted.internet import reactor

        directory = self.mktemp()
        os.makedirs(directory)
        ca = CertificateAuthority.generate()
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(directory, "server")
        _Recorder.made = []
        port = listen_tls(reactor, Address("127.0.0.1", 0), Factory.forProtocol(_Recorder), ServerTLS.from_files(cert, key))
        self.addCleanup(port.stopListening)

        async def check() -> None:
            client = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
            )
            self.addCleanup(client.transport.abortConnection)
            for _ in range(100):
                if _Recorder.made:
                    break
                await _sleep(reactor, 0.05)
            [tls] = _Recorder.made
            tcp = tls.transport
            self.assertTrue(tcp.getTcpNoDelay())
            self.assertEqual(tcp.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            self.assertEqual(tcp.bufferSize, CLIENT_BUFFER_SIZE)
            first = tls.getHost()
            self.assertEqual((first.host, first.port), ("127.0.0.1", port.getHost().port))
            self.assertIs(tls.getHost(), first)

        return ensureDeferred(check())


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
