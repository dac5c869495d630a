"""
Test servers on loopback that can be stopped cleanly: stop listening, abort every
open connection and wait until all of them are gone (so trial's reactor is clean).
"""

from __future__ import annotations

from typing import Any

from attr import define
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.policies import WrappingFactory

from banyan_kproxy.config import Address
from banyan_kproxy.tls import ServerTLS, listen_tcp, listen_tls


class TrackingFactory(WrappingFactory):
    """
    A `WrappingFactory` that can tell when all its connections have gone.
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        """
        Forget a closed connection; fire the waiters when none are left.
        """
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """
        A Deferred that fires once no connection is open.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


@define
class Served:
    """
    A factory served on a loopback port.
    """

    port: IListeningPort
    scheme: str
    host: str
    factory: TrackingFactory

    @property
    def port_number(self) -> int:
        """
        The TCP port bound (useful after asking for port 0).
        """
        return self.port.getHost().port

    @property
    def url(self) -> str:
        """
        ``https://127.0.0.1:PORT`` (or ``http://``), brackets around IPv6 hosts.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port_number}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening, abort open connections and wait until they are closed.
        """
        stopped = self.port.stopListening()
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        return gatherResults([maybeDeferred(lambda: stopped), self.factory.when_idle()]).addCallback(
            lambda _: None
        )


def serve(
    reactor: Any,
    factory: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTLS | None = None,
) -> Served:
    """
    Serve ``factory`` on ``host:port`` over TLS when ``tls`` is given, plain TCP
    otherwise, tracking its connections.
    """
    tracking = TrackingFactory(factory)
    address = Address(host, port)
    if tls is not None:
        return Served(listen_tls(reactor, address, tracking, tls), "https", host, tracking)
    return Served(listen_tcp(reactor, address, tracking), "http", host, tracking)
