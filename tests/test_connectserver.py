"""
Tests for `banyan_kproxy.connectserver`: the server side of HTTP CONNECT, in memory
(``StringTransport`` and a ``Clock``).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from banyan_kproxy.connectserver import (
    MAX_EARLY_BYTES,
    ClientIdentity,
    ConnectMetrics,
    ConnectRefused,
    ConnectRequest,
    ConnectServerFactory,
    IConnectPolicy,
    TunnelRecord,
    client_identity,
    log_tunnel,
    parse_authority,
)
from banyan_kproxy.health import Metrics
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.tunnel import SpliceEnd

PEER = IPv4Address("TCP", "10.1.2.3", 40000)
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def refusal(code: int, phrase: str, reason: str, *extra: str) -> bytes:
    """
    The exact bytes of a refusal.
    """
    body = (reason + "\n").encode()
    lines = [
        f"HTTP/1.1 {code} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@implementer(IConnectPolicy)
class FakePolicy:
    """
    Records requests and hands back Deferreds the test fires.
    """

    def __init__(self) -> None:
        self.requests: list[ConnectRequest] = []
        self.pending: list[Deferred[SpliceEnd]] = []
        self.cancelled = 0

    def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
        self.requests.append(request)

        def cancel(d: Deferred[SpliceEnd]) -> None:
            self.cancelled += 1

        d: Deferred[SpliceEnd] = Deferred(cancel)
        self.pending.append(d)
        return d


def destination() -> tuple[SpliceEnd, StringTransportWithDisconnection]:
    """
    A connected destination end on a string transport.
    """
    end = SpliceEnd("destination")
    transport = StringTransportWithDisconnection()
    transport.protocol = end
    end.makeConnection(transport)
    return end, transport


class Harness:
    """
    A factory with a fake policy, a clock, metrics and the records it reported.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.policy = FakePolicy()
        self.clock = Clock()
        self.registry = Metrics()
        self.opened: list[TunnelRecord] = []
        self.closed: list[TunnelRecord] = []
        kwargs.setdefault("idle_timeout", 100.0)
        self.factory = ConnectServerFactory(
            kwargs.pop("policy", self.policy),
            self.clock,
            metrics=ConnectMetrics.create(self.registry, "test"),
            on_tunnel_opened=self.opened.append,
            on_tunnel_closed=self.closed.append,
            **kwargs,
        )

    def connect(self, peer: Any = PEER) -> tuple[Any, StringTransportWithDisconnection]:
        """
        A new client connection: its protocol and transport.
        """
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransportWithDisconnection(peerAddress=peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def request(self, head: bytes, peer: Any = PEER) -> tuple[Any, StringTransportWithDisconnection]:
        """
        Connect and send ``head``.
        """
        protocol, transport = self.connect(peer)
        protocol.dataReceived(head)
        return protocol, transport

    def tunnel(self, head: bytes = b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", peer: Any = PEER) -> Any:
        """
        A request whose destination connects: client protocol and transport, destination end and transport.
        """
        protocol, transport = self.request(head, peer)
        end, dest = destination()
        self.policy.pending[-1].callback(end)
        return protocol, transport, end, dest

    def metric(self, line: str) -> str | None:
        """
        The value of one sample of the registry (None when absent).
        """
        for text in self.registry.render().decode().splitlines():
            name, _, value = text.rpartition(" ")
            if name == line:
                return value
        return None


class HeadTests(SynchronousTestCase):
    """
    Reading and checking the request head.
    """

    def test_connect(self) -> None:
        """
        A well-formed CONNECT reaches the policy with its destination, headers and peer,
        and nothing is answered until the policy answers.
        """
        h = Harness()
        _, transport = h.request(
            b"CONNECT Example.COM:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: curl/8\r\n\r\n"
        )
        [request] = h.policy.requests
        self.assertEqual((request.host, request.port, request.target), ("example.com", 443, "example.com:443"))
        self.assertEqual(request.headers.getRawHeaders(b"user-agent"), [b"curl/8"])
        self.assertEqual(request.peer, PEER)
        self.assertIsNone(request.client)
        self.assertEqual(transport.value(), b"")

    def test_http10_and_bare_lf(self) -> None:
        """
        HTTP/1.0 and lines ended with a bare LF are accepted; leading empty lines are skipped.
        """
        h = Harness()
        h.request(b"\r\nCONNECT example.com:443 HTTP/1.0\nHost: x\n\n")
        self.assertEqual(h.policy.requests[0].port, 443)

    def test_split_reads(self) -> None:
        """
        A head delivered one byte at a time is read the same way.
        """
        h = Harness()
        protocol, transport = h.connect()
        for byte in b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n":
            self.assertEqual(h.policy.requests, [])
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(h.policy.requests[0].headers.getRawHeaders(b"host"), [b"example.com"])

    def test_ipv6(self) -> None:
        """
        ``[v6]:port`` gives the address without brackets; the target keeps them.
        """
        h = Harness()
        h.request(b"CONNECT [2001:DB8::1]:8443 HTTP/1.1\r\n\r\n")
        request = h.policy.requests[0]
        self.assertEqual((request.host, request.port, request.target), ("2001:db8::1", 8443, "[2001:db8::1]:8443"))

    def assertRefused(self, head: bytes, expected: bytes, **kwargs: Any) -> Harness:
        """
        ``head`` is answered with exactly ``expected``, the connection is closed and
        the policy is never asked.
        """
        h = Harness(**kwargs)
        _, transport = h.request(head)
        self.assertEqual(transport.value(), expected)
        self.assertFalse(transport.connected)
        self.assertEqual(h.policy.requests, [])
        return h

    def test_lowercase_method(self) -> None:
        """
        Methods are case-sensitive: ``connect`` gets 405 with ``Allow: CONNECT``.
        """
        self.assertRefused(
            b"connect example.com:443 HTTP/1.1\r\n\r\n",
            refusal(405, "Method Not Allowed", "only CONNECT is supported here", "Allow: CONNECT"),
        )

    def test_other_method(self) -> None:
        """
        A GET (a client that thinks this is a web server or a forward proxy) gets 405.
        """
        h = self.assertRefused(
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            refusal(405, "Method Not Allowed", "only CONNECT is supported here", "Allow: CONNECT"),
            identify=lambda transport: ClientIdentity("alice", ()),
        )
        [record] = h.closed
        self.assertEqual((record.code, record.outcome, record.target), (405, "bad_request", None))
        self.assertEqual(record.client, ClientIdentity("alice", ()))

    def test_absolute_form(self) -> None:
        """
        CONNECT with an absolute URI instead of host:port gets 400.
        """
        self.assertRefused(
            b"CONNECT https://example.com:443/ HTTP/1.1\r\n\r\n",
            refusal(400, "Bad Request", "CONNECT needs host:port: the target must be host:port, not 'https://example.com:443/'"),
        )

    def test_missing_port(self) -> None:
        """
        A target without a port gets 400 saying so.
        """
        self.assertRefused(
            b"CONNECT example.com HTTP/1.1\r\n\r\n",
            refusal(400, "Bad Request", "CONNECT needs host:port: 'example.com' has no port"),
        )

    def test_unbracketed_ipv6(self) -> None:
        """
        An IPv6 address without brackets is ambiguous and gets 400.
        """
        self.assertRefused(
            b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
            refusal(400, "Bad Request", "CONNECT needs host:port: '::1:443': an IPv6 address must be in brackets"),
        )

    def test_bad_ports_and_hosts(self) -> None:
        """
        Port 0, ports over 65535, non-numeric ports and junk host names are refused.
        """
        for target in ("example.com:0", "example.com:65536", "example.com:https", "exa mple.com:443",
                       "-bad-.com:443", "user@example.com:443", "[not-v6]:443", "[::1]443", ":443"):
            self.assertRaises(ValueError, parse_authority, target)
        self.assertEqual(parse_authority("Example.com.:1"), ("example.com", 1))
        self.assertEqual(parse_authority("10.0.0.5:65535"), ("10.0.0.5", 65535))

    def test_malformed_request_line(self) -> None:
        """
        A request line without three parts or without an HTTP version gets 400.
        """
        for line in (b"CONNECT example.com:443", b"CONNECT  example.com:443 HTTP/1.1", b"CONNECT example.com:443 FTP/1.1"):
            self.assertRefused(line + b"\r\n\r\n", refusal(400, "Bad Request", "malformed request line"))

    def test_http2_version(self) -> None:
        """
        A version other than HTTP/1.x gets 505.
        """
        self.assertRefused(
            b"CONNECT example.com:443 HTTP/2.0\r\n\r\n",
            refusal(505, "HTTP Version Not Supported", "only HTTP/1.0 and HTTP/1.1 are supported"),
        )

    def test_bad_headers(self) -> None:
        """
        A folded header line or one without a colon gets 400.
        """
        self.assertRefused(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\n  folded\r\n\r\n",
            refusal(400, "Bad Request", "folded header lines are not allowed"),
        )
        self.assertRefused(
            b"CONNECT example.com:443 HTTP/1.1\r\nno colon here\r\n\r\n",
            refusal(400, "Bad Request", "malformed header line"),
        )
        self.assertRefused(
            b"CONNECT example.com:443 HTTP/1.1\r\nBad Name: x\r\n\r\n",
            refusal(400, "Bad Request", "malformed header line"),
        )

    def test_oversized_head(self) -> None:
        """
        A head over 16 KiB gets 431 as soon as that is known, without waiting for its end.
        """
        h = Harness()
        protocol, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n")
        for _ in range(20):
            protocol.dataReceived(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        self.assertEqual(
            transport.value(),
            refusal(431, "Request Header Fields Too Large", "the request head is too large"),
        )
        self.assertFalse(transport.connected)

    def test_one_endless_line(self) -> None:
        """
        A line that never ends gets 431 once it passes 16 KiB.
        """
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b"CONNECT " + b"a" * 16000)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"a" * 1000)
        self.assertEqual(
            transport.value(),
            refusal(431, "Request Header Fields Too Large", "the request head is too large"),
        )

    def test_header_line_limit(self) -> None:
        """
        100 header lines are accepted; 101 get 431.
        """
        h = Harness()
        head = b"CONNECT example.com:443 HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n"
        h.request(head)
        self.assertEqual(len(h.policy.requests), 1)
        head = b"CONNECT example.com:443 HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n"
        self.assertRefused(
            head, refusal(431, "Request Header Fields Too Large", "the request has too many header lines")
        )


class AnswerTests(SynchronousTestCase):
    """
    The answer to a CONNECT: 200 and a splice, or a refusal.
    """

    def test_200_only_once_connected(self) -> None:
        """
        200 is sent once the policy's destination connection is up, not before.
        """
        h = Harness()
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        h.clock.advance(5)
        self.assertEqual(transport.value(), b"")
        end, _ = destination()
        h.policy.pending[0].callback(end)
        self.assertEqual(transport.value(), OK)
        self.assertTrue(transport.connected)
        [record] = h.opened
        self.assertEqual((record.outcome, record.code, record.target), ("open", 200, "example.com:443"))
        self.assertEqual(h.metric("test_open_tunnels"), "1")

    def test_pipelined_bytes(self) -> None:
        """
        Bytes sent right after the head (a TLS ClientHello) are held until the tunnel
        exists and then reach the destination, after the 200.
        """
        h = Harness()
        protocol, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n\x16\x03\x01hello")
        protocol.dataReceived(b" more")
        end, dest = destination()
        h.policy.pending[0].callback(end)
        self.assertEqual(dest.value(), b"\x16\x03\x01hello more")
        self.assertEqual(transport.value(), OK)

    def test_splice(self) -> None:
        """
        After the 200 bytes flow both ways with each transport the producer of the
        other; the destination closing closes the client; the record has the bytes,
        the duration and the outcome.
        """
        h = Harness()
        protocol, transport, end, dest = h.tunnel(
            b"CONNECT example.com:443 HTTP/1.1\r\nUser-Agent: kubectl/v1.33\r\n\r\n"
        )
        self.assertIs(transport.producer, dest)
        self.assertIs(dest.producer, transport)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"up-bytes")
        end.dataReceived(b"down")
        self.assertEqual(dest.value(), b"up-bytes")
        self.assertEqual(transport.value(), OK + b"down")
        h.clock.advance(7)
        dest.loseConnection()
        self.assertFalse(transport.connected)
        [record] = h.closed
        self.assertEqual(
            (record.outcome, record.code, record.bytes_up, record.bytes_down, record.duration, record.user_agent),
            ("closed", 200, 8, 4, 7.0, "kubectl/v1.33"),
        )
        self.assertEqual(record.tunnel_id, h.opened[0].tunnel_id)
        self.assertEqual(h.metric('test_tunnels_total{outcome="closed"}'), "1")
        self.assertEqual(h.metric('test_tunnel_bytes_total{direction="up"}'), "8")
        self.assertEqual(h.metric('test_tunnel_bytes_total{direction="down"}'), "4")
        self.assertEqual(h.metric("test_open_tunnels"), "0")
        self.assertEqual(h.metric("test_tunnel_duration_seconds_count"), "1")

    def test_client_closes(self) -> None:
        """
        The client closing closes the destination and ends the tunnel.
        """
        h = Harness()
        protocol, transport, end, dest = h.tunnel()
        transport.loseConnection()
        self.assertFalse(dest.connected)
        self.assertEqual(h.closed[0].outcome, "closed")

    def test_server_speaks_first(self) -> None:
        """
        Bytes the destination sent before the splice reach the client after the 200.
        """
        h = Harness()
        _, transport = h.request(b"CONNECT example.com:22 HTTP/1.1\r\n\r\n")
        end, dest = destination()
        end.dataReceived(b"SSH-2.0-x\r\n")
        h.policy.pending[0].callback(end)
        self.assertEqual(transport.value(), OK + b"SSH-2.0-x\r\n")

    def test_early_bytes_bounded(self) -> None:
        """
        A client that sends more than the early-byte bound before the tunnel exists is
        paused, and resumed once the tunnel is made.
        """
        h = Harness()
        protocol, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        protocol.dataReceived(b"x" * (MAX_EARLY_BYTES + 1))
        self.assertEqual(transport.producerState, "paused")
        end, dest = destination()
        h.policy.pending[0].callback(end)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(dest.value()), MAX_EARLY_BYTES + 1)

    def test_refused_by_policy(self) -> None:
        """
        A `ConnectRefused` becomes its status, a one-line reason and a closed connection.
        """
        h = Harness()
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        h.policy.pending[0].errback(ConnectRefused(403, "example.com:443 is not\na registered service"))
        self.assertEqual(
            transport.value(), refusal(403, "Forbidden", "example.com:443 is not a registered service")
        )
        self.assertFalse(transport.connected)
        [record] = h.closed
        self.assertEqual((record.code, record.outcome, record.target), (403, "forbidden", "example.com:443"))
        self.assertEqual(h.opened, [])
        self.assertEqual(h.metric('test_tunnels_total{outcome="forbidden"}'), "1")

    def test_refusal_headers(self) -> None:
        """
        A refusal's extra headers (``Proxy-Authenticate`` on a 407) are sent.
        """
        h = Harness()
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        h.policy.pending[0].errback(ConnectRefused(407, "log in", [("Proxy-Authenticate", 'Basic realm="x"')]))
        self.assertEqual(
            transport.value(),
            refusal(407, "Proxy Authentication Required", "log in", 'Proxy-Authenticate: Basic realm="x"'),
        )

    def test_connection_errors(self) -> None:
        """
        A refused connection or a DNS failure give 502, a connect timeout 504.
        """
        cases = [
            (error.ConnectionRefusedError(), 502, "Bad Gateway", "the destination refused the connection"),
            (error.DNSLookupError(), 502, "Bad Gateway", "the destination's name does not resolve"),
            (error.TimeoutError(), 504, "Gateway Timeout", "the destination did not answer in time"),
            (error.NoRouteError(), 502, "Bad Gateway", "cannot connect to the destination: No route to host."),
        ]
        for exception, code, phrase, reason in cases:
            h = Harness()
            _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            h.policy.pending[0].errback(exception)
            self.assertEqual(transport.value(), refusal(code, phrase, reason))

    def test_unexpected_error(self) -> None:
        """
        A policy that fails unexpectedly gives 502 and its failure is logged.
        """
        h = Harness()
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        h.policy.pending[0].errback(ZeroDivisionError())
        self.assertEqual(transport.value(), refusal(502, "Bad Gateway", "cannot connect to the destination"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_synchronous_policy(self) -> None:
        """
        A policy that answers at once (already fired Deferreds) works too.
        """
        end, dest = destination()

        @implementer(IConnectPolicy)
        class Now:
            def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
                return succeed(end)

        h = Harness(policy=Now())
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\nearly")
        self.assertEqual(transport.value(), OK)
        self.assertEqual(dest.value(), b"early")

        @implementer(IConnectPolicy)
        class No:
            def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
                return fail(ConnectRefused(403, "no"))

        h = Harness(policy=No())
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\nearly")
        self.assertEqual(transport.value(), refusal(403, "Forbidden", "no"))


class TimeoutTests(SynchronousTestCase):
    """
    Head, open and idle timeouts.
    """

    def test_head_timeout(self) -> None:
        """
        A client that sent a request line but no end of head gets 408 after head_timeout.
        """
        h = Harness(head_timeout=10)
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x")
        h.clock.advance(9.9)
        self.assertTrue(transport.connected)
        h.clock.advance(0.1)
        self.assertEqual(transport.value(), refusal(408, "Request Timeout", "the request head did not arrive in time"))
        self.assertFalse(transport.connected)

    def test_silent_client(self) -> None:
        """
        A client that sends nothing is closed after head_timeout without an answer or a record.
        """
        h = Harness(head_timeout=10)
        _, transport = h.connect()
        h.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.connected)
        self.assertEqual(h.closed, [])

    def test_head_timer_stops(self) -> None:
        """
        Once the head is complete the head timeout no longer applies.
        """
        h = Harness(head_timeout=10)
        protocol, transport, end, dest = h.tunnel()
        h.clock.advance(50)
        self.assertTrue(transport.connected)
        self.assertEqual(h.clock.getDelayedCalls().__len__(), 1)  # only the idle watch

    def test_open_timeout(self) -> None:
        """
        A policy that takes longer than open_timeout is cancelled and the client gets 504.
        """
        h = Harness(open_timeout=3)
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        h.clock.advance(3)
        self.assertEqual(h.policy.cancelled, 1)
        self.assertEqual(transport.value(), refusal(504, "Gateway Timeout", "the destination did not answer in time"))
        self.assertEqual(h.closed[0].outcome, "timeout")

    def test_idle_timeout(self) -> None:
        """
        A tunnel in which nothing moves for idle_timeout is closed, at most a quarter
        of the timeout late; traffic either way keeps it open.
        """
        h = Harness(idle_timeout=100)
        protocol, transport, end, dest = h.tunnel()
        for _ in range(10):
            h.clock.advance(60)
            protocol.dataReceived(b"ping")
            h.clock.advance(60)
            end.dataReceived(b"pong")
        self.assertTrue(transport.connected)
        self.assertEqual(h.metric('test_tunnel_bytes_total{direction="up"}'), "40")
        h.clock.pump([1] * 99)
        self.assertTrue(transport.connected)
        h.clock.pump([1] * 26)
        self.assertFalse(transport.connected)
        self.assertFalse(dest.connected)
        [record] = h.closed
        self.assertEqual((record.outcome, record.bytes_up, record.bytes_down), ("idle_timeout", 40, 40))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_idle_exact(self) -> None:
        """
        A tunnel silent from the start closes exactly idle_timeout after it was made.
        """
        h = Harness(idle_timeout=0.3)
        protocol, transport, end, dest = h.tunnel()
        h.clock.pump([0.075] * 3)
        self.assertTrue(transport.connected)
        h.clock.advance(0.075)
        self.assertFalse(transport.connected)


class CancelTests(SynchronousTestCase):
    """
    A client that leaves while the policy works.
    """

    def test_client_gone(self) -> None:
        """
        The policy's Deferred is cancelled, nothing is written, and the record says
        cancelled; a slot taken for it is released.
        """
        h = Harness(max_connections=1)
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        transport.loseConnection()
        self.assertEqual(h.policy.cancelled, 1)
        self.assertEqual(transport.value(), b"")
        [record] = h.closed
        self.assertEqual((record.outcome, record.code), ("cancelled", 0))
        self.assertEqual(h.factory.limits.total, 0)

    def test_late_destination(self) -> None:
        """
        A destination that connects after the client left (a policy that ignores
        cancellation) is closed at once.
        """
        end, dest = destination()
        late: list[Deferred[SpliceEnd]] = []

        @implementer(IConnectPolicy)
        class Stubborn:
            def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
                d: Deferred[SpliceEnd] = Deferred()
                late.append(d)
                return d.addErrback(lambda f: succeed(end))

        h = Harness(policy=Stubborn())
        _, transport = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        transport.loseConnection()
        self.assertFalse(dest.connected)
        self.assertEqual(h.opened, [])


class LimitTests(SynchronousTestCase):
    """
    Per-client and global limits on open requests.
    """

    def test_per_client(self) -> None:
        """
        Over max_connections_per_client a client gets 429; another client does not;
        a closed tunnel frees its slot.
        """
        h = Harness(max_connections_per_client=1)
        _, first, end, dest = h.tunnel()
        _, second = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        self.assertEqual(
            second.value(),
            refusal(429, "Too Many Requests", "too many tunnels open for 10.1.2.3 (limit 1)"),
        )
        other = IPv4Address("TCP", "10.9.9.9", 1)
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", peer=other)
        self.assertEqual(len(h.policy.requests), 2)
        dest.loseConnection()
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        self.assertEqual(len(h.policy.requests), 3)
        self.assertEqual(h.metric('test_tunnels_total{outcome="limited"}'), "1")

    def test_global(self) -> None:
        """
        Over max_connections every client gets 503, until a slot is released by a refusal.
        """
        h = Harness(max_connections=1)
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        other = IPv4Address("TCP", "10.9.9.9", 1)
        _, second = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", peer=other)
        self.assertEqual(second.value(), refusal(503, "Service Unavailable", "too many tunnels open (limit 1)"))
        h.policy.pending[0].errback(ConnectRefused(403, "no"))
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", peer=other)
        self.assertEqual(len(h.policy.requests), 2)

    def test_key_is_certificate_name(self) -> None:
        """
        With a client certificate the per-client limit counts by its name, not the address.
        """
        h = Harness(max_connections_per_client=1, identify=lambda t: ClientIdentity("alice", ()))
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        _, second = h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", peer=IPv4Address("TCP", "10.9.9.9", 1))
        self.assertEqual(
            second.value(), refusal(429, "Too Many Requests", "too many tunnels open for alice (limit 1)")
        )
        self.assertEqual(h.policy.requests[0].client, ClientIdentity("alice", ()))


class IdentityTests(SynchronousTestCase):
    """
    Client identities from certificates, and handshake failures.
    """

    def test_from_certificate(self) -> None:
        """
        The CN, DNS and email SANs are read (IP SANs are not names); the fingerprint is SHA-256.
        """
        ca = CertificateAuthority.generate()
        issued = ca.issue(
            "laptop-17",
            dns_names=["laptop-17.devices.example.com"],
            ip_addresses=["10.0.0.1"],
            email_addresses=["me@example.com"],
            client=True,
        )
        identity = ClientIdentity.from_certificate(issued.certificate)
        self.assertEqual(identity.common_name, "laptop-17")
        self.assertEqual(identity.sans, ("laptop-17.devices.example.com", "me@example.com"))
        self.assertEqual(identity.name, "laptop-17")
        self.assertEqual(len(identity.fingerprint or ""), 64)

    def test_no_certificate(self) -> None:
        """
        A plain transport has no client identity.
        """
        self.assertIsNone(client_identity(StringTransport()))

    def test_handshake_failure_logged(self) -> None:
        """
        A TLS failure before any request is one info line with the peer's address and
        the reason; a plain close is not logged.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness()
        protocol, _ = h.connect()
        protocol.connectionLost(
            Failure(SSL.Error([("SSL routines", "", "peer did not return a certificate")]))
        )
        protocol, _ = h.connect()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "banyan_kproxy.connectserver"]
        self.assertEqual(lines, ["TLS handshake from 10.1.2.3:40000 failed: peer did not return a certificate"])
        self.assertEqual([e["log_level"] for e in events if "handshake" in formatEvent(e)], [LogLevel.info])
        self.assertEqual(h.metric("test_tls_handshake_failures_total"), "1")
        self.assertEqual(h.closed, [])


class LogTests(SynchronousTestCase):
    """
    The one log line per tunnel.
    """

    def lines(self, record: TunnelRecord) -> list[tuple[str, Any]]:
        """
        What `log_tunnel` logs for ``record``: formatted lines and their levels.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log_tunnel(record)
        globalLogPublisher.removeObserver(events.append)
        return [(formatEvent(e), e["log_level"]) for e in events]

    def test_lines(self) -> None:
        """
        Tunnels, refusals and backend failures each give one line naming the client,
        its address and the destination.
        """
        alice = ClientIdentity("alice", ())
        base: dict[str, Any] = {
            "tunnel_id": "t", "peer": PEER, "client": alice, "host": "mykube.corp.example.com", "port": 8443,
        }
        self.assertEqual(
            self.lines(TunnelRecord(**base, code=200, outcome="closed", bytes_up=10, bytes_down=20,
                                    started=1.0, established=1.5, ended=3.0)),
            [("CONNECT mykube.corp.example.com:8443 from alice (10.1.2.3:40000): tunnel closed after "
              "2.000s, 10 bytes up, 20 bytes down", LogLevel.info)],
        )
        self.assertEqual(
            self.lines(TunnelRecord(**base, code=403, outcome="forbidden", reason="no")),
            [("CONNECT mykube.corp.example.com:8443 from alice (10.1.2.3:40000) refused with 403: no",
              LogLevel.info)],
        )
        self.assertEqual(
            self.lines(TunnelRecord(**dict(base, client=None), code=502, outcome="unreachable", reason="down")),
            [("CONNECT mykube.corp.example.com:8443 from 10.1.2.3:40000 refused with 502: down", LogLevel.warn)],
        )


class DrainTests(SynchronousTestCase):
    """
    `ConnectServerFactory.drain`: the gateway's graceful stop.
    """

    def test_nothing_open(self) -> None:
        """
        With no connection open the drain is over at once.
        """
        h = Harness()
        self.successResultOf(h.factory.drain(20))

    def test_tunnel_ends_by_itself(self) -> None:
        """
        An open tunnel may go on; when it ends its closing record is made, and only
        then the drain is over (the audit pipeline stops after it).
        """
        h = Harness()
        protocol, transport, end, dest = h.tunnel()
        drained = h.factory.drain(20)
        h.clock.advance(19)
        self.assertNoResult(drained)
        self.assertTrue(transport.connected)
        transport.loseConnection()
        dest.loseConnection()
        self.successResultOf(drained)
        self.assertEqual([r.outcome for r in h.closed], ["closed"])
        self.assertEqual(h.factory.connections, set())

    def test_deadline_cuts(self) -> None:
        """
        At the deadline what is still open is closed (a tunnel, both its ends, and a
        connection that never sent its request); the drain is over once they are
        gone and the tunnel is recorded.
        """
        h = Harness(head_timeout=100)
        protocol, transport, end, dest = h.tunnel()
        _, silent = h.connect()
        drained = h.factory.drain(20)
        h.clock.advance(19.9)
        self.assertNoResult(drained)
        h.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertFalse(dest.connected)
        self.assertFalse(silent.connected)
        self.successResultOf(drained)
        self.assertEqual([r.outcome for r in h.closed], ["closed"])

    def test_gives_up(self) -> None:
        """
        A connection that does not go within `DRAIN_CUT_GRACE` of the cut does not
        hold the stop up.
        """
        from banyan_kproxy.connectserver import DRAIN_CUT_GRACE

        h = Harness()
        h.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        end = SpliceEnd("destination")
        end.makeConnection(StringTransport())  # never reports its close
        h.policy.pending[-1].callback(end)
        drained = h.factory.drain(20)
        h.clock.advance(20)
        self.assertNoResult(drained)
        h.clock.advance(DRAIN_CUT_GRACE)
        self.successResultOf(drained)
