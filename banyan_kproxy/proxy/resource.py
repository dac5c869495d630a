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

import os
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
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from banyan_kproxy.audit import NullAuditor
from banyan_kproxy.config import ImpersonationConfig
from banyan_kproxy.health import Metrics
from banyan_kproxy.identity import Identity, TokenRejected
from banyan_kproxy.proxy import headers as policy
from banyan_kproxy.proxy.drain import StreamFraming
from banyan_kproxy.proxy.upgrade import (
    BodyReader,
    UpstreamUpgrade,
    is_upgrade,
    is_websocket,
    request_head,
    swap_protocol,
    take_over,
)
from banyan_kproxy.proxy.upstream import CredentialError, Upstream
from banyan_kproxy.requestinfo import parse_request
from banyan_kproxy.tunnel import Splice, SpliceEnd
from banyan_kproxy.status import status_body

#: How much of an error response is kept for the audit record's responseStatus.
_STATUS_KEEP = 16 * 1024

#: Statuses whose responses never carry a body.
_NO_BODY = {204, 304}

#: Label combinations `ProxyMetrics` keeps at hand (methods come from clients).
_MAX_CACHED_SERIES = 256

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
    tunnels: Any
    open_tunnels: Any
    tunnel_bytes: Any
    # Label values -> child series, so counting a request is a dictionary lookup.
    _children: dict[tuple[Any, ...], Any] = attr.ib(factory=dict, init=False, repr=False, eq=False)

    def count_request(self, method: bytes, code: int) -> None:
        """
        Count one answered request (``kproxy_requests_total``).
        """
        child = self._children.get((method, code))
        if child is None:
            child = self.requests.labels(method=_method_label(method), code=str(code))
            if len(self._children) < _MAX_CACHED_SERIES:
                self._children[(method, code)] = child
        child.inc()

    def count_verification(self, outcome: str, reason: str = "") -> None:
        """
        Count one token verification (``kproxy_token_verifications_total``).
        """
        key = ("verification", outcome, reason)
        child = self._children.get(key)
        if child is None:
            child = self.verifications.labels(outcome=outcome, reason=reason)
            if len(self._children) < _MAX_CACHED_SERIES:
                self._children[key] = child
        child.inc()

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
            tunnels=metrics.counter(
                "kproxy_tunnels_total",
                "Upgrade requests (exec, attach, port-forward), by outcome: "
                "upgraded, refused (a non-101 answer) or failed.",
                ("outcome",),
            ),
            open_tunnels=metrics.gauge("kproxy_open_tunnels", "Upgraded connections open now."),
            tunnel_bytes=metrics.counter(
                "kproxy_tunnel_bytes_total",
                "Bytes carried by upgraded connections, by direction.",
                ("direction",),
            ),
        )


#: The RFC 4122 variant digit for each value of a random hex digit.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_audit_id() -> str:
    """
    A random (version 4) UUID for a request's ``Audit-ID``, as ``str(uuid.uuid4())``
    gives, in half its time.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


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

    def __init__(self, request: Request, finished: Deferred[None], keep: int = 0) -> None:
        self.request = request
        self.finished = finished
        self.client_gone = False
        # Ended by the drain between two events (`_WatchRelay`).
        self.ended = False
        self.reason: Failure | None = None
        # The first ``keep`` bytes of the body are kept (for the audit record).
        self.keep = keep
        self.kept = bytearray()

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if len(self.kept) < self.keep:
            self.kept += data[: self.keep - len(self.kept)]
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


class _WatchRelay(_BodyRelay):
    """
    A watch's body relay that the drain (`banyan_kproxy.proxy.drain`) can end
    cleanly between two events: ``ended`` tells `_relay` to finish the response.
    """

    def __init__(self, request: Request, finished: Deferred[None], keep: int, framing: Any) -> None:
        super().__init__(request, finished, keep)
        self.framing = framing
        self.ending = False

    def dataReceived(self, data: bytes) -> None:
        if self.ending:
            cut = self.framing.boundary_in(data)
            if cut is not None:
                super().dataReceived(data[:cut])
                self._end_here()
                return
        elif self.ended:
            return
        self.framing.feed(data)
        super().dataReceived(data)

    def end(self) -> None:
        """
        End the watch after the event in progress (at once between events).
        """
        if self.ended or self.client_gone:
            return
        self.ending = True
        if self.framing.at_boundary:
            self._end_here()

    def _end_here(self) -> None:
        self.ending, self.ended = False, True
        if self.transport is not None:
            self.transport.stopProducing()


@attr.s(auto_attribs=True)
class _Call:
    """
    What the proxy knows about one request while handling it.
    """

    request: Request
    started: float
    peer: str | None
    audit_id: str = attr.Factory(new_audit_id)
    websocket: bool = False
    ws_token: bool = False
    ws_protocols: list[bytes] = attr.Factory(list)
    passthrough: bool = False
    identity: Identity | None = None
    impersonated: Identity | None = None
    # The request's audit trail, begun once the identity is known (or refused).
    record: Any = None


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
    # TokenReview for tokens that are not this issuer's ([token_passthrough]).
    reviewer: Any = None
    # SubjectAccessReview for kubectl --as ([impersonation] allow_client_impersonation).
    authorizer: Any = None
    # Audit events ([audit]); the null auditor records nothing.
    auditor: Any = attr.Factory(NullAuditor)
    # The graceful stop (banyan_kproxy.proxy.drain.Drain): told about watches and tunnels.
    drain: Any = None
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
        self,
        request: Request,
        code: int,
        message: str,
        started: float,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        call: _Call | None = None,
    ) -> None:
        """
        Answer with a Kubernetes ``Status`` body (and complete the audit record).
        """
        body = status_body(code, message, reason, details)
        if call is not None:
            self._record(call).response_complete(code, self.clock.seconds(), body, message)
        if request.finished or request._disconnected:
            return
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

    def _record(self, call: _Call) -> Any:
        """
        The call's audit record, begun now if it was not yet.
        """
        if call.record is None:
            if not getattr(self.auditor, "enabled", True):
                # No [audit] section: nothing to gather for the record.
                call.record = self.auditor.begin()
                return call.record
            request = call.request
            agent = request.requestHeaders.getRawHeaders(b"user-agent", [None])[0]
            call.record = self.auditor.begin(
                audit_id=call.audit_id,
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("ascii", "replace"),
                source_ips=[call.peer] if call.peer else [],
                user_agent=agent.decode("utf-8", "replace") if agent else None,
                received_at=call.started,
                user=call.identity,
                impersonated_user=call.impersonated,
            )
        return call.record

    def _count(self, request: Request, code: int, started: float) -> None:
        self.metrics.count_request(request.method, code)
        self.metrics.latency.observe(self.clock.seconds() - started)

    async def _authenticate(self, call: _Call) -> Identity | TokenRejected:
        """
        The caller's identity from its bearer token: an ID token of the configured
        issuer, or (with token passthrough) any token the apiserver's TokenReview
        accepts.
        """
        headers = call.request.requestHeaders
        token, why = policy.bearer_token(headers)
        if call.websocket:
            ws_token, ws_problem, call.ws_protocols = policy.websocket_bearer_token(headers)
            if ws_problem is not None:
                return TokenRejected("malformed", ws_problem)
            if ws_token is not None:
                if headers.hasHeader(b"authorization"):
                    return TokenRejected("malformed", "both Authorization and a WebSocket token")
                token, call.ws_token = ws_token, True
        if token is None:
            return TokenRejected("missing", why or "no bearer token")
        try:
            verified = await self.verifier.verify(token)
        except TokenRejected as rejected:
            if self.reviewer is None:
                return rejected
            try:
                identity = await self.reviewer.review(token)
            except TokenRejected as review_rejected:
                # Say why the ID token failed, and what the TokenReview said.
                return TokenRejected(
                    rejected.reason, f"{rejected.detail}; passthrough: {review_rejected.detail}"
                )
            call.passthrough = True
            return identity
        return verified.identity

    async def _handle(self, request: Request, started: float) -> None:
        call = _Call(request, started, _peer_ip(request))
        call.websocket = is_websocket(request.requestHeaders)
        if not request.uri.startswith(b"/"):
            self._error(request, 400, "the request target must be a path", started, call=call)
            return
        result = await self._authenticate(call)
        if isinstance(result, TokenRejected):
            self.metrics.count_verification("rejected", result.reason)
            self.log.info(
                "401 {method} {path} from {peer}: token rejected ({reason}): {detail}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                peer=call.peer,
                reason=result.reason,
                detail=result.detail,
            )
            self._error(request, 401, "Unauthorized", started, call=call)
            return
        self.metrics.count_verification("passthrough" if call.passthrough else "accepted")
        call.identity = result
        if not await self._impersonation(call):
            return
        record = self._record(call)
        if record.wants_request_body and request.content is not None:
            record.request_body(request.content.read())
            request.content.seek(0)
        if call.passthrough:
            headers = policy.passthrough_request_headers(request.requestHeaders, call.peer)
        else:
            headers = policy.upstream_request_headers(
                request.requestHeaders,
                call.impersonated or call.identity,
                call.peer,
                extra=self.impersonation.extra,
                client_ip_extra=self.impersonation.client_ip,
            )
            if call.ws_token:
                policy.without_websocket_token(headers, call.ws_protocols)
        if is_upgrade(request.requestHeaders):
            policy.add_upgrade_headers(request.requestHeaders, headers)
            await self._upgrade(call, headers)
        else:
            await self._forward(call, headers)

    async def _impersonation(self, call: _Call) -> bool:
        """
        Deal with ``Impersonate-*`` headers the client sent (``kubectl --as``):
        refused unless allowed, and then authorized by SubjectAccessReviews.
        Returns whether the request may go on.
        """
        request = call.request
        asserted = policy.client_impersonation_headers(request.requestHeaders)
        if not asserted or call.passthrough:
            # With passthrough the caller's own token goes upstream, and the
            # apiserver itself authorizes any impersonation it asks for.
            return True
        user = call.identity.user  # type: ignore[union-attr]
        if self.authorizer is None:
            self.log.info(
                "403 {method} {path} from {peer}: {user} sent {headers}; "
                "client impersonation is not allowed",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                peer=call.peer,
                user=user,
                headers=", ".join(asserted),
            )
            self._error(
                request,
                403,
                f'User "{user}" cannot impersonate through this proxy: '
                f"{', '.join(asserted)} headers are not allowed",
                call.started,
                call=call,
            )
            return False
        from banyan_kproxy.identity.impersonation import (
            ImpersonationDenied,
            ImpersonationError,
            ImpersonationUnavailable,
            RequestedImpersonation,
        )

        try:
            requested = RequestedImpersonation.from_headers(request.requestHeaders)
            assert requested is not None
            call.impersonated = await self.authorizer.authorize(call.identity, requested)
        except ImpersonationDenied as e:
            self.log.info(
                "403 {method} {path} from {peer}: {user} may not impersonate: {why}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                peer=call.peer,
                user=user,
                why=e.message,
            )
            self._error(request, 403, e.message, call.started, details=e.details or None, call=call)
            return False
        except ImpersonationUnavailable as e:
            self.metrics.upstream_errors.labels(kind="impersonation_review").inc()
            self.log.warn("Cannot check impersonation for {user}: {why}", user=user, why=e.message)
            self._error(request, 503, e.message, call.started, call=call)
            return False
        except ImpersonationError as e:
            self._error(request, e.code, e.message, call.started, call=call)
            return False
        return True

    def _body(self, request: Request) -> tuple[Any, int]:
        """
        The request body as a producer (None when there is none) and its length.
        """
        content = request.content
        if content is None:
            return None, 0
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        if size or request.requestHeaders.hasHeader(b"content-length"):
            return FileBodyProducer(content, cooperator=self.cooperator), size
        return None, 0

    async def _forward(self, call: _Call, headers: Headers) -> None:
        request, started = call.request, call.started
        body, _ = self._body(request)
        try:
            pending = self.upstream.request(
                request.method, request.uri, headers, body, call.audit_id,
                credential=not call.passthrough, reuse_headers=True,
            )
        except CredentialError as e:
            self.log.error("Cannot forward: {error}", error=str(e))
            self.metrics.upstream_errors.labels(kind="credential").inc()
            self._error(
                request, 503, "the proxy cannot authenticate to the Kubernetes API", started, call=call
            )
            return
        pending.addTimeout(self.upstream.config.response_header_timeout, self.clock)
        client_gone = request.notifyFinish()
        client_gone.addErrback(lambda _: pending.cancel())
        try:
            response: IResponse = await pending
        except Exception as e:  # noqa: BLE001 - every failure becomes a Status
            self._upstream_failed(call, e)
            return
        await self._relay(call, response)

    async def _upgrade(self, call: _Call, headers: Headers) -> None:
        """
        Carry an upgrade request over a raw TLS connection to the apiserver; on
        ``101`` splice the client's connection to it, otherwise relay the answer.
        """
        request, started = call.request, call.started
        content = request.content
        body = content.read() if content is not None else b""
        try:
            if not call.passthrough:
                for name, values in self.upstream.credential_headers().items():
                    headers.setRawHeaders(name, values)
        except CredentialError as e:
            self.log.error("Cannot forward: {error}", error=str(e))
            self.metrics.upstream_errors.labels(kind="credential").inc()
            self._error(
                request, 503, "the proxy cannot authenticate to the Kubernetes API", started, call=call
            )
            return
        headers.setRawHeaders(b"Audit-ID", [call.audit_id.encode("ascii")])
        head = request_head(request.method, request.uri, self.upstream.host_header, headers, len(body))
        upstream = UpstreamUpgrade(head, body)
        # Hold the client's bytes back until the upstream side is decided.
        request.channel.transport.pauseProducing()
        connecting = self.upstream.connect(upstream)
        connecting.addTimeout(self.upstream.config.connect_timeout, self.clock)
        answered = upstream.head
        answered.addTimeout(self.upstream.config.response_header_timeout, self.clock)
        client_gone = request.notifyFinish()
        client_gone.addErrback(lambda _: (connecting.cancel(), answered.cancel()))
        try:
            await connecting
            code, phrase, response_headers, raw_head = await answered
        except Exception as e:  # noqa: BLE001 - every failure becomes a Status
            if upstream.transport is not None:
                upstream.transport.abortConnection()
            request.channel and request.channel.transport and request.channel.transport.resumeProducing()
            self.metrics.tunnels.labels(outcome="failed").inc()
            self._upstream_failed(call, e)
            return
        if request._disconnected:
            upstream.transport.abortConnection()
            return
        if code != 101:
            self.metrics.tunnels.labels(outcome="refused").inc()
            request.channel.transport.resumeProducing()
            await self._relay_raw(call, upstream, code, phrase, response_headers)
            return
        self.metrics.tunnels.labels(outcome="upgraded").inc()
        self._count(request, 101, started)
        record = self._record(call)
        record.response_started(101, self.clock.seconds())
        client = SpliceEnd("client")
        early = take_over(request, client)
        client.transport.write(raw_head)
        if early:
            upstream.transport.write(early)
        self.metrics.open_tunnels.inc()
        opened = self.clock.seconds()
        if self.drain is not None:
            self.drain.tunnel_opened(request.channel, client, upstream)

        def closed(splice: Splice) -> None:
            if self.drain is not None:
                self.drain.tunnel_closed(client)
            record.response_complete(101, self.clock.seconds())
            self.metrics.open_tunnels.dec()
            sent, received = splice.left.received, splice.right.received
            self.metrics.tunnel_bytes.labels(direction="client_to_upstream").inc(sent + len(early))
            self.metrics.tunnel_bytes.labels(direction="upstream_to_client").inc(received)
            self.log.info(
                "Tunnel closed: {user} {method} {path} ({protocol}): {sent} bytes in, "
                "{received} bytes out, {duration:.1f}s",
                user=(call.impersonated or call.identity).user,  # type: ignore[union-attr]
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                protocol=b", ".join(response_headers.getRawHeaders(b"upgrade", [])).decode(
                    "ascii", "replace"
                ),
                sent=sent + len(early),
                received=received,
                duration=self.clock.seconds() - opened,
            )

        Splice(client, upstream, closed)

    async def _relay_raw(
        self, call: _Call, upstream: UpstreamUpgrade, code: int, phrase: bytes, headers: Headers
    ) -> None:
        """
        Relay a non-101 answer to an upgrade request as an ordinary response.
        """
        request = call.request
        request.setResponseCode(code, phrase)
        for name, values in policy.downstream_response_headers(headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, list(values))
        length = headers.getRawHeaders(b"content-length")
        if length:
            request.responseHeaders.setRawHeaders(b"content-length", [length[0]])
        self._count(request, code, call.started)
        record = self._record(call)
        kept = bytearray()

        def deliver(data: bytes) -> None:
            if len(kept) < _STATUS_KEEP:
                kept.extend(data[: _STATUS_KEEP - len(kept)])
            request.write(data)

        reader = BodyReader(headers, deliver)
        early = upstream.take_pending()
        upstream_transport = upstream.transport
        # The raw connection now feeds the body reader.
        swap_protocol(upstream_transport, reader)
        reader.transport = upstream_transport
        reader.start(early)
        upstream_transport.resumeProducing()
        try:
            await reader.done
        except Exception:  # noqa: BLE001 - a broken body aborts the client
            _abort(request)
            record.response_complete(code, self.clock.seconds(), None, "upstream answer broke off")
            return
        finally:
            upstream_transport.loseConnection()
        record.response_complete(code, self.clock.seconds(), bytes(kept))
        if not request.finished and not request._disconnected:
            request.finish()

    def _upstream_failed(self, call: _Call, error: Exception) -> None:
        request, started = call.request, call.started
        if request._disconnected:
            self.metrics.upstream_errors.labels(kind="client_gone").inc()
            self._record(call).response_complete(499, self.clock.seconds(), None, "client went away")
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
        self._error(request, code, message, started, call=call)

    async def _relay(self, call: _Call, response: IResponse) -> None:
        request, started = call.request, call.started
        record = self._record(call)
        if request._disconnected:
            response.deliverBody(_Discard())
            record.response_complete(499, self.clock.seconds(), None, "client went away")
            return
        request.setResponseCode(response.code, response.phrase)
        policy.copy_downstream_response_headers(response.headers, request.responseHeaders)
        no_body = request.method == b"HEAD" or response.code in _NO_BODY or 100 <= response.code < 200
        if response.length is not UNKNOWN_LENGTH:
            # Twisted's client drops Content-Length; set it again so the client
            # gets the same framing rather than chunked re-encoding (DESIGN §7).
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        self._count(request, response.code, started)
        record.response_started(response.code, self.clock.seconds())
        if no_body:
            response.deliverBody(_Discard())
            request.finish()
            record.response_complete(response.code, self.clock.seconds())
            return
        streaming = response.length is UNKNOWN_LENGTH
        finished: Deferred[None] = Deferred()
        # The audit record wants the body at RequestResponse; an error's small
        # Status body is kept for every level (it goes into responseStatus).
        if record.wants_response_body:
            keep = record.body_limit + 1
        elif response.code >= 400:
            keep = _STATUS_KEEP
        else:
            keep = 0
        relay = self._watch_relay(request, response, finished, keep) if streaming else None
        if relay is None:
            relay = _BodyRelay(request, finished, keep)
        client_gone = request.notifyFinish()
        client_gone.addErrback(lambda _: relay.stop())
        if streaming:
            self.metrics.open_streams.inc()
            # Send the head now, as kube-apiserver flushes a watch's head at once:
            # twisted.web would hold it until the first event, and a client (client-go's
            # Watch()) waits for the head before it reads any event.
            request.write(b"")
        try:
            response.deliverBody(relay)
            if isinstance(relay, _WatchRelay):
                self.drain.watch_started(relay)
            await finished
        finally:
            if streaming:
                self.metrics.open_streams.dec()
            if isinstance(relay, _WatchRelay):
                self.drain.watch_ended(relay)
        if relay.client_gone or request._disconnected:
            record.response_complete(response.code, self.clock.seconds(), None, "client went away")
            return
        reason = relay.reason
        assert reason is not None
        if relay.ended or isinstance(reason.value, ResponseDone) or (
            isinstance(reason.value, PotentialDataLoss) and response.length is UNKNOWN_LENGTH
        ):
            request.finish()
            record.response_complete(
                response.code, self.clock.seconds(), bytes(relay.kept) if keep else None
            )
            return
        record.response_complete(response.code, self.clock.seconds(), None, "upstream stream broke off")
        # Headers already went out: the only honest signal is an aborted stream.
        self.metrics.upstream_errors.labels(kind="broken_stream").inc()
        self.log.warn(
            "Upstream response for {method} {path} broke off: {error}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            error=_describe(reason.value),
        )
        _abort(request)

    def _watch_relay(
        self, request: Request, response: IResponse, finished: Deferred[None], keep: int
    ) -> _WatchRelay | None:
        """
        A relay the drain can end between events, for a watch whose framing is known.
        """
        if self.drain is None or parse_request(
            request.method.decode("ascii", "replace"), request.uri.decode("ascii", "replace")
        ).verb != "watch":
            return None
        framing = StreamFraming.for_response(
            response.headers.getRawHeaders(b"content-type", [None])[0],
            response.headers.getRawHeaders(b"content-encoding", [None])[0],
        )
        return None if framing is None else _WatchRelay(request, finished, keep, framing)


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
