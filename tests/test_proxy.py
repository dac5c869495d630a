"""
Tests for the reverse proxy resource, driven through Twisted's real HTTP server
parser over a L{StringTransport}, with a recording stand-in for the upstream agent.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Site

from banyan_kproxy.config import ImpersonationConfig, UpstreamConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import Identity, TokenRejected, VerifiedToken
from banyan_kproxy.proxy.resource import KubeProxyResource, ProxyMetrics
from banyan_kproxy.proxy.upstream import TokenFile, Upstream

GOOD = "good.token.value"
USER = Identity(
    user="banyan:myuser@example.com",
    groups=("banyan:any-employee-personal-device", "banyan:everyone"),
)


class FakeVerifier:
    """
    Accepts one token, rejects the rest with a reason.
    """

    def verify(self, token: str) -> Deferred[VerifiedToken]:
        if token == GOOD:
            return succeed(VerifiedToken(USER, 2e9, "https://issuer", "sub-1", None))
        return fail(TokenRejected("signature", "signature does not verify (kid k1, sub sub-1)"))


class FakeUpstreamTransport:
    """
    The producer side of an upstream response body, recording flow control.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """
    An upstream response whose body the test delivers piece by piece.
    """

    def __init__(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None,
                 length: Any = UNKNOWN_LENGTH) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Status"
        self.headers = Headers(headers or {b"content-type": [b"application/json"]})
        self.length = length
        self.protocol: Any = None
        self.transport = FakeUpstreamTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


class RecordingAgent:
    """
    An IAgent that records requests and answers with Deferreds the test controls.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers, body: Any = None) -> Deferred:
        d: Deferred = Deferred(lambda d: self.requests[-1].__setitem__("cancelled", True))
        self.requests.append(
            {"method": method, "uri": uri, "headers": headers, "body": body, "d": d,
             "cancelled": False}
        )
        return d


class ProxyHarness:
    """
    A proxy resource behind a real HTTPChannel, with its fakes.
    """

    def __init__(self, case: SynchronousTestCase, impersonation: ImpersonationConfig | None = None,
                 policy: str | None = None) -> None:
        self.clock = Clock()
        self.agent = RecordingAgent()
        token_path = case.mktemp()
        with open(token_path, "w") as f:
            f.write("proxy-sa-token\n")
        token = TokenFile(token_path, self.clock)
        token.load()
        self.upstream = Upstream(
            UpstreamConfig("https://10.0.0.1:6443/", response_header_timeout=60.0), self.agent, token
        )
        self.metrics = Metrics()
        self.steps: list[Any] = []
        cooperator = Cooperator(scheduler=lambda f: self.steps.append(f) or object(), started=True)
        from banyan_kproxy.audit import Auditor
        from banyan_kproxy.audit.metrics import AuditMetrics
        from banyan_kproxy.audit.policy import DEFAULT_POLICY, parse_policy

        self.events: list[dict[str, Any]] = []
        auditor = Auditor(
            parse_policy(policy, "test-policy.yaml") if policy else DEFAULT_POLICY,
            self.events.append,
            AuditMetrics.create(self.metrics),
        )
        self.resource = KubeProxyResource(
            verifier=FakeVerifier(),
            upstream=self.upstream,
            impersonation=impersonation or ImpersonationConfig(),
            metrics=ProxyMetrics.create(self.metrics),
            clock=self.clock,
            cooperator=cooperator,
            auditor=auditor,
        )
        self.site = Site(self.resource, reactor=self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, method: str = "GET", path: str = "/api/v1/namespaces/default/pods",
             headers: list[tuple[str, str]] | None = None, body: bytes = b"",
             token: str | None = GOOD) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: kube.example.com"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        for name, value in headers or []:
            lines.append(f"{name}: {value}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)

    def run_body_producers(self) -> None:
        while self.steps:
            self.steps.pop(0)()

    def response(self) -> tuple[int, dict[str, list[str]], bytes]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        code = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return code, headers, body


def sent_headers(request: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name.decode().lower(): [v.decode("utf-8") for v in values]
        for name, values in request["headers"].getAllRawHeaders()
    }


class LogCapture:
    """
    Collects formatted log lines while a test runs.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class ForwardingTests(SynchronousTestCase):
    """
    What reaches the apiserver for an authenticated request.
    """

    def test_impersonation_headers(self) -> None:
        """
        The caller's token is replaced by the proxy's; the verified user and each group
        (plus system:authenticated) go upstream as one impersonation header line each.
        """
        h = ProxyHarness(self)
        h.send(headers=[("Accept", "application/json")])
        [request] = h.agent.requests
        self.assertEqual(request["method"], b"GET")
        self.assertEqual(request["uri"], b"https://10.0.0.1:6443/api/v1/namespaces/default/pods")
        headers = sent_headers(request)
        self.assertEqual(headers["authorization"], ["Bearer proxy-sa-token"])
        self.assertEqual(headers["impersonate-user"], ["banyan:myuser@example.com"])
        self.assertEqual(
            headers["impersonate-group"],
            ["banyan:any-employee-personal-device", "banyan:everyone", "system:authenticated"],
        )
        self.assertEqual(headers["x-forwarded-for"], ["192.0.2.7"])
        self.assertEqual(headers["accept"], ["application/json"])
        self.assertEqual(len(headers["audit-id"]), 1)
        self.assertEqual(len(headers["audit-id"][0]), 36)

    def test_query_string_kept(self) -> None:
        """
        The path and query go upstream byte for byte.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/pods?watch=1&resourceVersion=10&labelSelector=a%3Db")
        self.assertEqual(
            h.agent.requests[0]["uri"],
            b"https://10.0.0.1:6443/api/v1/pods?watch=1&resourceVersion=10&labelSelector=a%3Db",
        )

    def test_stripped_headers(self) -> None:
        """
        A client's X-Forwarded-For is replaced, front-proxy identity headers,
        hop-by-hop headers and headers named in Connection are dropped.
        """
        h = ProxyHarness(self)
        h.send(headers=[
            ("X-Forwarded-For", "10.9.9.9"),
            ("X-Remote-User", "admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Remote-Extra-Scopes", "all"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("Audit-ID", "chosen-by-client"),
            ("User-Agent", "kubectl/v1.33.0"),
        ])
        headers = sent_headers(h.agent.requests[0])
        self.assertEqual(headers["x-forwarded-for"], ["192.0.2.7"])
        for name in ("x-remote-user", "x-remote-group", "x-remote-extra-scopes", "connection",
                     "x-secret", "keep-alive", "proxy-authorization"):
            self.assertNotIn(name, headers)
        self.assertNotEqual(headers["audit-id"], ["chosen-by-client"])
        self.assertEqual(headers["user-agent"], ["kubectl/v1.33.0"])

    def test_extra_and_client_ip(self) -> None:
        """
        Configured extras and the client IP go upstream as Impersonate-Extra-* lines,
        keys percent-encoded.
        """
        h = ProxyHarness(self, ImpersonationConfig(
            client_ip=True, extra=(("team", "platform"), ("team", "sre"), ("a/b", "c")),
        ))
        h.send()
        headers = sent_headers(h.agent.requests[0])
        self.assertEqual(headers["impersonate-extra-team"], ["platform", "sre"])
        self.assertEqual(headers["impersonate-extra-a%2fb"], ["c"])
        self.assertEqual(headers["impersonate-extra-remote-client-ip"], ["192.0.2.7"])

    def test_request_body(self) -> None:
        """
        A request body is forwarded whole with its length.
        """
        h = ProxyHarness(self)
        body = json.dumps({"kind": "Pod", "metadata": {"name": "p"}}).encode()
        h.send(method="POST", path="/api/v1/namespaces/default/pods", body=body,
               headers=[("Content-Type", "application/json")])
        [request] = h.agent.requests
        producer = request["body"]
        self.assertEqual(producer.length, len(body))
        consumer = StringTransport()
        done = producer.startProducing(consumer)
        h.run_body_producers()
        self.successResultOf(done)
        self.assertEqual(consumer.value(), body)
        self.assertEqual(sent_headers(request)["content-type"], ["application/json"])

    def test_token_file_reread(self) -> None:
        """
        A rotated upstream token file is picked up without a restart.
        """
        h = ProxyHarness(self)
        h.send()
        response = FakeResponse(200, length=0)
        h.agent.requests[0]["d"].callback(response)
        response.end()
        path = h.upstream.token.path
        with open(path, "w") as f:
            f.write("rotated-token-which-is-longer\n")
        h.clock.advance(2)
        h.send()
        self.assertEqual(sent_headers(h.agent.requests[1])["authorization"],
                         ["Bearer rotated-token-which-is-longer"])


class ResponseTests(SynchronousTestCase):
    """
    What the client gets back.
    """

    def test_fixed_length(self) -> None:
        """
        A response with a known length keeps its Content-Length, status and body.
        """
        h = ProxyHarness(self)
        h.send()
        response = FakeResponse(200, length=11)
        h.agent.requests[0]["d"].callback(response)
        response.send(b'{"items":[]')
        response.end()
        code, headers, body = h.response()
        self.assertEqual(code, 200)
        self.assertEqual(headers["content-length"], ["11"])
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertNotIn("server", headers)
        self.assertEqual(body, b'{"items":[]')

    def test_streaming(self) -> None:
        """
        A watch's events reach the client as each arrives, chunked, and the upstream
        transport is paused while the client's connection is.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/namespaces/default/pods?watch=1")
        response = FakeResponse(200)
        h.agent.requests[0]["d"].callback(response)
        response.send(b'{"type":"ADDED"}\n')
        self.assertTrue(h.transport.value().endswith(b'11\r\n{"type":"ADDED"}\n\r\n'))
        h.transport.producer.pauseProducing()
        self.assertTrue(response.transport.paused)
        h.transport.producer.resumeProducing()
        self.assertFalse(response.transport.paused)
        response.send(b'{"type":"DELETED"}\n')
        self.assertIn(b'{"type":"DELETED"}\n', h.transport.value())
        self.assertEqual(h.metrics.render().count(b"kproxy_open_streams 1"), 1)
        response.end()
        self.assertTrue(h.transport.value().endswith(b"0\r\n\r\n"))
        self.assertIn(b"kproxy_open_streams 0", h.metrics.render())

    def test_client_leaves_stream(self) -> None:
        """
        A client that disconnects mid-watch stops the upstream response.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/pods?watch=1")
        response = FakeResponse(200)
        h.agent.requests[0]["d"].callback(response)
        response.send(b"{}\n")
        h.channel.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(response.transport.stopped)

    def test_client_leaves_before_headers(self) -> None:
        """
        A client that disconnects before the apiserver answers cancels the request.
        """
        h = ProxyHarness(self)
        h.send()
        h.channel.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(h.agent.requests[0]["cancelled"])

    def test_broken_stream_aborts(self) -> None:
        """
        An upstream stream that breaks after headers were sent aborts the client
        connection instead of ending the chunked body as if it were complete.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/pods?watch=1")
        response = FakeResponse(200)
        h.agent.requests[0]["d"].callback(response)
        response.send(b"{}\n")
        response.end(Failure(ResponseFailed([Failure(ConnectionRefusedError())])))
        self.assertFalse(h.transport.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(h.transport.disconnecting)

    def test_upstream_refused(self) -> None:
        """
        An apiserver that refuses connections gives 503 with a Status body.
        """
        h = ProxyHarness(self)
        h.send()
        h.agent.requests[0]["d"].errback(ConnectionRefusedError())
        code, headers, body = h.response()
        self.assertEqual(code, 503)
        status = json.loads(body)
        self.assertEqual((status["kind"], status["reason"], status["code"]),
                         ("Status", "ServiceUnavailable", 503))
        self.assertIn(b'kproxy_upstream_errors_total{kind="unavailable"} 1', h.metrics.render())

    def test_upstream_timeout(self) -> None:
        """
        An apiserver that does not answer in time gives 504.
        """
        h = ProxyHarness(self)
        h.send()
        h.clock.advance(61)
        code, _, body = h.response()
        self.assertEqual(code, 504)
        self.assertEqual(json.loads(body)["reason"], "Timeout")

    def test_upstream_failed(self) -> None:
        """
        A broken upstream exchange before headers gives 502.
        """
        h = ProxyHarness(self)
        h.send()
        h.agent.requests[0]["d"].errback(ResponseFailed([Failure(ValueError("boom"))]))
        code, _, body = h.response()
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["reason"], "BadGateway")


class RefusalTests(SynchronousTestCase):
    """
    Requests the proxy refuses itself, without asking the apiserver.
    """

    def assertStatus(self, h: ProxyHarness, code: int, reason: str, message: str) -> None:
        got, headers, body = h.response()
        self.assertEqual(got, code)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(
            json.loads(body),
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
             "message": message, "reason": reason, "code": code},
        )
        self.assertEqual(h.agent.requests, [])

    def test_no_token(self) -> None:
        """
        A request without a token gets 401 Unauthorized, which kubectl shows as
        "You must be logged in to the server".
        """
        h = ProxyHarness(self)
        h.send(token=None)
        self.assertStatus(h, 401, "Unauthorized", "Unauthorized")

    def test_bad_token_logged_without_token(self) -> None:
        """
        A rejected token gets 401; the log says why and never shows the token.
        """
        logs = LogCapture(self)
        h = ProxyHarness(self)
        h.send(token="eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl")
        self.assertStatus(h, 401, "Unauthorized", "Unauthorized")
        text = logs.text()
        self.assertIn("token rejected (signature): signature does not verify", text)
        self.assertIn("192.0.2.7", text)
        self.assertNotIn("eyJ", text)
        self.assertIn(b'kproxy_token_verifications_total{outcome="rejected",reason="signature"} 1',
                      h.metrics.render())

    def test_two_authorization_headers(self) -> None:
        """
        Two Authorization headers are refused rather than guessed at.
        """
        h = ProxyHarness(self)
        h.send(headers=[("Authorization", f"Bearer {GOOD}")])
        self.assertStatus(h, 401, "Unauthorized", "Unauthorized")

    def test_client_impersonation(self) -> None:
        """
        A client-supplied Impersonate-* header (any case) is refused with 403 and a
        Status saying why.
        """
        for header in ("Impersonate-User", "impersonate-group", "IMPERSONATE-EXTRA-scopes",
                       "Impersonate-Uid"):
            h = ProxyHarness(self)
            h.send(headers=[(header, "system:admin")])
            self.assertStatus(
                h, 403, "Forbidden",
                f'User "banyan:myuser@example.com" cannot impersonate through this proxy: '
                f"{'-'.join(p.capitalize() for p in header.split('-'))} headers are not allowed",
            )

    def test_absolute_uri(self) -> None:
        """
        An absolute-form request target is refused.
        """
        h = ProxyHarness(self)
        h.send(path="https://evil.example.com/api")
        self.assertStatus(h, 400, "BadRequest", "the request target must be a path")


class AuditTests(SynchronousTestCase):
    """
    Every request becomes audit events joined to the apiserver's by Audit-ID.
    """

    def test_forwarded_request(self) -> None:
        """
        A forwarded GET gives a ResponseComplete event (the default policy omits
        RequestReceived) with the Kubernetes verb, objectRef, verified user, source IP
        and the Audit-ID that went upstream.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/namespaces/default/pods/web-1", headers=[("User-Agent", "kubectl/v1.33.0")])
        response = FakeResponse(200, length=2)
        h.agent.requests[0]["d"].callback(response)
        response.send(b"{}")
        response.end()
        audit_id = sent_headers(h.agent.requests[0])["audit-id"][0]
        self.assertEqual([e["stage"] for e in h.events], ["ResponseComplete"])
        event = h.events[-1]
        self.assertEqual(event["auditID"], audit_id)
        self.assertEqual(event["verb"], "get")
        self.assertEqual(event["objectRef"], {"resource": "pods", "namespace": "default",
                                              "name": "web-1", "apiVersion": "v1"})
        self.assertEqual(event["user"]["username"], "banyan:myuser@example.com")
        self.assertEqual(event["sourceIPs"], ["192.0.2.7"])
        self.assertEqual(event["userAgent"], "kubectl/v1.33.0")
        self.assertEqual(event["responseStatus"]["code"], 200)

    def test_watch_response_started(self) -> None:
        """
        A watch also gets a ResponseStarted event when its headers go out.
        """
        h = ProxyHarness(self)
        h.send(path="/api/v1/namespaces/default/pods?watch=1")
        response = FakeResponse(200)
        h.agent.requests[0]["d"].callback(response)
        self.assertEqual([e["stage"] for e in h.events], ["ResponseStarted"])
        self.assertEqual(h.events[-1]["verb"], "watch")
        response.end()
        self.assertEqual(h.events[-1]["stage"], "ResponseComplete")

    def test_refused_requests(self) -> None:
        """
        Requests the proxy refuses itself are audited too: a 401 without a user, a
        403 for client impersonation with the verified user and the reason.
        """
        h = ProxyHarness(self)
        h.send(token="bad")
        complete = [e for e in h.events if e["stage"] == "ResponseComplete"]
        self.assertEqual(complete[-1]["responseStatus"]["code"], 401)
        h = ProxyHarness(self)
        h.send(headers=[("Impersonate-User", "admin")])
        complete = [e for e in h.events if e["stage"] == "ResponseComplete"]
        self.assertEqual(complete[-1]["responseStatus"]["code"], 403)
        self.assertEqual(complete[-1]["user"]["username"], "banyan:myuser@example.com")
        self.assertIn("cannot impersonate through this proxy", complete[-1]["responseStatus"]["message"])

    def test_request_response_bodies(self) -> None:
        """
        At RequestResponse the request and response bodies are recorded.
        """
        h = ProxyHarness(self, policy=(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: RequestResponse\n"
        ))
        h.send(method="POST", path="/api/v1/namespaces/default/pods", body=b'{"kind":"Pod"}',
               headers=[("Content-Type", "application/json")])
        response = FakeResponse(201, length=15)
        h.agent.requests[0]["d"].callback(response)
        response.send(b'{"kind":"Pod"}\n')
        response.end()
        event = h.events[-1]
        self.assertEqual(event["verb"], "create")
        self.assertEqual(event["requestObject"], b'{"kind":"Pod"}')
        self.assertEqual(event["responseObject"], b'{"kind":"Pod"}\n')
