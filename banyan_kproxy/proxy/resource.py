"""
The reverse proxy: a leaf ``twisted.web`` resource in front of kube-apiserver.

For each request: take the bearer token, verify it, refuse client impersonation,
build the upstream headers from the verified identity, send the request with the
proxy's own credential, and relay the response as it arrives.  The response body is
relayed with the upstream connection registered as the producer of the client's
connection, so a slow client pauses the apiserver and memory stays bounded; a client
that goes away cancels its upstream request.
"""

from __future__ import annotations

import uuid
from typing import Any

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet import task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from banyan_kproxy.config import ImpersonationConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import TokenRejected, VerifiedToken
from banyan_kproxy.proxy import headers as policy
from banyan_kproxy.proxy.upstream import CredentialError, Upstream
from banyan_kproxy.status import status_body

#: Statuses whose responses never carry a body.
_NO_BODY = {204, 304}

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@attr.s(auto_attribs=True, frozen=True)
class ProxyMetrics:
    """
    The proxy's series in the Prometheus registry.
    """

    requests: Any
    latency: Any
    verifications: Any
    upstream_errors: Any
    in_flight: Any
    open_streams: Any

    @classmethod
    def create(cls, metrics: Metrics) -> ProxyMetrics:
        """
        Register the proxy's series in ``metrics``.
        """
        return cls(
            requests=metrics.counter(
                "kproxy_requests_total",
                "Requests answered, by HTTP method and status code.",
                ("method", "code"),
            ),
            latency=metrics.histogram(
                "kproxy_request_duration_seconds",
                "Time from request to response headers.",
                buckets=_LATENCY_BUCKETS,
            ),
            verifications=metrics.counter(
                "kproxy_token_verifications_total",
                "Token verifications, by outcome and reason for rejection.",
                ("outcome", "reason"),
            ),
            upstream_errors=metrics.counter(
                "kproxy_upstream_errors_total",
                "Requests that failed to reach the apiserver or broke off, by kind.",
                ("kind",),
            ),
            in_flight=metrics.gauge(
                "kproxy_requests_in_flight", "Requests being handled now."
            ),
            open_streams=metrics.gauge(
                "kproxy_open_streams",
                "Streaming responses (watches, logs -f, chunked) being relayed now.",
            ),
        )


def _peer_ip(request: Request) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def _method_label(method: bytes) -> str:
    known = {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"}
    return method.decode("ascii") if method in known else "OTHER"


class _BodyRelay(Protocol):
    """
    Relays an upstream response body to the client as it arrives.

    The upstream transport is registered as the streaming producer of the client's
    request, so Twisted pauses the apiserver connection while the client's send
    buffer is full (``twisted/protocols/portforward.py`` discipline).
    """

    def __init__(self, request: Request, finished: Deferred[None]) -> None:
        self.request = request
        self.finished = finished
        self.client_gone = False
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.client_gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.client_gone:
            self.request.unregisterProducer()
        self.reason = reason
        self.finished.callback(None)

    def stop(self) -> None:
        """
        The client went away: stop reading from (and close) the upstream connection.
        """
        self.client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()


@attr.s(auto_attribs=True)
class KubeProxyResource(Resource):
    """
    The leaf resource that proxies every path to the apiserver.
    """

    verifier: Any  # banyan_kproxy.identity.OIDCVerifier
    upstream: Upstream
    impersonation: ImpersonationConfig
    metrics: ProxyMetrics
    clock: Any
    # Runs request-body producers; twisted.internet.task's global cooperator by default.
    cooperator: Any = attr.ib(default=attr.Factory(lambda: task))
    isLeaf = True
    log = Logger()

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> Any:
        """
        Start handling ``request``; the response is written later.
        """
        request.responseHeaders.removeHeader(b"server")
        self.metrics.in_flight.inc()
        started = self.clock.seconds()
        done = Deferred.fromCoroutine(self._handle(request, started))

        def _unexpected(failure: Failure) -> None:
            self.log.failure("Unexpected error proxying {uri}", failure, uri=request.uri)
            if not request.startedWriting:
                self._error(request, 500, "internal error in the proxy", started)
            elif not request.finished:
                _abort(request)

        def _settle(_: object) -> None:
            self.metrics.in_flight.dec()

        done.addErrback(_unexpected).addBoth(_settle)
        return NOT_DONE_YET

    def _error(
        self, request: Request, code: int, message: str, started: float, reason: str | None = None
    ) -> None:
        """
        Answer with a Kubernetes ``Status`` body.
        """
        if request.finished or request._disconnected:
            return
        body = status_body(code, message, reason)
        request.setResponseCode(code)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if code == 401:
            request.responseHeaders.setRawHeaders(
                b"www-authenticate", [b'Bearer realm="kubernetes-api"']
            )
        self._count(request, code, started)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _count(self, request: Request, code: int, started: float) -> None:
        self.metrics.requests.labels(method=_method_label(request.method), code=str(code)).inc()
        self.metrics.latency.observe(self.clock.seconds() - started)

    async def _authenticate(self, request: Request) -> VerifiedToken | TokenRejected:
        token, why = policy.bearer_token(request.requestHeaders)
        if token is None:
            return TokenRejected("missing", why or "no bearer token")
        try:
            return await self.verifier.verify(token)
        except TokenRejected as e:
            return e

    async def _handle(self, request: Request, started: float) -> None:
        peer = _peer_ip(request)
        uri = request.uri
        if not uri.startswith(b"/"):
            self._error(request, 400, "the request target must be a path", started)
            return
        result = await self._authenticate(request)
        if isinstance(result, TokenRejected):
            self.metrics.verifications.labels(outcome="rejected", reason=result.reason).inc()
            self.log.info(
                "401 {method} {path} from {peer}: token rejected ({reason}): {detail}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                peer=peer,
                reason=result.reason,
                detail=result.detail,
            )
            self._error(request, 401, "Unauthorized", started)
            return
        self.metrics.verifications.labels(outcome="accepted", reason="").inc()
        identity = result.identity
        asserted = policy.client_impersonation_headers(request.requestHeaders)
        if asserted:
            self.log.info(
                "403 {method} {path} from {peer}: {user} sent {headers}; "
                "client impersonation is not allowed",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                peer=peer,
                user=identity.user,
                headers=", ".join(asserted),
            )
            self._error(
                request,
                403,
                f'User "{identity.user}" cannot impersonate through this proxy: '
                f"{', '.join(asserted)} headers are not allowed",
                started,
            )
            return
        if request.requestHeaders.hasHeader(b"upgrade"):
            self._error(
                request,
                501,
                "protocol upgrades (exec, attach, port-forward) are not supported by this proxy yet",
                started,
                reason="NotImplemented",
            )
            return
        await self._forward(request, result, peer, started)

    async def _forward(
        self, request: Request, verified: VerifiedToken, peer: str | None, started: float
    ) -> None:
        headers = policy.upstream_request_headers(
            request.requestHeaders,
            verified.identity,
            peer,
            extra=self.impersonation.extra,
            client_ip_extra=self.impersonation.client_ip,
        )
        body = None
        content = request.content
        if content is not None:
            content.seek(0, 2)
            size = content.tell()
            content.seek(0)
            if size or request.requestHeaders.hasHeader(b"content-length"):
                body = FileBodyProducer(content, cooperator=self.cooperator)
        audit_id = str(uuid.uuid4())
        try:
            pending = self.upstream.request(request.method, request.uri, headers, body, audit_id)
        except CredentialError as e:
            self.log.error("Cannot forward: {error}", error=str(e))
            self.metrics.upstream_errors.labels(kind="credential").inc()
            self._error(request, 503, "the proxy cannot authenticate to the Kubernetes API", started)
            return
        pending.addTimeout(self.upstream.config.response_header_timeout, self.clock)
        client_gone = request.notifyFinish()
        client_gone.addErrback(lambda _: pending.cancel())
        try:
            response: IResponse = await pending
        except Exception as e:  # noqa: BLE001 - every failure becomes a Status
            self._upstream_failed(request, e, started)
            return
        await self._relay(request, response, started)

    def _upstream_failed(self, request: Request, error: Exception, started: float) -> None:
        if request._disconnected:
            self.metrics.upstream_errors.labels(kind="client_gone").inc()
            return
        if isinstance(error, TimeoutError | CancelledError):
            kind, code, message = (
                "timeout",
                504,
                "the Kubernetes API did not answer in time",
            )
        elif isinstance(error, ConnectionRefusedError | DNSLookupError | ConnectError):
            kind, code, message = "unavailable", 503, "the Kubernetes API is unavailable"
        else:
            kind, code, message = "failed", 502, "the Kubernetes API request failed"
        self.metrics.upstream_errors.labels(kind=kind).inc()
        self.log.warn(
            "{code} {method} {path}: upstream {kind}: {error}",
            code=code,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            kind=kind,
            error=_describe(error),
        )
        self._error(request, code, message, started)

    async def _relay(self, request: Request, response: IResponse, started: float) -> None:
        if request._disconnected:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in policy.downstream_response_headers(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, list(values))
        no_body = request.method == b"HEAD" or response.code in _NO_BODY or 100 <= response.code < 200
        if response.length is not UNKNOWN_LENGTH:
            # Twisted's client drops Content-Length; set it again so the client
            # gets the same framing rather than chunked re-encoding (DESIGN §7).
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        self._count(request, response.code, started)
        if no_body:
            response.deliverBody(_Discard())
            request.finish()
            return
        streaming = response.length is UNKNOWN_LENGTH
        finished: Deferred[None] = Deferred()
        relay = _BodyRelay(request, finished)
        client_gone = request.notifyFinish()
        client_gone.addErrback(lambda _: relay.stop())
        if streaming:
            self.metrics.open_streams.inc()
        try:
            response.deliverBody(relay)
            await finished
        finally:
            if streaming:
                self.metrics.open_streams.dec()
        if relay.client_gone or request._disconnected:
            return
        reason = relay.reason
        assert reason is not None
        if reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and response.length is UNKNOWN_LENGTH
        ):
            request.finish()
            return
        # Headers already went out: the only honest signal is an aborted stream.
        self.metrics.upstream_errors.labels(kind="broken_stream").inc()
        self.log.warn(
            "Upstream response for {method} {path} broke off: {error}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            error=_describe(reason.value),
        )
        _abort(request)


def _abort(request: Request) -> None:
    """
    Break the client's connection so a truncated body cannot pass for a whole one.
    """
    channel = request.channel
    if channel is not None and channel.transport is not None:
        channel.transport.abortConnection()


class _Discard(Protocol):
    """
    Reads and drops a body nobody will see.
    """

    def dataReceived(self, data: bytes) -> None:
        pass


def _describe(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        return "; ".join(_describe(f.value) for f in error.reasons) or "response failed"
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]
