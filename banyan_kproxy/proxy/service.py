"""
The proxy role assembled: TLS listener, health listener, OIDC key refresher,
certificate reloader (polling; ``tap`` adds the SIGHUP reload for every role), and
the upstream connection pool, as named services.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.web.client import Agent

from banyan_kproxy.config import Config
from banyan_kproxy.health import HealthResource, Metrics, QuietSite
from banyan_kproxy.identity import OIDCVerifier
from banyan_kproxy.proxy.drain import Drain
from banyan_kproxy.proxy.resource import KubeProxyResource, ProxyMetrics
from banyan_kproxy.proxy.probe import IssuerHealth, UpstreamHealth
from banyan_kproxy.proxy.site import ProxySite
from banyan_kproxy.proxy.upstream import Upstream, quiet_pool
from banyan_kproxy.services import CallbackService, ListeningService
from banyan_kproxy.tls import CertificateReloader, ServerTLS, https_policy, listen_tcp, listen_tls


def issuer_http_client(reactor: Any, ca_file: str | None) -> Any:
    """
    The treq client used for the issuer's discovery document and keys.
    """
    from treq.client import HTTPClient

    pool = quiet_pool(reactor)
    return HTTPClient(Agent(reactor, contextFactory=https_policy(ca_file), connectTimeout=10, pool=pool))


def proxy_services(config: Config, reactor: Any, metrics: Metrics) -> list[Any]:
    """
    The services of the ``[proxy]`` role, ready to be added to a ``MultiService``.

    Raises ``TLSConfigError`` / ``CredentialError`` for files that cannot be used.
    """
    assert config.proxy is not None and config.oidc is not None and config.upstream is not None
    server_tls = ServerTLS.from_files(config.proxy.tls_cert_file, config.proxy.tls_key_file)
    upstream = Upstream.from_config(
        config.upstream,
        reactor,
        https_policy(
            config.upstream.ca_file,
            config.upstream.client_cert_file,
            config.upstream.client_key_file,
        ),
    )
    # /ready and /metrics follow the apiserver (probes and what requests see) and the issuer.
    upstream_health = UpstreamHealth(upstream, reactor, config.upstream.probe_interval)
    upstream_health.observe_requests()
    upstream_health.register_metrics(metrics)
    verifier = OIDCVerifier(config.oidc, issuer_http_client(reactor, config.oidc.ca_file), reactor)
    issuer_health = IssuerHealth(verifier, reactor)
    issuer_health.register_metrics(metrics)
    reviewer = authorizer = None
    if config.token_passthrough.enabled:
        from banyan_kproxy.identity.tokenreview import TokenReviewer

        reviewer = TokenReviewer(config.token_passthrough, upstream, reactor)
    if config.impersonation.allow_client_impersonation:
        from banyan_kproxy.identity.impersonation import ImpersonationAuthorizer

        authorizer = ImpersonationAuthorizer(upstream, reactor)
    from banyan_kproxy.audit.service import audit_services

    auditor, audit_parts = audit_services(config, reactor, metrics)
    # The graceful stop: the listener drains what it has before the daemon goes on stopping.
    drain = Drain(reactor, config.proxy.drain_timeout)
    resource = KubeProxyResource(
        verifier=verifier,
        upstream=upstream,
        impersonation=config.impersonation,
        metrics=ProxyMetrics.create(metrics),
        clock=reactor,
        reviewer=reviewer,
        authorizer=authorizer,
        auditor=auditor,
        drain=drain,
    )
    # Request heads and bodies are read within deadlines, bodies are bounded.
    site = ProxySite(resource, reactor=reactor)
    site.displayTracebacks = False
    site.drain = drain
    proxy = config.proxy
    reloader = CertificateReloader(server_tls, reactor)
    reloader.setName("certificates")

    def stop_upstream() -> Any:
        upstream_health.stop()
        return upstream.close()

    listener = ListeningService(
        "proxy",
        f"the proxy on {proxy.listen}",
        lambda: listen_tls(reactor, proxy.listen, site, server_tls, reuse_port=proxy.reuse_port),
        drain=drain.drain,
    )
    for part in audit_parts:
        # twistd stops every service at once: the audit service waits for the
        # listener's drain, so the drained requests' events are spooled and flushed.
        part.stop_after(listener)
    services: list[Any] = [
        # Audit first: it recovers its spool before the listener starts, and it stops
        # (with a final flush) after the listener has stopped taking requests.
        *audit_parts,
        CallbackService("oidc", verifier.start, verifier.stop),
        reloader,
        listener,
        CallbackService("upstream", upstream_health.start, stop_upstream),
    ]

    def readiness() -> list[str]:
        # Problems fail /ready; the issuer's stale keys are a ReadinessWarning only.
        findings = issuer_health.findings()
        upstream_problem = upstream_health.problem()
        if upstream_problem is not None:
            findings.append(upstream_problem)
        return findings

    if proxy.health_listen is not None:
        health = QuietSite(HealthResource(metrics, readiness))
        health.displayTracebacks = False
        health_listen = proxy.health_listen
        services.append(
            ListeningService(
                "health",
                f"health and metrics on {health_listen}",
                lambda: listen_tcp(reactor, health_listen, health),
            )
        )
    return services


def add_proxy_role(parent: MultiService, config: Config, reactor: Any, metrics: Metrics) -> None:
    """
    Add the proxy role's services to ``parent``.
    """
    for service in proxy_services(config, reactor, metrics):
        service.setServiceParent(parent)
