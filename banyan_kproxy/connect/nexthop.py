"""
The next hop: a tunnel to ``host:port`` through an upstream HTTP CONNECT proxy.

`HTTPConnectProxyEndpoint` has the shape of Synapse's endpoint of that name
(``synapse/http/connectproxyclient.py``): an ``IStreamClientEndpoint`` wrapping the
endpoint that reaches the proxy.  It connects, sends ``CONNECT host:port HTTP/1.1``
(with ``Host`` and, when the proxy URL has user info, ``Proxy-Authorization:
Basic``), reads the proxy's response head (bounded), and on a 2xx connects the
caller's protocol to that connection, handing it any bytes that followed the head.
Anything else fails the ``connect()`` Deferred with a `NextHopError` that names the
hop and quotes its status line.  Because it is an endpoint, TLS can wrap it (kubectl's
TLS runs inside), and the proxy endpoint itself may be TLS (`next_hop_endpoint`:
``https://`` next hops, with a client certificate for mutual TLS).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from attr import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from banyan_kproxy.tls import https_policy

#: The largest response head accepted from a next hop.
MAX_HEAD_BYTES = 16 * 1024


class NextHopError(Exception):
    """
    The next hop gave no tunnel; the message names the hop and says why.
    """


def format_target(host: str, port: int) -> str:
    """
    ``host:port`` with brackets around an IPv6 address (the CONNECT authority form).
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen
class NextHop:
    """
    A parsed ``next_hop`` URL: ``http://`` or ``https://``, host, port, and the
    credentials from its user info (``user:password@``), if any.
    """

    scheme: str
    host: str
    port: int
    credentials: bytes | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> NextHop:
        """
        Read ``url`` (already validated by the configuration); the port defaults to
        80 for http and 443 for https.
        """
        parts = urlsplit(url)
        credentials = None
        if parts.username is not None:
            user = unquote(parts.username)
            password = unquote(parts.password or "")
            credentials = f"{user}:{password}".encode()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, credentials)

    @property
    def display(self) -> str:
        """
        The hop for messages and logs: ``scheme://host:port``, without credentials.
        """
        return f"{self.scheme}://{format_target(self.host, self.port)}"


class _TunnelSetup(Protocol):
    """
    Asks the proxy for the tunnel, then relays every event to the caller's protocol.
    """

    def __init__(self, endpoint: HTTPConnectProxyEndpoint, factory: IProtocolFactory,
                 ready: Deferred[IProtocol]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.ready = ready
        self.wrapped: IProtocol | None = None
        self.buffer = b""

    def connectionMade(self) -> None:
        target = format_target(self.endpoint.host, self.endpoint.port).encode("ascii")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        if self.endpoint.credentials is not None:
            lines.append(b"Proxy-Authorization: Basic " + base64.b64encode(self.endpoint.credentials))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self.ready.called:
            return
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            if len(self.buffer) > self.endpoint.max_head_bytes:
                self._fail(f"answered CONNECT {self.endpoint.target} with a response head over "
                           f"{self.endpoint.max_head_bytes} bytes")
            return
        self.buffer = b""
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if not (parts[0].startswith(b"HTTP/1.") and 200 <= code < 300):
            shown = status_line.decode("latin-1")
            shown = "".join(c if c.isprintable() else "?" for c in shown)[:200]
            self._fail(f"refused CONNECT {self.endpoint.target}: {shown}")
            return
        wrapped = self.factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self.transport.abortConnection()
            self.ready.errback(NextHopError("the tunnel's protocol factory declined the connection"))
            return
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        if rest:
            wrapped.dataReceived(rest)
        self.ready.callback(wrapped)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self.ready.called:
            detail = _reason_text(reason)
            self.ready.errback(NextHopError(
                f"{self.endpoint.hop} closed the connection before answering CONNECT "
                f"{self.endpoint.target}" + (f": {detail}" if detail else "")
            ))

    def _fail(self, message: str) -> None:
        self.transport.abortConnection()
        if not self.ready.called:
            self.ready.errback(NextHopError(f"{self.endpoint.hop} {message}"))


def _reason_text(reason: Failure | None) -> str:
    """
    Why a connection ended, for a message: TLS errors in OpenSSL's words.
    """
    if reason is None:
        return ""
    from twisted.internet.error import ConnectionDone

    if reason.check(ConnectionDone):
        return ""
    value = reason.value
    args = getattr(value, "args", None)
    # pyOpenSSL's SSL.Error: [[(lib, func, reason), ...]]
    if args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], tuple):
        return "TLS: " + ", ".join(str(entry[-1]) for entry in args[0])
    return str(value) or type(value).__name__


@implementer(IStreamClientEndpoint)
@define
class HTTPConnectProxyEndpoint:
    """
    Connects to ``host:port`` through the CONNECT proxy reached by ``proxy_endpoint``.

    ``hop`` names the proxy in error messages (no credentials in it);
    ``credentials`` (``b"user:password"``) are sent as ``Proxy-Authorization:
    Basic``.  Cancelling the ``connect()`` Deferred cancels the connection attempt or
    aborts the connection.
    """

    proxy_endpoint: IStreamClientEndpoint
    host: str
    port: int
    hop: str = "the next hop"
    credentials: bytes | None = field(default=None, repr=False)
    max_head_bytes: int = MAX_HEAD_BYTES

    @property
    def target(self) -> str:
        """
        ``host:port`` as sent in the request line.
        """
        return format_target(self.host, self.port)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Fires with the caller's protocol, connected through the tunnel, once the
        proxy answered 2xx; fails with `NextHopError` otherwise.
        """
        setups: list[_TunnelSetup] = []

        def cancel(_: Deferred[IProtocol]) -> None:
            if not connecting.called:
                connecting.cancel()
            elif setups and setups[0].transport is not None:
                setups[0].transport.abortConnection()

        ready: Deferred[IProtocol] = Deferred(cancel)

        def build(addr: Any) -> _TunnelSetup:
            setup = _TunnelSetup(self, protocolFactory, ready)
            setups.append(setup)
            return setup

        setup_factory = Factory()
        setup_factory.noisy = False
        setup_factory.buildProtocol = build  # type: ignore[method-assign]
        connecting = self.proxy_endpoint.connect(setup_factory)

        def connect_failed(failure: Failure) -> None:
            if ready.called:
                return
            if failure.check(CancelledError):
                ready.errback(failure)
            else:
                ready.errback(NextHopError(f"cannot connect to {self.hop}: {failure.getErrorMessage()}"))

        connecting.addErrback(connect_failed)
        return ready


def next_hop_endpoint(
    reactor: Any,
    next_hop: str,
    *,
    ca_file: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
    connect_timeout: float = 10.0,
) -> Callable[[str, int], HTTPConnectProxyEndpoint]:
    """
    A maker of endpoints through the proxy at ``next_hop`` (``http://`` or
    ``https://``).  For https the proxy's certificate is verified against
    ``ca_file`` (or the system roots) and its host name, and the client
    certificate is presented when given (mutual TLS).  Unusable TLS files raise
    ``TLSConfigError`` now, not at the first connection.
    """
    hop = NextHop.parse(next_hop)
    creator = None
    if hop.scheme == "https":
        policy = https_policy(ca_file, client_cert_file, client_key_file)
        creator = policy.creatorForNetloc(hop.host.encode("idna"), hop.port)

    def endpoint(host: str, port: int) -> HTTPConnectProxyEndpoint:
        proxy: IStreamClientEndpoint = HostnameEndpoint(reactor, hop.host, hop.port, timeout=connect_timeout)
        if creator is not None:
            proxy = wrapClientTLS(creator, proxy)
        return HTTPConnectProxyEndpoint(proxy, host, port, f"next hop {hop.display}", hop.credentials)

    return endpoint
