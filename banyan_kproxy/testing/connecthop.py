"""
A minimal CONNECT hop for tests: plain HTTP CONNECT on loopback in, the same
CONNECT over mutually authenticated TLS to a next proxy (the gateway) out.

It stands where the device-side connect service stands (kubectl's ``proxy-url``
points at it), built from the shared `banyan_kproxy.connectserver` protocol and a
policy whose destination connection is a CONNECT through the next hop.  It does
no allow-listing, no credentials and no retries: it is a test double, not the
connect role.
"""

from __future__ import annotations

from typing import Any

from attr import define
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from banyan_kproxy.config import Address
from banyan_kproxy.connectserver import ConnectRefused, ConnectRequest, ConnectServerFactory, IConnectPolicy
from banyan_kproxy.testing.loopback import Served, serve
from banyan_kproxy.tls import https_policy
from banyan_kproxy.tunnel import SpliceEnd

__all__ = ["ConnectThrough", "serve_hop"]

_MAX_HEAD = 16 * 1024


class ConnectThrough(SpliceEnd):
    """
    A `SpliceEnd` that first asks the proxy it is connected to for ``CONNECT
    target`` and reads the answer; ``answered`` fires with itself after a 200 (it is
    then an ordinary splice end, paused until joined) or fails with `ConnectRefused`
    carrying the proxy's status and body.
    """

    def __init__(self, target: str) -> None:
        super().__init__(f"CONNECT {target}")
        self.target = target
        self.answered: Deferred[SpliceEnd] = Deferred()
        self._head: bytes | None = b""

    def connectionMade(self) -> None:
        self.transport.write(
            f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n\r\n".encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:
        if self._head is None:
            super().dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD:
                self._refused(502, "the next hop's answer head is too large")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = None
        status = head.split(b"\r\n", 1)[0].split(b" ", 2)
        code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 502
        if code != 200:
            self._refused(code, rest.decode("utf-8", "replace").strip() or f"the next hop answered {code}")
            return
        self.transport.pauseProducing()
        if rest:
            super().dataReceived(rest)
        self.answered.callback(self)

    def _refused(self, code: int, reason: str) -> None:
        self._head = None
        self.transport.loseConnection()
        if not self.answered.called:
            self.answered.errback(ConnectRefused(code, reason))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.answered.called:
            text = reason.getErrorMessage() if reason is not None else "closed"
            self.answered.errback(ConnectRefused(502, f"the next hop closed the connection: {text}"))
        super().connectionLost(reason if reason is not None else Failure(ConnectionLost()))


class _One(Factory):
    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


@implementer(IConnectPolicy)
@define
class _ThroughNextHop:
    """
    Every CONNECT goes on through the next hop over mutual TLS.
    """

    reactor: Any
    next_hop: Address
    tls: Any

    def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
        end = ConnectThrough(request.target)
        tcp = TCP4ClientEndpoint(self.reactor, self.next_hop.host, self.next_hop.port, timeout=10)
        connecting = wrapClientTLS(self.tls, tcp).connect(_One(end))
        return connecting.addCallback(lambda _: end.answered)


def serve_hop(
    reactor: Any,
    next_hop: Address,
    ca_file: str,
    client_cert_file: str,
    client_key_file: str,
    server_name: str = "localhost",
) -> Served:
    """
    Listen for plain CONNECT on 127.0.0.1 (a free port) and carry each one through
    ``next_hop`` over TLS, verifying its certificate against ``ca_file`` for
    ``server_name`` and presenting the client certificate.
    """
    creator = https_policy(ca_file, client_cert_file, client_key_file).creatorForNetloc(
        server_name.encode("ascii"), next_hop.port
    )
    factory = ConnectServerFactory(_ThroughNextHop(reactor, next_hop, creator), reactor, idle_timeout=600)
    return serve(reactor, factory)
