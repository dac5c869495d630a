"""
Tests for protocol upgrades through the proxy (exec, attach, port-forward) and for
the byte splice they use.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from banyan_kproxy.config import Address, ImpersonationConfig, UpstreamConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import Identity, TokenRejected, VerifiedToken
from banyan_kproxy.proxy.headers import websocket_bearer_token
from banyan_kproxy.proxy.resource import KubeProxyResource, ProxyMetrics
from banyan_kproxy.proxy.upgrade import is_upgrade, parse_response_head, request_head
from banyan_kproxy.proxy.upstream import Upstream
from banyan_kproxy.testing.certs import CertificateAuthority
from banyan_kproxy.tls import ServerTLS, https_policy, listen_tls
from banyan_kproxy.tunnel import Splice, SpliceEnd

GOOD = "good-token"
USER = Identity("banyan:me@example.com", ("banyan:devs",))


class FakeVerifier:
    """
    Accepts one token.
    """

    def verify(self, token: str) -> Deferred[VerifiedToken]:
        if token == GOOD:
            return succeed(VerifiedToken(USER, 2e9, "https://issuer", "me", None))
        from twisted.internet.defer import fail

        return fail(TokenRejected("signature", "bad signature"))


class SpliceTests(SynchronousTestCase):
    """
    Tests for L{Splice}.
    """

    def ends(self) -> tuple[SpliceEnd, SpliceEnd, StringTransport, StringTransport]:
        left, right = SpliceEnd("left"), SpliceEnd("right")
        lt, rt = StringTransport(), StringTransport()
        left.makeConnection(lt)
        right.makeConnection(rt)
        return left, right, lt, rt

    def test_bytes_both_ways(self) -> None:
        """
        What one end receives the other sends, byte for byte, including bytes that
        arrived before the splice was made.
        """
        left, right, lt, rt = self.ends()
        self.assertEqual(lt.producerState, "paused")
        left.dataReceived(b"early")
        Splice(left, right)
        self.assertEqual(lt.producerState, "producing")
        left.dataReceived(b"\x00\xffmore")
        right.dataReceived(b"reply")
        self.assertEqual(rt.value(), b"early\x00\xffmore")
        self.assertEqual(lt.value(), b"reply")
        self.assertEqual((left.received, right.received), (11, 5))

    def test_stalled_reader_pauses_other_side(self) -> None:
        """
        When one side cannot send (its transport pauses its producer), the other
        side stops reading until it can.
        """
        left, right, lt, rt = self.ends()
        Splice(left, right)
        self.assertIs(rt.producer, lt)
        self.assertIs(lt.producer, rt)
        # The right connection's send buffer is full: it pauses its producer.
        rt.producer.pauseProducing()
        self.assertEqual(lt.producerState, "paused")
        self.assertEqual(rt.producerState, "producing")
        rt.producer.resumeProducing()
        self.assertEqual(lt.producerState, "producing")

    def test_close_closes_other(self) -> None:
        """
        Either side closing closes the other, and ``done`` fires once both are gone.
        """
        left, right, lt, rt = self.ends()
        splice = Splice(left, right)
        done = []
        splice.done.addCallback(done.append)
        left.connectionLost(None)
        self.assertTrue(rt.disconnecting)
        self.assertEqual(done, [])
        right.connectionLost(None)
        self.assertEqual(done, [splice])


class HeaderTests(SynchronousTestCase):
    """
    Upgrade header helpers.
    """

    def test_is_upgrade(self) -> None:
        """
        An upgrade needs both ``Connection: Upgrade`` (any case, in a list) and ``Upgrade``.
        """
        self.assertTrue(is_upgrade(Headers({b"Connection": [b"keep-alive, Upgrade"],
                                            b"Upgrade": [b"SPDY/3.1"]})))
        self.assertFalse(is_upgrade(Headers({b"Upgrade": [b"websocket"]})))
        self.assertFalse(is_upgrade(Headers({b"Connection": [b"upgrade"]})))

    def test_websocket_token(self) -> None:
        """
        The bearer token sub-protocol is decoded and separated from the others.
        """
        entry = b"base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(b"tok.en").rstrip(b"=")
        token, problem, rest = websocket_bearer_token(
            Headers({b"Sec-WebSocket-Protocol": [b"v5.channel.k8s.io, " + entry, b"v4.channel.k8s.io"]})
        )
        self.assertEqual((token, problem, rest), ("tok.en", None, [b"v5.channel.k8s.io", b"v4.channel.k8s.io"]))

    def test_two_websocket_tokens(self) -> None:
        """
        Two bearer token sub-protocols are refused.
        """
        entry = b"base64url.bearer.authorization.k8s.io.dG9r"
        token, problem, _ = websocket_bearer_token(Headers({b"Sec-WebSocket-Protocol": [entry + b"," + entry]}))
        self.assertIsNone(token)
        self.assertEqual(problem, "more than one bearer token sub-protocol")

    def test_request_head(self) -> None:
        """
        The raw request head carries every header line and a Content-Length for POST.
        """
        head = request_head(b"POST", b"/api/v1/namespaces/d/pods/p/exec?command=ls", b"k:6443",
                            Headers({b"X-Stream-Protocol-Version": [b"v4.channel.k8s.io", b"v3.channel.k8s.io"]}), 0)
        self.assertEqual(
            head,
            b"POST /api/v1/namespaces/d/pods/p/exec?command=ls HTTP/1.1\r\nHost: k:6443\r\n"
            b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\nX-Stream-Protocol-Version: v3.channel.k8s.io\r\n"
            b"Content-Length: 0\r\n\r\n",
        )

    def test_parse_response_head(self) -> None:
        """
        A 101 head is parsed with its headers as sent.
        """
        code, phrase, headers = parse_response_head(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io"
        )
        self.assertEqual((code, phrase), (101, b"Switching Protocols"))
        self.assertEqual(headers.getRawHeaders(b"x-stream-protocol-version"), [b"v4.channel.k8s.io"])


class FakeAPIServer(Protocol):
    """
    An apiserver that answers upgrade requests: 101 then echo, or a refusal.
    """

    def __init__(self, owner: UpgradeServer) -> None:
        self.owner = owner
        self.buffer = b""
        self.upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data.upper() if self.owner.shout else data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.owner.heads.append(head)
        if self.owner.answer == "101":
            self.upgraded = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\nhello from upstream"
            )
            if rest:
                self.dataReceived(rest)
        elif self.owner.answer == "403":
            body = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden",
                               "message": 'pods "p" is forbidden'}).encode()
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
        else:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nUpgra\r\n11\r\nde request needed\r\n0\r\n\r\n")


class UpgradeServer(Factory):
    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.answer = "101"
        self.shout = True

    def buildProtocol(self, addr: Any) -> FakeAPIServer:
        return FakeAPIServer(self)


class RawClient(Protocol):
    """
    A client that writes raw bytes and collects what comes back.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class UpgradeThroughProxyTests(TestCase):
    """
    Upgrades through a real proxy listener to an apiserver on loopback, over TLS.
    """

    timeout = 30

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.generate()
        self.ca_cert = Certificate.loadPEM(ca.cert_pem)
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(directory, "server")
        ca_file = ca.write_cert(directory)
        tls = ServerTLS.from_files(cert, key)
        self.api = UpgradeServer()
        api_port = listen_tls(reactor, Address("127.0.0.1", 0), self.api, tls)
        self.addCleanup(api_port.stopListening)
        token_path = os.path.join(directory, "token")
        with open(token_path, "w") as f:
            f.write("proxy-token\n")
        upstream = Upstream.from_config(
            UpstreamConfig(f"https://127.0.0.1:{api_port.getHost().port}", ca_file=ca_file,
                           token_file=token_path),
            reactor,
            https_policy(ca_file),
        )
        self.addCleanup(upstream.close)
        self.metrics = Metrics()
        resource = KubeProxyResource(
            verifier=FakeVerifier(), upstream=upstream, impersonation=ImpersonationConfig(),
            metrics=ProxyMetrics.create(self.metrics), clock=reactor,
        )
        from twisted.web.server import Site

        proxy_port = listen_tls(reactor, Address("127.0.0.1", 0), Site(resource), tls)
        self.addCleanup(proxy_port.stopListening)
        self.proxy_port = proxy_port.getHost().port

    async def connect(self) -> RawClient:
        client = RawClient()
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=self.ca_cert),
            HostnameEndpoint(reactor, "127.0.0.1", self.proxy_port),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection() if not client.lost.called else None)
        return client

    async def wait_for(self, condition: Any, what: str) -> None:
        deadline = reactor.seconds() + 10
        while not condition():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    def head(self, token: str = GOOD, extra: bytes = b"") -> bytes:
        return (b"POST /api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true HTTP/1.1\r\n"
                b"Host: proxy\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
                b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                b"X-Stream-Protocol-Version: channel.k8s.io\r\nContent-Length: 0\r\n" + extra + b"\r\n")

    def test_spliced(self) -> Deferred[None]:
        """
        A 101 comes back unchanged, the upstream request carries the proxy's
        credential, impersonation and every X-Stream-Protocol-Version line, bytes the
        client sent right after its head are not lost, and bytes flow both ways until
        the client closes, which closes the upstream side too.
        """

        async def run() -> None:
            client = await self.connect()
            client.transport.write(self.head() + b"sent early")
            await self.wait_for(lambda: b"SENT EARLY" in client.data, "the early bytes to come back")
            self.assertTrue(client.data.startswith(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\nhello from upstream"))
            [head] = self.api.heads
            lines = head.split(b"\r\n")
            self.assertEqual(lines[0], b"POST /api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true HTTP/1.1")
            self.assertIn(b"Authorization: Bearer proxy-token", lines)
            self.assertIn(b"Impersonate-User: banyan:me@example.com", lines)
            self.assertIn(b"Impersonate-Group: banyan:devs", lines)
            self.assertIn(b"Impersonate-Group: system:authenticated", lines)
            self.assertIn(b"Connection: Upgrade", lines)
            self.assertIn(b"Upgrade: SPDY/3.1", lines)
            self.assertIn(b"X-Stream-Protocol-Version: v4.channel.k8s.io", lines)
            self.assertIn(b"X-Stream-Protocol-Version: channel.k8s.io", lines)
            self.assertNotIn(b"Authorization: Bearer good-token", lines)
            payload = os.urandom(256 * 1024)
            client.transport.write(payload)
            await self.wait_for(lambda: client.data.endswith(payload.upper()), "the payload to come back")
            client.transport.loseConnection()
            await client.lost
            await self.wait_for(
                lambda: b"kproxy_open_tunnels 0" in self.metrics.render(), "the tunnel to close"
            )
            metrics = self.metrics.render().decode()
            self.assertIn('kproxy_tunnels_total{outcome="upgraded"} 1', metrics)
            self.assertIn(f'kproxy_tunnel_bytes_total{{direction="client_to_upstream"}} {len(payload) + 10}',
                          metrics)

        return ensureDeferred(run())

    def test_refused(self) -> Deferred[None]:
        """
        A non-101 answer comes back as an ordinary response with its body.
        """

        async def run() -> None:
            self.api.answer = "403"
            client = await self.connect()
            client.transport.write(self.head())
            await self.wait_for(lambda: b"is forbidden" in client.data, "the 403")
            self.assertTrue(client.data.startswith(b"HTTP/1.1 403 Forbidden\r\n"))
            self.assertIn(b'"message": "pods \\"p\\" is forbidden"', client.data)

        return ensureDeferred(run())

    def test_refused_chunked(self) -> Deferred[None]:
        """
        A chunked non-101 answer is decoded and relayed whole.
        """

        async def run() -> None:
            self.api.answer = "400"
            client = await self.connect()
            client.transport.write(self.head())
            await self.wait_for(lambda: client.data.endswith(b"0\r\n\r\n"), "the 400")
            self.assertTrue(client.data.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
            body = client.data.partition(b"\r\n\r\n")[2]
            self.assertIn(b"Upgra", body)
            self.assertIn(b"de request needed", body)

        return ensureDeferred(run())

    def test_unauthenticated_upgrade(self) -> Deferred[None]:
        """
        An upgrade with a bad token gets 401 and nothing reaches the apiserver.
        """

        async def run() -> None:
            client = await self.connect()
            client.transport.write(self.head(token="wrong"))
            await self.wait_for(lambda: b"Unauthorized" in client.data, "the 401")
            self.assertTrue(client.data.startswith(b"HTTP/1.1 401 Unauthorized\r\n"))
            self.assertEqual(self.api.heads, [])

        return ensureDeferred(run())

    def test_websocket_token(self) -> Deferred[None]:
        """
        A WebSocket upgrade authenticated by a bearer-token sub-protocol is accepted,
        and that entry is removed before the request goes upstream.
        """

        async def run() -> None:
            client = await self.connect()
            entry = b"base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(GOOD.encode()).rstrip(b"=")
            client.transport.write(
                b"GET /api/v1/namespaces/default/pods/web/exec?command=sh HTTP/1.1\r\nHost: proxy\r\n"
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Protocol: " + entry + b", v5.channel.k8s.io\r\n\r\n")
            await self.wait_for(lambda: b"hello from upstream" in client.data, "the 101")
            [head] = self.api.heads
            lines = head.split(b"\r\n")
            self.assertIn(b"Sec-Websocket-Protocol: v5.channel.k8s.io", lines)
            self.assertIn(b"Sec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==", lines)
            self.assertIn(b"Upgrade: websocket", lines)
            self.assertNotIn(entry, head)

        return ensureDeferred(run())
