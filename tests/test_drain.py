"""
Tests for the graceful stop (`banyan_kproxy.proxy.drain`): what a client sees when
the daemon is stopped while it has requests, watches and tunnels open.

In memory: the real `ProxySite` and `KubeProxyResource` over ``StringTransport``s,
with a recording upstream agent and a ``Clock``.  On loopback: an upgrade tunnel
through a real TLS listener.  As a process: the real daemon (`LoopbackStack`) with
audit to a webhook receiver, sent SIGTERM while a slow request and a watch are open.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import treq
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent

from banyan_kproxy.config import Address, ImpersonationConfig, UpstreamConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.proxy.drain import CUT_GRACE, NEW_CONNECTION_GRACE, Drain, StreamFraming
from banyan_kproxy.proxy.resource import KubeProxyResource, ProxyMetrics
from banyan_kproxy.proxy.site import ProxySite
from banyan_kproxy.proxy.upstream import TokenFile, Upstream
from banyan_kproxy.services import ListeningService
from banyan_kproxy.testing.stack import READER_ROLE, LoopbackStack
from banyan_kproxy.tls import https_policy
from tests.test_proxy import GOOD, FakeResponse, FakeVerifier, LogCapture, RecordingAgent

WATCH = "/api/v1/namespaces/default/pods?watch=1"
LIST = "/api/v1/namespaces/default/pods"


class Client:
    """
    One client connection to the site: what it sent, what came back, its end.
    """

    def __init__(self, site: ProxySite, port: int) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", port))
        self.protocol = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.gone = False

    def send(self, path: str, close: bool = False) -> None:
        lines = [f"GET {path} HTTP/1.1", "Host: kube", f"Authorization: Bearer {GOOD}"]
        if close:
            lines.append("Connection: close")
        self.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())

    @property
    def data(self) -> bytes:
        return self.transport.value()

    def closing(self) -> bool:
        """
        Whether the proxy closed (or aborted) the connection.
        """
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def lose(self) -> None:
        """
        The connection's close completes (as the reactor would report it).
        """
        if not self.gone:
            self.gone = True
            reason = ConnectionLost() if self.aborted() else ConnectionDone()
            self.protocol.connectionLost(Failure(reason))


class Harness:
    """
    The proxy's site and resource with a drain, a recording upstream and a clock.
    """

    def __init__(self, case: SynchronousTestCase, timeout: float = 20.0) -> None:
        self.clock = Clock()
        self.agent = RecordingAgent()
        token_path = case.mktemp()
        with open(token_path, "w") as f:
            f.write("proxy-sa-token\n")
        token = TokenFile(token_path, self.clock)
        token.load()
        upstream = Upstream(UpstreamConfig("https://10.0.0.1:6443/", response_header_timeout=600.0), self.agent, token)
        from banyan_kproxy.audit import Auditor
        from banyan_kproxy.audit.metrics import AuditMetrics
        from banyan_kproxy.audit.policy import DEFAULT_POLICY

        self.events: list[dict[str, Any]] = []
        self.drain = Drain(self.clock, timeout)
        self.metrics = Metrics()
        self.resource = KubeProxyResource(
            verifier=FakeVerifier(),
            upstream=upstream,
            impersonation=ImpersonationConfig(),
            metrics=ProxyMetrics.create(self.metrics),
            clock=self.clock,
            auditor=Auditor(DEFAULT_POLICY, self.events.append, AuditMetrics.create(Metrics())),
            drain=self.drain,
        )
        self.site = ProxySite(self.resource, reactor=self.clock)
        self.site.drain = self.drain
        self.clients: list[Client] = []

    def connect(self) -> Client:
        client = Client(self.site, 50000 + len(self.clients))
        self.clients.append(client)
        return client

    def answer(self, n: int, body: bytes = b'{"kind":"PodList"}') -> None:
        """
        The apiserver answers the ``n``th request with a 200 of known length.
        """
        response = FakeResponse(length=len(body))
        self.agent.requests[n]["d"].callback(response)
        response.send(body)
        response.end()

    def stream(self, n: int, content_type: bytes = b"application/json") -> FakeResponse:
        """
        The apiserver starts a streaming (chunked) answer to the ``n``th request.
        """
        response = FakeResponse(headers={b"content-type": [content_type]})
        self.agent.requests[n]["d"].callback(response)
        return response

    def settle(self) -> None:
        """
        Report every connection the proxy closed as gone.
        """
        for client in self.clients:
            if client.closing():
                client.lose()

    def completed(self, path: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["stage"] == "ResponseComplete" and e["requestURI"] == path]


def head_and_body(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


class FramingTests(SynchronousTestCase):
    """
    `StreamFraming` finds where watch events end.
    """

    def test_json_lines(self) -> None:
        """
        JSON watch events end at a newline.
        """
        framing = StreamFraming.for_response(b"application/json", None)
        assert framing is not None
        self.assertTrue(framing.at_boundary)
        framing.feed(b'{"type":"ADDED"}\n{"type":')
        self.assertFalse(framing.at_boundary)
        self.assertEqual(framing.boundary_in(b'"MODIFIED"}\n{"ty'), 12)
        self.assertIsNone(framing.boundary_in(b'"MODI'))
        framing.feed(b'"MODIFIED"}\n')
        self.assertTrue(framing.at_boundary)

    def test_protobuf_frames(self) -> None:
        """
        Protobuf watch events are length-prefixed frames, split anywhere (even in
        the prefix).
        """
        framing = StreamFraming.for_response(b"application/vnd.kubernetes.protobuf;stream=watch", None)
        assert framing is not None
        stream = b"".join(len(p).to_bytes(4, "big") + p for p in (b"first", b"", b"third!"))
        self.assertEqual(framing.boundary_in(stream), 9)
        framing.feed(stream[:2])
        self.assertFalse(framing.at_boundary)
        self.assertEqual(framing.boundary_in(stream[2:]), 7)
        framing.feed(stream[2:11])
        self.assertFalse(framing.at_boundary)
        self.assertEqual(framing.boundary_in(stream[11:]), 2)
        framing.feed(stream[11:13])
        self.assertTrue(framing.at_boundary)
        framing.feed(stream[13:])
        self.assertTrue(framing.at_boundary)

    def test_compressed(self) -> None:
        """
        A compressed stream has no known framing (it is cut at the deadline instead).
        """
        self.assertIsNone(StreamFraming.for_response(b"application/json", b"gzip"))
        self.assertIsNotNone(StreamFraming.for_response(b"application/json", b"identity"))


class DrainTests(SynchronousTestCase):
    """
    The drain as clients of the proxy listener see it.
    """

    def test_nothing_open(self) -> None:
        """
        With nothing open the drain is over at once, and says so.
        """
        h = Harness(self)
        logs = LogCapture(self)
        self.successResultOf(h.drain.drain())
        self.assertIn("Draining 0 requests, 0 watches, 0 tunnels for up to 20s", logs.text())
        self.assertIn("Drain finished after 0.0s: everything in flight completed", logs.text())

    def test_idle_keep_alive_closed(self) -> None:
        """
        A keep-alive connection with no request in flight is closed at once.
        """
        h = Harness(self)
        client = h.connect()
        client.send(LIST)
        h.answer(0)
        self.assertIn(b"HTTP/1.1 200 OK", client.data)
        self.assertFalse(client.closing())
        done = h.drain.drain()
        self.assertTrue(client.closing())
        self.assertFalse(client.aborted())
        self.assertNoResult(done)
        h.settle()
        self.successResultOf(done)

    def test_request_in_flight_completes(self) -> None:
        """
        A request waiting for the apiserver gets its whole answer, with
        ``Connection: close``, then its connection closes and the drain is over;
        its audit event is complete.
        """
        h = Harness(self)
        logs = LogCapture(self)
        client = h.connect()
        client.send(LIST)
        done = h.drain.drain()
        self.assertIn("Draining 1 requests, 0 watches, 0 tunnels for up to 20s", logs.text())
        self.assertFalse(client.closing())
        h.clock.advance(10)
        h.answer(0, b'{"kind":"PodList","items":[]}')
        head, body = head_and_body(client.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Connection: close", head.split(b"\r\n"))
        self.assertEqual(body, b'{"kind":"PodList","items":[]}')
        self.assertTrue(client.closing())
        self.assertFalse(client.aborted())
        h.settle()
        self.successResultOf(done)
        [event] = h.completed(LIST)
        self.assertEqual(event["responseStatus"]["code"], 200)
        self.assertIn("Drain finished after 10.0s: everything in flight completed", logs.text())

    def test_response_already_started(self) -> None:
        """
        A (non-watch) streaming response whose head already went out runs to its
        end, which closes the connection.
        """
        h = Harness(self)
        client = h.connect()
        path = "/api/v1/namespaces/default/pods/web/log?follow=true"
        client.send(path)
        response = h.stream(0, b"text/plain")
        response.send(b"line one\n")
        done = h.drain.drain()
        response.send(b"line two\n")
        self.assertFalse(response.transport.stopped)
        response.end()
        head, body = head_and_body(client.data)
        self.assertNotIn(b"Connection: close", head.split(b"\r\n"))
        self.assertEqual(body, b"9\r\nline one\n\r\n9\r\nline two\n\r\n0\r\n\r\n")
        self.assertTrue(client.closing())
        h.settle()
        self.successResultOf(done)

    def test_watch_ended_between_events(self) -> None:
        """
        A watch is ended at once, after the event in progress: the client gets whole
        events and the chunked response's end, the apiserver connection is closed,
        and the watch's audit event is complete with 200.
        """
        h = Harness(self)
        logs = LogCapture(self)
        client = h.connect()
        client.send(WATCH)
        response = h.stream(0)
        first, second = b'{"type":"ADDED","object":{"n":1}}\n{"type":"ADD', b'ED","object":{"n":2}}\n'
        response.send(first)
        done = h.drain.drain()
        self.assertIn("Draining 0 requests, 1 watches, 0 tunnels", logs.text())
        self.assertFalse(response.transport.stopped)
        response.send(second + b'{"type":"ADDED","object":{"n":3}}\n')
        self.assertTrue(response.transport.stopped)
        response.end(Failure(ConnectionLost()))  # what stopping the upstream connection gives
        _, body = head_and_body(client.data)
        self.assertEqual(
            body,
            b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(first), first, len(second), second),
        )
        self.assertTrue(client.closing())
        self.assertFalse(client.aborted())
        h.settle()
        self.successResultOf(done)
        [event] = h.completed(WATCH)
        self.assertEqual(event["responseStatus"]["code"], 200)
        self.assertEqual(h.metrics.render().decode().count("kproxy_upstream_errors_total{"), 0)

    def test_idle_watch_ended_at_once(self) -> None:
        """
        A watch between events ends the moment the drain starts.
        """
        h = Harness(self)
        client = h.connect()
        client.send(WATCH)
        response = h.stream(0)
        response.send(b'{"type":"ADDED","object":{}}\n')
        h.drain.drain()
        self.assertTrue(response.transport.stopped)
        response.end(Failure(ConnectionLost()))
        self.assertTrue(client.data.endswith(b"\r\n0\r\n\r\n"))

    def test_watches_ended_at_a_bounded_rate(self) -> None:
        """
        Many watches are ended at kube-apiserver's rate: at least 200 a second.
        """
        h = Harness(self)
        responses = []
        for n in range(300):
            h.connect().send(WATCH)
            responses.append(h.stream(n))
        h.drain.drain()
        ended = sum(r.transport.stopped for r in responses)
        self.assertEqual(ended, 1)
        h.clock.advance(1.0)
        self.assertEqual(sum(r.transport.stopped for r in responses), 201)
        h.clock.advance(0.5)
        self.assertEqual(sum(r.transport.stopped for r in responses), 300)

    def test_deadline_cuts(self) -> None:
        """
        A request still waiting at the deadline is cut (its connection aborted,
        so no truncated answer passes for a whole one) and the drain ends.
        """
        h = Harness(self, timeout=5.0)
        logs = LogCapture(self)
        client = h.connect()
        client.send(LIST)
        done = h.drain.drain()
        h.clock.advance(4.9)
        self.assertFalse(client.closing())
        self.assertNoResult(done)
        h.clock.advance(0.1)
        self.assertTrue(client.aborted())
        self.assertEqual(client.data, b"")
        self.assertIn("Drain deadline (5s): cut 1 requests and 0 tunnels", logs.text())
        h.settle()
        self.successResultOf(done)
        self.assertTrue(h.agent.requests[0]["cancelled"])

    def test_deadline_without_close(self) -> None:
        """
        A cut connection whose close is never reported does not hold the stop:
        the drain ends `CUT_GRACE` after the deadline.
        """
        h = Harness(self, timeout=5.0)
        client = h.connect()
        client.send(LIST)
        done = h.drain.drain()
        h.clock.advance(5.0)
        self.assertNoResult(done)
        h.clock.advance(CUT_GRACE)
        self.successResultOf(done)

    def test_new_connection_gets_a_grace(self) -> None:
        """
        A connection accepted just before the stop may still send its first request
        (answered with Connection: close); one that sends nothing is closed after
        NEW_CONNECTION_GRACE seconds.
        """
        h = Harness(self)
        early, silent = h.connect(), h.connect()
        done = h.drain.drain()
        self.assertFalse(early.closing() or silent.closing())
        h.clock.advance(1)
        early.send(LIST)
        h.answer(0)
        self.assertIn(b"Connection: close", head_and_body(early.data)[0].split(b"\r\n"))
        self.assertTrue(early.closing())
        h.settle()
        self.assertNoResult(done)
        h.clock.advance(NEW_CONNECTION_GRACE - 1)
        self.assertTrue(silent.closing())
        self.assertEqual(silent.data, b"")
        h.settle()
        self.successResultOf(done)

    def test_pipelined_request_not_served(self) -> None:
        """
        A second request queued behind one in flight is not served: the connection
        closes after the first answer, which says Connection: close.
        """
        h = Harness(self)
        client = h.connect()
        client.send(LIST)
        client.send(LIST + "?second=1")
        h.drain.drain()
        h.answer(0)
        self.assertEqual(len(h.agent.requests), 1)
        self.assertEqual(client.data.count(b"HTTP/1.1 200"), 1)
        self.assertIn(b"Connection: close", head_and_body(client.data)[0].split(b"\r\n"))
        self.assertTrue(client.closing())


class FakeEnd:
    """
    A splice end as the drain sees it.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.closed = False


class TunnelDrainTests(SynchronousTestCase):
    """
    Upgraded connections run until the deadline.
    """

    def test_tunnel_runs_until_the_deadline(self) -> None:
        """
        A tunnel is left alone until the deadline, then both its connections are
        aborted; the drain ends when the tunnel reports it is closed.
        """
        clock = Clock()
        drain = Drain(clock, 20.0)
        channel = object()
        drain.connection_made(channel)
        client, upstream = FakeEnd(), FakeEnd()
        drain.tunnel_opened(channel, client, upstream)
        done = drain.drain()
        clock.advance(19)
        self.assertFalse(client.transport.disconnected or upstream.transport.disconnected)
        clock.advance(1)
        self.assertTrue(client.transport.disconnected and upstream.transport.disconnected)
        self.assertNoResult(done)
        drain.tunnel_closed(client)
        self.successResultOf(done)

    def test_tunnel_closed_before_the_deadline(self) -> None:
        """
        A tunnel that ends by itself ends the drain early.
        """
        clock = Clock()
        drain = Drain(clock, 20.0)
        client, upstream = FakeEnd(), FakeEnd()
        drain.tunnel_opened(object(), client, upstream)
        done = drain.drain()
        clock.advance(3)
        drain.tunnel_closed(client)
        self.successResultOf(done)
        self.assertFalse(client.transport.disconnected)


class TunnelThroughListenerTests(TestCase):
    """
    An exec tunnel through a real TLS listener with a drain, on loopback.
    """

    timeout = 30

    def test_tunnel_works_until_the_deadline(self) -> Deferred[None]:
        """
        During the drain an open tunnel keeps carrying bytes both ways; at the
        deadline both of its connections are closed and the drain ends.
        """
        return Deferred.fromCoroutine(self._tunnel())

    async def _tunnel(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.protocol import Factory
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        from banyan_kproxy.testing.certs import CertificateAuthority
        from banyan_kproxy.tls import ServerTLS, listen_tls
        from tests import test_upgrade

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.generate()
        cert, key = ca.issue("127.0.0.1", ip_addresses=["127.0.0.1"]).write(directory, "server")
        ca_file = ca.write_cert(directory)
        tls = ServerTLS.from_files(cert, key)
        api = test_upgrade.UpgradeServer()
        api_port = listen_tls(reactor, Address("127.0.0.1", 0), api, tls)
        self.addCleanup(api_port.stopListening)
        token_path = os.path.join(directory, "token")
        with open(token_path, "w") as f:
            f.write("proxy-token\n")
        upstream = Upstream.from_config(
            UpstreamConfig(f"https://127.0.0.1:{api_port.getHost().port}", ca_file=ca_file, token_file=token_path),
            reactor,
            https_policy(ca_file),
        )
        self.addCleanup(upstream.close)
        drain = Drain(reactor, 1.0)
        resource = KubeProxyResource(
            verifier=test_upgrade.FakeVerifier(), upstream=upstream, impersonation=ImpersonationConfig(),
            metrics=ProxyMetrics.create(Metrics()), clock=reactor, drain=drain,
        )
        site = ProxySite(resource, reactor=reactor)
        site.drain = drain
        proxy_port = listen_tls(reactor, Address("127.0.0.1", 0), site, tls)
        self.addCleanup(proxy_port.stopListening)

        client = test_upgrade.RawClient()
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(ca.cert_pem)),
            HostnameEndpoint(reactor, "127.0.0.1", proxy_port.getHost().port),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection() if not client.lost.called else None)
        client.transport.write(
            b"POST /api/v1/namespaces/default/pods/web/exec?command=sh HTTP/1.1\r\nHost: proxy\r\n"
            b"Authorization: Bearer " + test_upgrade.GOOD.encode() + b"\r\n"
            b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
        )
        await until(lambda: b"hello from upstream" in client.data, "the 101", 10)
        logs = LogCapture(self)
        done = drain.drain()
        self.assertIn("Draining 0 requests, 0 watches, 1 tunnels for up to 1s", logs.text())
        client.transport.write(b"still here")
        await until(lambda: client.data.endswith(b"STILL HERE"), "bytes through the tunnel during the drain", 10)
        self.assertFalse(client.lost.called)
        await until(lambda: client.lost.called, "the tunnel to be closed at the deadline", 10)
        await done
        self.assertIn("cut 0 requests and 1 tunnels", logs.text())


class FakePort:
    """
    A listening port that stops at once.
    """

    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        self.listening = False
        return succeed(None)

    def getHost(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 8443)


class StopOrderTests(SynchronousTestCase):
    """
    twistd stops every service at once: the audit service must wait for the drain.
    """

    def test_audit_flushes_after_the_drain(self) -> None:
        """
        An event of a request that completes during the drain is delivered: the
        audit service starts stopping only once the listener's drain is over, and
        nothing is dropped.
        """
        from tests.test_audit_service import Setup

        s = Setup(self)
        auditor, audit = s.build(s.config(batch_max_wait=0.0, batch_max_size=1))
        draining: Deferred[None] = Deferred()
        port = FakePort()
        listener = ListeningService("proxy", "the proxy", lambda: port, drain=lambda: draining)
        audit.stop_after(listener)
        parent = MultiService()
        audit.setServiceParent(parent)
        listener.setServiceParent(parent)
        parent.privilegedStartService()
        parent.startService()
        s.reactor.advance(0)
        stopping = parent.stopService()
        self.assertFalse(port.listening)
        s.stub.flush()
        self.assertNoResult(stopping)
        s.request(auditor, 1)  # a drained request completes
        s.reactor.advance(0)
        draining.callback(None)
        s.reactor.advance(0)
        s.stub.flush()
        s.reactor.advance(1)
        s.stub.flush()
        self.successResultOf(stopping)
        self.assertEqual([e["auditID"] for e in s.receiver.events], ["id-1"])
        self.assertNotIn("kproxy_audit_events_dropped_total{", s.metrics.render().decode())

    def test_when_stopped(self) -> None:
        """
        `ListeningService.when_stopped` fires once listening and the drain are
        over; at once for a service that is not running.
        """
        draining: Deferred[None] = Deferred()
        listener = ListeningService("proxy", "the proxy", FakePort, drain=lambda: draining)
        self.successResultOf(listener.when_stopped())
        listener.startService()
        waiting = listener.when_stopped()
        self.assertNoResult(waiting)
        listener.stopService()
        self.assertNoResult(waiting)
        draining.callback(None)
        self.successResultOf(waiting)


async def until(condition: Any, what: str, timeout: float) -> None:
    """
    Wait (bounded) until ``condition()`` holds, looking every 20 ms.
    """
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def refused(port: int) -> bool:
    """
    Whether a new TCP connection to ``port`` on 127.0.0.1 is refused.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    try:
        protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2).connect(
            Factory.forProtocol(Protocol)
        )
    except ConnectionRefusedError:
        return True
    protocol.transport.abortConnection()
    return False


class DaemonDrainTests(TestCase):
    """
    The real daemon stopped with SIGTERM while it is serving.
    """

    timeout = 180

    async def stack(self, drain_timeout: str) -> tuple[LoopbackStack, Any, str]:
        from tests.test_audit_process import Receiver

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        receiver = Receiver(self, directory)
        spool_dir = os.path.join(directory, "spool")
        stack = LoopbackStack(
            reactor,
            os.path.join(directory, "stack"),
            settings={"proxy": {"drain_timeout": drain_timeout}},
            extra_ini=(
                "\n[audit]\n"
                f"webhook_config_file = {receiver.kubeconfig}\n"
                f"spool_dir = {spool_dir}\n"
                "batch_max_wait = 100ms\ninitial_backoff = 200ms\n"
            ),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(stack.stop()))
        await stack.start()

        def release() -> Deferred[None]:
            # Answer (or drop) what the stand-in still holds, so no call is left pending.
            stack.standin.release_delayed()
            return deferLater(reactor, 0.05, lambda: None)

        self.addCleanup(release)
        return stack, receiver, spool_dir

    def assert_stopped_cleanly(self, stack: LoopbackStack, code: int | None) -> None:
        """
        The daemon shut down by itself: twistd, stopped by SIGTERM, re-raises it once
        its services have stopped (systemd counts that as a clean exit); a daemon
        that had to be killed would show SIGKILL.
        """
        self.assertIn("Server Shut Down.", stack.daemon_output)
        self.assertEqual((code, stack.daemon_exit_signal), (None, signal.SIGTERM))

    def agent(self, stack: LoopbackStack) -> Agent:
        # Not persistent: every request opens its own connection.
        return Agent(reactor, contextFactory=https_policy(stack.ca_file))

    async def _sigterm_drains(self) -> None:
        from tests.test_audit_process import spooled_ids

        stack, receiver, spool_dir = await self.stack("20s")
        token = stack.token("reader@example.com", roles=[READER_ROLE])
        headers = {"Authorization": f"Bearer {token}"}
        stack.standin.add_pod("web")
        slow_path = "/api/v1/namespaces/default/pods/web"
        stack.standin.response_delays[slow_path] = 100.0
        slow = treq.get(stack.proxy_url + slow_path, headers=headers, agent=self.agent(stack))
        answered: list[Any] = []
        slow.addBoth(lambda result: answered.append(result) or result)
        watch = await treq.get(
            stack.proxy_url + "/api/v1/namespaces/default/pods?watch=1",
            headers=headers, agent=self.agent(stack), unbuffered=True,
        )
        self.assertEqual(watch.code, 200)
        watch_audit_id = watch.headers.getRawHeaders(b"audit-id")[0].decode()
        watched: list[bytes] = []
        watch_done = treq.collect(watch, watched.append)
        await until(lambda: stack.standin.delayed == 1, "the slow request to reach the apiserver", 30)

        stopping = Deferred.fromCoroutine(stack.stop(timeout=60))  # SIGTERM
        # The watch ends cleanly (its chunked body is complete), at once...
        await watch_done
        events = [json.loads(line) for line in b"".join(watched).splitlines()]
        self.assertEqual([(e["type"], e["object"]["metadata"]["name"]) for e in events], [("ADDED", "web")])
        # ...and new connections are refused while the slow request is still waiting.
        for _ in range(250):
            if await refused(stack.proxy_port):
                break
            await deferLater(reactor, 0.02, lambda: None)
        else:
            self.fail("the proxy still accepts connections after SIGTERM")
        self.assertEqual(answered, [])
        self.assertEqual(stack.standin.delayed, 1)

        # Hold it a while longer: the audit service must not stop (and drop the
        # request's events) before the drain is over.
        await deferLater(reactor, 2.0, lambda: None)
        self.assertEqual(answered, [])
        stack.standin.release_delayed()
        response = await slow
        body = json.loads(await treq.content(response))
        self.assertEqual((response.code, body["kind"], body["metadata"]["name"]), (200, "Pod", "web"))
        slow_audit_id = response.headers.getRawHeaders(b"audit-id")[0].decode()
        self.assert_stopped_cleanly(stack, await stopping)

        output = stack.daemon_output
        self.assertIn("Draining 1 requests, 1 watches, 0 tunnels for up to 20s", output)
        self.assertIn("Drain finished after", output)
        self.assertIn("everything in flight completed", output)
        self.assertNotIn("DROPPED", output)
        self.assertNotIn("Traceback", output)
        # Nothing lost: both requests' final events were delivered or wait in the spool.
        kept = set(receiver.resource.unique()) | spooled_ids(spool_dir)
        self.assertIn((slow_audit_id, "ResponseComplete"), kept)
        self.assertIn((watch_audit_id, "ResponseComplete"), kept)
        events = receiver.resource.unique()
        if (slow_audit_id, "ResponseComplete") in events:
            self.assertEqual(events[(slow_audit_id, "ResponseComplete")]["responseStatus"]["code"], 200)

    def test_sigterm_drains(self) -> None:
        """
        SIGTERM with a slow request and a watch open: the watch ends cleanly at once,
        new connections are refused, the slow request still gets its whole 200, the
        daemon exits by itself, and the audit events of both requests
        (ResponseComplete) are delivered or spooled.
        """
        return Deferred.fromCoroutine(self._sigterm_drains())

    async def _stuck_request_cut(self) -> None:
        stack, _, _ = await self.stack("1s")
        token = stack.token("reader@example.com", roles=[READER_ROLE])
        slow_path = "/api/v1/namespaces/default/configmaps"
        stack.standin.response_delays[slow_path] = 100.0
        slow = treq.get(
            stack.proxy_url + slow_path, headers={"Authorization": f"Bearer {token}"},
            agent=self.agent(stack),
        )
        await until(lambda: stack.standin.delayed == 1, "the slow request to reach the apiserver", 30)
        self.assert_stopped_cleanly(stack, await Deferred.fromCoroutine(stack.stop(timeout=60)))
        failure = self.failureResultOf(slow)
        self.assertEqual(type(failure.value).__name__, "ResponseNeverReceived")
        self.assertIn("Drain deadline (1s): cut 1 requests and 0 tunnels", stack.daemon_output)

    def test_stuck_request_cut(self) -> None:
        """
        A request still waiting at drain_timeout is cut (the client's connection is
        closed without an answer) and the daemon still exits by itself.
        """
        return Deferred.fromCoroutine(self._stuck_request_cut())
