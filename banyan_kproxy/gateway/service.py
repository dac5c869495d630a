"""
The gateway role assembled: mTLS ``CONNECT`` listener, certificate reloader, health
listener and (with ``[audit]``) the audit pipeline, as named services.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger

from banyan_kproxy.config import Config
from banyan_kproxy.connectserver import (
    ConnectMetrics,
    ConnectServerFactory,
    TunnelRecord,
    describe_peer,
    log_tunnel,
)
from banyan_kproxy.gateway.audit import TunnelAuditor
from banyan_kproxy.gateway.policy import GatewayPolicy, backend_description, dial_backend
from banyan_kproxy.health import HealthResource, Metrics
from banyan_kproxy.services import ListeningService
from banyan_kproxy.tls import CertificateReloader, ServerTLS, listen_tcp, listen_tls

__all__ = ["add_gateway_role", "gateway_services", "gateway_factory", "HEAD_TIMEOUT"]

log = Logger()

#: How long a device has to send its CONNECT head (at most ``idle_timeout``).
HEAD_TIMEOUT = 30.0
#: Prefix of the gateway's metric names.
METRICS_PREFIX = "kproxy_gateway"


def gateway_factory(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    tunnel_auditor: TunnelAuditor | None = None,
) -> ConnectServerFactory:
    """
    The CONNECT factory for ``[gateway]``: the registered services, the timeouts
    and limits, log lines and (with a ``tunnel_auditor``) audit events per tunnel.
    """
    gateway = config.gateway
    assert gateway is not None
    timeout = gateway.connect_timeout
    policy = GatewayPolicy(
        gateway.services, lambda backend: dial_backend(reactor, backend, timeout), timeout
    )

    def opened(record: TunnelRecord) -> None:
        log_tunnel(record, log)
        if tunnel_auditor is not None:
            tunnel_auditor.opened(record)

    def closed(record: TunnelRecord) -> None:
        log_tunnel(record, log)
        if tunnel_auditor is not None:
            tunnel_auditor.closed(record)

    def handshake_failed(peer: Any, reason: str) -> None:
        log.info(
            "Gateway TLS handshake from {peer} failed: {reason}",
            peer=describe_peer(peer),
            reason=reason,
        )

    return ConnectServerFactory(
        policy,
        reactor,
        head_timeout=min(HEAD_TIMEOUT, gateway.idle_timeout),
        idle_timeout=gateway.idle_timeout,
        # The dial's own timeout answers first, naming the service; this bounds the
        # name lookup of a backend given by name as well.
        open_timeout=timeout + 1.0,
        max_connections=gateway.max_connections,
        max_connections_per_client=gateway.max_connections_per_client,
        metrics=ConnectMetrics.create(metrics, METRICS_PREFIX),
        on_tunnel_opened=opened,
        on_tunnel_closed=closed,
        on_handshake_failed=handshake_failed,
    )


def gateway_services(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    auditor: Any = None,
) -> list[IService]:
    """
    The services of the ``[gateway]`` role, ready to be added to a ``MultiService``.

    ``auditor``: an audit `Auditor` to feed (when another role already made the
    audit pipeline); None: the pipeline is made here from ``[audit]``, if present.
    Raises ``TLSConfigError`` for certificate files that cannot be used and
    ``AuditConfigError`` for a bad ``[audit]``.
    """
    gateway = config.gateway
    assert gateway is not None
    server_tls = ServerTLS.from_files(
        gateway.tls_cert_file,
        gateway.tls_key_file,
        gateway.client_ca_file,
        require_client_certificate=True,
    )
    services: list[IService] = []
    audit_parts: list[Any] = []
    if auditor is None:
        from banyan_kproxy.audit.service import audit_services

        auditor, audit_parts = audit_services(config, reactor, metrics)
        # Audit first: it stops (with a final flush) after the listener.
        services.extend(audit_parts)
    factory = gateway_factory(config, reactor, metrics, TunnelAuditor.from_auditor(auditor))
    reloader = CertificateReloader(server_tls, reactor)
    reloader.setName("gateway-certificates")
    services.append(reloader)
    for service in gateway.services:
        log.info("Gateway service {service}", service=backend_description(service))
    listener = ListeningService(
        "gateway",
        f"the gateway on {gateway.listen}",
        lambda: listen_tls(
            reactor, gateway.listen, factory, server_tls, reuse_port=gateway.reuse_port
        ),
        drain=lambda: factory.drain(gateway.drain_timeout),
    )
    for part in audit_parts:
        # twistd stops every service at once: the audit service waits for the
        # listener's drain, so the closing events of drained tunnels are spooled.
        part.stop_after(listener)
    services.append(listener)
    if gateway.health_listen is not None:
        from banyan_kproxy.health import QuietSite

        health = QuietSite(HealthResource(metrics, lambda: []))
        health.displayTracebacks = False
        health_listen = gateway.health_listen
        services.append(
            ListeningService(
                "gateway-health",
                f"health and metrics of the gateway on {health_listen}",
                lambda: listen_tcp(reactor, health_listen, health),
            )
        )
    return services


def _shared_auditor(parent: MultiService, config: Config) -> Any:
    """
    An `Auditor` on the audit pipeline another role (the proxy) already added to
    ``parent``: one spool and one set of sinks per daemon.
    """
    from banyan_kproxy.audit.auditor import Auditor
    from banyan_kproxy.audit.metrics import AuditMetrics
    from banyan_kproxy.audit.policy import load_policy

    assert config.audit is not None
    audit_service: Any = parent.getServiceNamed("audit")
    # Its series are already registered by the proxy's auditor; these counts stay private.
    return Auditor(
        policy=load_policy(config.audit.policy_file),
        accept=audit_service.spool.accept,
        metrics=AuditMetrics.create(),
    )


def add_gateway_role(parent: MultiService, config: Config, reactor: Any, metrics: Metrics) -> None:
    """
    Add the gateway role's services to ``parent``.
    """
    auditor = None
    if config.audit is not None and "audit" in getattr(parent, "namedServices", {}):
        auditor = _shared_auditor(parent, config)
    services = gateway_services(config, reactor, metrics, auditor)
    if auditor is not None:
        # The proxy's audit service, shared: it too waits for the gateway's drain.
        listener = next(service for service in services if service.name == "gateway")
        parent.getServiceNamed("audit").stop_after(listener)  # type: ignore[attr-defined]
    for service in services:
        service.setServiceParent(parent)
