"""
Protocol upgrades (exec, attach, cp, port-forward; WebSocket and SPDY/3.1).

Twisted's HTTP client cannot carry a ``101 Switching Protocols``, so the upstream
side of an upgrade is a raw TLS connection: the proxy writes the request head itself
(with the same credential and impersonation as every other request) and reads the
response head.  A 101 is passed to the client unchanged and the two connections are
spliced (L{banyan_kproxy.tunnel}); anything else is relayed as an ordinary response.
The proxy never parses the upgraded stream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from banyan_kproxy.tunnel import SpliceEnd

#: The largest response head accepted from the apiserver.
MAX_HEAD = 64 * 1024

#: Request headers an upgrade needs and the ordinary header policy would drop.
UPGRADE_HEADERS = (b"connection", b"upgrade")


class UpgradeResponseError(Exception):
    """
    The apiserver's answer to an upgrade request could not be read.
    """


def is_upgrade(headers: Headers) -> bool:
    """
    Whether a request asks to switch protocols (``Connection: Upgrade`` + ``Upgrade``)
    to something other than ``h2c``.
    """
    protocols = [
        p.strip().lower()
        for p in b",".join(headers.getRawHeaders(b"upgrade", [])).split(b",")
        if p.strip()
    ]
    # ``h2c`` is never carried: after it the apiserver would read HTTP/2 requests
    # straight from the client on a connection that the proxy's credential (a
    # client certificate) authenticates.  Such a request goes on as plain HTTP/1.1.
    if not protocols or any(p == b"h2c" for p in protocols):
        return False
    tokens = b",".join(headers.getRawHeaders(b"connection", [])).lower().split(b",")
    return b"upgrade" in (t.strip() for t in tokens)


def is_websocket(headers: Headers) -> bool:
    """
    Whether an upgrade request asks for WebSocket.
    """
    return is_upgrade(headers) and any(
        v.strip().lower() == b"websocket"
        for v in b",".join(headers.getRawHeaders(b"upgrade", [])).split(b",")
    )


def request_head(method: bytes, uri: bytes, host: bytes, headers: Headers, body_length: int) -> bytes:
    """
    An HTTP/1.1 request head for the raw upstream connection.
    """
    lines = [method + b" " + uri + b" HTTP/1.1", b"Host: " + host]
    for name, values in headers.getAllRawHeaders():
        if name.lower() in (b"host", b"content-length", b"transfer-encoding"):
            continue
        for value in values:
            lines.append(name + b": " + value)
    if body_length or method not in (b"GET", b"HEAD"):
        lines.append(b"Content-Length: %d" % body_length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_response_head(head: bytes) -> tuple[int, bytes, Headers]:
    """
    Status code, reason phrase and headers of a response head (without its blank line).
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpgradeResponseError(f"bad status line {lines[0][:80]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise UpgradeResponseError(f"bad header line {line[:80]!r}")
        headers.addRawHeader(name, value.strip())
    return int(parts[1]), (parts[2] if len(parts) > 2 else b""), headers


class UpstreamUpgrade(SpliceEnd):
    """
    The raw connection to the apiserver for one upgrade request.

    It sends the request head (and body), then collects the response head;
    ``head`` fires with ``(code, phrase, headers, raw_head)`` and the bytes that
    followed the head are kept for whoever takes the connection next.
    """

    log = Logger()

    def __init__(self, head: bytes, body: bytes) -> None:
        super().__init__("upstream")
        self._request = head + body
        self._buffer = b""
        self.head: Deferred[tuple[int, bytes, Headers, bytes]] = Deferred()
        self._reading_head = True

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if not self._reading_head:
            super().dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._fail(UpgradeResponseError("response head too large"))
            return
        raw, rest = self._buffer[: end + 4], self._buffer[end + 4 :]
        self._buffer = b""
        self._reading_head = False
        try:
            code, phrase, headers = parse_response_head(raw[:-4])
        except UpgradeResponseError as e:
            self._fail(e)
            return
        # From here on the connection belongs to the relay or the splice: pause it
        # until one of them is joined, and keep what already arrived.
        self.transport.pauseProducing()
        if rest:
            self._pending.append(rest)
        self.head.callback((code, phrase, headers, raw))

    def _fail(self, error: Exception) -> None:
        self._reading_head = False
        if not self.head.called:
            self.head.errback(error)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.head.called:
            self.head.errback(reason)
        super().connectionLost(reason)


class BodyReader(Protocol):
    """
    Reads a non-101 answer's body from the raw connection and hands it on decoded.

    Framing per RFC 9112: ``Content-Length``, ``chunked``, or until the connection
    closes.  ``done`` fires when the body is complete (or fails if it broke off).
    """

    def __init__(self, headers: Headers, deliver: Any) -> None:
        from twisted.web.http import _ChunkedTransferDecoder

        self.deliver = deliver
        self.done: Deferred[None] = Deferred()
        self.remaining: int | None = None
        self.decoder: Any = None
        encodings = b",".join(headers.getRawHeaders(b"transfer-encoding", [])).lower()
        if b"chunked" in encodings:
            self.decoder = _ChunkedTransferDecoder(self.deliver, self._finished)
        else:
            length = headers.getRawHeaders(b"content-length")
            if length:
                self.remaining = int(length[0])

    def start(self, early: bytes) -> None:
        """
        Begin with the bytes that arrived together with the head.
        """
        if self.remaining == 0:
            self._finished(b"")
        elif early:
            self.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.decoder is not None:
            self.decoder.dataReceived(data)
        elif self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
            self.deliver(data)
            if self.remaining == 0:
                self._finished(b"")
        else:
            self.deliver(data)

    def _finished(self, rest: bytes) -> None:
        if not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if self.decoder is None and self.remaining is None:
            self.done.callback(None)  # close-delimited body: the close is its end
        else:
            self.done.errback(reason)


def take_over(request: Any, end: SpliceEnd) -> bytes:
    """
    Detach the client's connection from twisted.web and connect it to ``end``.

    Returns the bytes the client sent after its request head, which the HTTP
    channel buffered (so nothing the client sent early is lost).  The connection
    is left paused; the splice resumes it.
    """
    channel = request.channel
    transport = channel.transport
    # Bytes that came in the same read as the request head wait in the line
    # parser's buffer (Twisted 22.4); later ones in the channel's data buffer.
    buffered = getattr(channel, "_buffer", b"") + b"".join(getattr(channel, "_dataBuffer", []))
    channel._buffer = b""
    channel._dataBuffer = []
    # The channel registered itself as the transport's producer; the splice will
    # register the upstream connection instead.
    transport.unregisterProducer()
    transport.pauseProducing()
    channel.setTimeout(None)
    channel.transport = None
    swap_protocol(transport, end)
    end.makeConnection(transport)
    return buffered


def swap_protocol(transport: Any, protocol: Any) -> None:
    """
    Make ``protocol`` receive what ``transport`` delivers from now on.
    """
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol  # TLS: TLSMemoryBIOProtocol wraps the protocol
    else:
        transport.protocol = protocol
