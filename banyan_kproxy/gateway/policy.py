"""
Which ``CONNECT`` the gateway accepts, and where it dials.

`GatewayPolicy` looks the requested ``host:port`` up in the registered services
(anything else: 403), checks the client certificate's names against the service's
``clients`` patterns (outside them: 403), then dials the service's backend address;
the requested domain itself is never resolved.  A backend that refuses gives 502,
one that does not answer within ``connect_timeout`` 504.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from attr import define, field
from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from banyan_kproxy.config import Address, GatewayService
from banyan_kproxy.connectserver import (
    ClientIdentity,
    ConnectRefused,
    ConnectRequest,
    IConnectPolicy,
    format_target,
)
from banyan_kproxy.tunnel import SpliceEnd

__all__ = ["GatewayPolicy", "client_allowed", "dial_backend"]


def client_allowed(patterns: Sequence[str], client: ClientIdentity) -> bool:
    """
    Whether one of the client's names (certificate CN, DNS and email SANs) matches
    one of the ``fnmatch`` patterns, ignoring case.  No patterns: every client.
    """
    if not patterns:
        return True
    names = [n.lower() for n in client.names]
    return any(fnmatchcase(name, pattern.lower()) for pattern in patterns for name in names)


def dial_backend(reactor: Any, backend: Address, timeout: float) -> Deferred[SpliceEnd]:
    """
    Connect to ``backend`` (an IP address, or a name resolved by the reactor) and
    fire with the connected `SpliceEnd`; cancelling stops the attempt.
    """
    if isIPAddress(backend.host):
        endpoint: Any = TCP4ClientEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    elif isIPv6Address(backend.host):
        endpoint = TCP6ClientEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    return endpoint.connect(_OneConnection(SpliceEnd(f"backend {backend}")))


class _OneConnection(Factory):
    """
    Hands out one given protocol, without the "Starting factory" log lines that
    ``connectProtocol``'s factory writes for every backend connection.
    """

    noisy = False

    def __init__(self, protocol: SpliceEnd) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> SpliceEnd:
        return self._protocol


@implementer(IConnectPolicy)
@define
class GatewayPolicy:
    """
    The registered services: who may reach which domain, and its backend.

    ``dial(backend)`` makes the backend connection (`dial_backend` bound to a
    reactor and ``connect_timeout``, or a stand-in in tests).
    """

    services: Sequence[GatewayService]
    dial: Callable[[Address], Deferred[SpliceEnd]]
    connect_timeout: float = 10.0
    _table: dict[tuple[str, int], GatewayService] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._table = {(s.domain.lower().rstrip("."), s.port): s for s in self.services}

    def lookup(self, host: str, port: int) -> GatewayService | None:
        """
        The service registered for ``host:port``, if any.
        """
        return self._table.get((host.lower().rstrip("."), port))

    def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
        """
        Refuse with 403 unless the destination is registered and the client may use
        it; otherwise dial the backend.
        """
        target = request.target
        service = self.lookup(request.host, request.port)
        if service is None:
            return fail(ConnectRefused(403, f"{target} is not a registered service"))
        client = request.client
        if client is None:
            return fail(ConnectRefused(403, "a client certificate is required"))
        if not client_allowed(service.clients, client):
            who = client.name or "this client"
            return fail(ConnectRefused(403, f"{who} may not use {target}"))
        dialling = self.dial(service.backend)
        return dialling.addErrback(self._failed, target)

    def _failed(self, failure: Failure, target: str) -> Failure:
        """
        Say what went wrong with the backend without naming its address.
        """
        if failure.check(neterror.ConnectionRefusedError):
            raise ConnectRefused(502, f"the backend of {target} refused the connection")
        if failure.check(neterror.TimeoutError):
            raise ConnectRefused(
                504, f"the backend of {target} did not answer within {self.connect_timeout:g}s"
            )
        if failure.check(neterror.DNSLookupError):
            raise ConnectRefused(502, f"the backend name of {target} does not resolve")
        if failure.check(neterror.ConnectError):
            raise ConnectRefused(
                502, f"cannot connect to the backend of {target}: {failure.getErrorMessage()}"
            )
        return failure


def backend_description(service: GatewayService) -> str:
    """
    ``domain:port -> backend`` for the start-up log.
    """
    allowed = f" (clients {'|'.join(service.clients)})" if service.clients else ""
    return f"{format_target(service.domain, service.port)} -> {service.backend}{allowed}"
