"""
The proxy listener's ``Site``: Twisted's HTTP/1.1 server with the bounds a server
facing the internet needs and ``twisted.web`` does not have.

``HTTPChannel``'s own timeout is an *idle* timeout, reset by every byte, so a client
that sends its request head one byte a minute (slowloris) holds a connection for
days.  `ProxySite` gives each request head a deadline counted from its first byte (or
from the connection's start, which covers the TLS handshake): `HEADER_TIMEOUT`, as
kube-apiserver's ``ReadHeaderTimeout``.  A request body then has `BODY_TIMEOUT` to
arrive whole and may be at most `MAX_REQUEST_BODY` bytes (kube-apiserver's own limit):
Twisted would otherwise spool any size to a temporary file, before the request is
authenticated.  A connection over a deadline is closed; an oversized body gets a
``413`` ``Status`` and the connection is closed.

With a `Drain` (``site.drain``) the site reports every connection and request head
to it, so that stopping the daemon can drain them (`banyan_kproxy.proxy.drain`).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.interfaces import ILoggingContext, IProtocol
from twisted.logger import Logger
from twisted.python.components import proxyForInterface

from twisted.web.server import Request, Site
from zope.interface import implementer

from banyan_kproxy.status import status_body

#: Seconds a client has to send a request head (kube-apiserver: 32 s).
HEADER_TIMEOUT = 32.0
#: Seconds a client has to send a request body once its head is in.
BODY_TIMEOUT = 120.0
#: Largest request body accepted, bytes (kube-apiserver's ``MaxRequestBodyBytes``).
MAX_REQUEST_BODY = 3 * 1024 * 1024

_log = Logger()


class _ReadDeadline:
    """
    One connection's deadline for reading the request in progress.
    """

    def __init__(self, clock: Any, header_timeout: float, body_timeout: float) -> None:
        self.clock = clock
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.transport: Any = None
        self.call: Any = None
        #: A request head is complete and its response not yet finished.
        self.in_request = False

    def arm(self, seconds: float | None = None) -> None:
        """
        Start the deadline unless it is running (``seconds``: restart it with that).
        """
        if seconds is not None:
            self.disarm()
        if self.call is None and self.transport is not None:
            self.call = self.clock.callLater(
                self.header_timeout if seconds is None else seconds, self._expired
            )

    def disarm(self) -> None:
        """
        Stop the deadline.
        """
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None

    def _expired(self) -> None:
        self.call = None
        transport, self.transport = self.transport, None
        if transport is None:
            return
        _log.info(
            "Closing a connection from {peer}: the request was not read in time",
            peer=str(transport.getPeer()),
        )
        transport.abortConnection()

    def request_done(self, _: object = None) -> None:
        """
        The response is finished: the next request's first byte starts a deadline.
        """
        self.in_request = False


@implementer(ILoggingContext)
class _DeadlineProtocol(proxyForInterface(IProtocol, "_wrapped")):  # type: ignore[misc]
    """
    The HTTP channel (Twisted's ALPN switcher around ``HTTPChannel``) with a read
    deadline started when the connection is made and when a request's first byte
    arrives; the connection's start and end are reported to the site's drain.
    """

    def __init__(self, wrapped: Any, deadline: _ReadDeadline, drain: Any = None, channel: Any = None) -> None:
        self._wrapped = wrapped
        self._deadline = deadline
        self._drain = drain
        self._channel = channel

    def makeConnection(self, transport: Any) -> None:
        self._deadline.transport = transport
        self._deadline.arm()
        self._wrapped.makeConnection(transport)
        if self._drain is not None:
            self._drain.connection_made(self._channel)

    def dataReceived(self, data: bytes) -> None:
        if not self._deadline.in_request:
            self._deadline.arm()
        self._wrapped.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self._deadline.disarm()
        self._deadline.transport = None
        self._wrapped.connectionLost(reason)
        if self._drain is not None:
            self._drain.connection_lost(self._channel)

    def logPrefix(self) -> str:
        """
        The wrapped channel's log prefix (TLS log lines name it).
        """
        prefix = getattr(self._wrapped, "logPrefix", None)
        return prefix() if prefix is not None else type(self._wrapped).__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class ProxyRequest(Request):
    """
    A request whose head and body are read within the site's deadlines and whose
    body is bounded.
    """

    _refused = False
    _body_size = 0

    def _deadline(self) -> _ReadDeadline | None:
        return getattr(self.channel, "read_deadline", None)

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_request_body", MAX_REQUEST_BODY)

    def gotLength(self, length: int | None) -> None:
        deadline = self._deadline()
        if deadline is not None:
            deadline.in_request = True
            deadline.arm(deadline.body_timeout)
            self.notifyFinish().addBoth(deadline.request_done)
        drain = getattr(getattr(self.channel, "site", None), "drain", None)
        if drain is not None:
            drain.request_started(self)
        if length is not None and length > self._limit():
            self.content = BytesIO()
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self._limit():
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        deadline = self._deadline()
        if deadline is not None:
            deadline.disarm()
        super().requestReceived(command, path, version)

    def _refuse_body(self) -> None:
        """
        Answer ``413`` without reading the body, and close the connection.
        """
        self._refused = True
        deadline = self._deadline()
        if deadline is not None:
            deadline.disarm()
        transport = self.channel.transport
        if transport is None:
            return
        limit = self._limit()
        body = status_body(413, f"the request body is larger than {limit} bytes")
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        _log.info(
            "413 from {peer}: request body over {limit} bytes",
            peer=str(transport.getPeer()),
            limit=limit,
        )
        # The channel's own close: it unregisters itself as the transport's producer
        # first, without which a TLS transport never starts its shutdown.
        self.channel.loseConnection()


class ProxySite(Site):
    """
    The proxy listener's ``Site``: `ProxyRequest`s, read deadlines, no access log
    (the proxy logs what matters, rejections and upstream failures, itself).

    ``header_timeout``, ``body_timeout`` and ``max_request_body`` may be set per site
    (tests use small ones); ``drain`` is the `Drain` told about connections and
    requests (None: no drain).
    """

    requestFactory = ProxyRequest
    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    max_request_body = MAX_REQUEST_BODY
    drain: Any = None

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        deadline = _ReadDeadline(self.reactor, self.header_timeout, self.body_timeout)
        # Twisted wraps HTTPChannel in an ALPN switcher; requests see the channel.
        channel = getattr(protocol, "_channel", protocol)
        channel.read_deadline = deadline
        return _DeadlineProtocol(protocol, deadline, self.drain, channel)
