"""
The ``[connect]`` role: the local CONNECT proxy kubectl reaches through ``proxy-url``.

The listener is `banyan_kproxy.connectserver` (shared with the gateway), plain HTTP
on ``listen`` (loopback by default).  `DaisyChainPolicy` decides: a destination not
in ``allow`` gets 403; an allowed one is dialled directly (``next_hop`` empty) or
through the upstream CONNECT proxy at ``next_hop`` (`nexthop.HTTPConnectProxyEndpoint`,
over TLS or mutual TLS for ``https://``), within ``connect_timeout``.  Only when the
whole chain is up does kubectl get its ``200``; otherwise a 502 (the hop refused or
could not be reached) or 504 (no answer in time) with a one-line reason naming the
hop, and the same line in the log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from attr import define, field
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from banyan_kproxy.config import Config
from banyan_kproxy.connect.nexthop import NextHop, NextHopError, next_hop_endpoint
from banyan_kproxy.connectserver import (
    ConnectMetrics,
    ConnectRefused,
    ConnectRequest,
    ConnectServerFactory,
    IConnectPolicy,
    log_tunnel,
)
from banyan_kproxy.services import ListeningService
from banyan_kproxy.tls import listen_tcp
from banyan_kproxy.tunnel import SpliceEnd

__all__ = ["DaisyChainPolicy", "add_connect_role", "connect_factory", "connect_policy"]

log = Logger()


def _normal_destination(host: str, port: int) -> tuple[str, int]:
    """
    A destination as the CONNECT parser spells it: lower case, IPv6 compressed.
    """
    host = host.lower().rstrip(".")
    if ":" in host:
        host = str(ipaddress.IPv6Address(host))
    return host, port


@implementer(IConnectPolicy)
@define
class DaisyChainPolicy:
    """
    Allows the ``allow`` destinations and connects them through ``endpoint_for``.

    ``hop`` says how destinations are reached, for messages (``next hop
    https://gw:8443`` or ``direct``); ``connect_timeout`` bounds the whole chain
    (TCP, TLS and the next hop's answer).
    """

    allow: frozenset[tuple[str, int]] = field(converter=lambda a: frozenset(_normal_destination(*d) for d in a))
    endpoint_for: Callable[[str, int], IStreamClientEndpoint]
    hop: str
    clock: Any
    connect_timeout: float = 10.0

    def open(self, request: ConnectRequest) -> Deferred[SpliceEnd]:
        """
        A connected `SpliceEnd` to the destination, or `ConnectRefused` (403, 502, 504).
        """
        target = request.target
        if (request.host, request.port) not in self.allow:
            return fail(ConnectRefused(
                403, f"{target} is not a destination this proxy may tunnel to ([connect] allow)"
            ))
        endpoint = self.endpoint_for(request.host, request.port)
        factory = Factory.forProtocol(lambda: SpliceEnd("destination"))  # type: ignore[arg-type]
        factory.noisy = False  # one log line per tunnel comes from the listener
        connecting: Deferred[SpliceEnd] = endpoint.connect(factory)
        connecting.addTimeout(self.connect_timeout, self.clock)
        connecting.addErrback(self._failed, target)
        return connecting

    def _failed(self, failure: Failure, target: str) -> Failure:
        if failure.check(ConnectRefused, CancelledError):
            return failure
        if failure.check(DeferredTimeoutError):
            reason = f"{self.hop}: no tunnel to {target} within {self.connect_timeout:g}s"
            code = 504
        elif failure.check(NextHopError):
            reason = str(failure.value)
            code = 502
        elif failure.check(ConnectError):
            reason = f"cannot connect to {target} ({self.hop}): {failure.getErrorMessage()}"
            code = 502
        else:
            log.failure("CONNECT {target}: opening the tunnel failed", failure, target=target)
            reason = f"cannot connect to {target} ({self.hop})"
            code = 502
        return Failure(ConnectRefused(code, reason))


def connect_policy(config: Config, reactor: Any) -> DaisyChainPolicy:
    """
    The policy for a ``[connect]`` section: through ``next_hop``, or direct.
    """
    section = config.connect
    assert section is not None
    if section.next_hop:
        endpoint_for = next_hop_endpoint(
            reactor,
            section.next_hop,
            ca_file=section.ca_file,
            client_cert_file=section.client_cert_file,
            client_key_file=section.client_key_file,
            connect_timeout=section.connect_timeout,
        )
        hop = f"next hop {NextHop.parse(section.next_hop).display}"
    else:

        def endpoint_for(host: str, port: int) -> IStreamClientEndpoint:
            return HostnameEndpoint(reactor, host, port, timeout=section.connect_timeout)

        hop = "direct"
    return DaisyChainPolicy(
        allow=section.allow, endpoint_for=endpoint_for, hop=hop, clock=reactor,
        connect_timeout=section.connect_timeout,
    )


def connect_factory(config: Config, reactor: Any, metrics: Any = None) -> ConnectServerFactory:
    """
    The CONNECT listener's factory for a ``[connect]`` section: tunnels are logged
    (one line when opened, one when closed or refused, with the reason).
    """
    section = config.connect
    assert section is not None
    logger = Logger(namespace="banyan_kproxy.connect")

    def logged(record: Any) -> None:
        log_tunnel(record, logger)

    return ConnectServerFactory(
        connect_policy(config, reactor),
        reactor,
        idle_timeout=section.idle_timeout,
        metrics=ConnectMetrics.create(metrics, prefix="kproxy_connect"),
        on_tunnel_opened=logged,
        on_tunnel_closed=logged,
    )


def add_connect_role(parent: MultiService, config: Config, reactor: Any, metrics: Any) -> None:
    """
    Add the ``connect`` listener to ``parent``.  Unusable TLS files for the next hop
    raise ``TLSConfigError`` here, before anything listens.
    """
    section = config.connect
    assert section is not None
    factory = connect_factory(config, reactor, metrics)
    service = ListeningService(
        "connect",
        f"the connect service on {section.listen}",
        lambda: listen_tcp(reactor, section.listen, factory),
    )
    service.setServiceParent(parent)

