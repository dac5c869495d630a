"""
The audit role assembled from ``[audit]`` (and ``[banyan]``): the `Auditor` the proxy
calls, and the ``audit`` service that owns the spool, the pumps and the sinks.

``audit_services(config, reactor, metrics)`` checks everything it can before anything
starts (policy, webhook kubeconfig, certificates, at least one sink) and raises
`AuditConfigError` with one line naming the file (and rule) otherwise.  The service
locks and opens the spool directory in ``privilegedStartService`` (a spool another
process uses, or a directory that cannot be made, stops the daemon with one line),
recovers the spool in a thread on start, and on stop (once the listeners feeding it
have drained, `AuditService.stop_after`) commits what is waiting,
gives each sink up to ``stop_timeout`` seconds to take what is in memory, and
records the acknowledgements.  Nothing unacknowledged is lost by stopping: it stays
in the spool for the next start.
"""

from __future__ import annotations

import functools
import signal
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from banyan_kproxy.audit.auditor import Auditor, NullAuditor
from banyan_kproxy.audit.backend import BatchPolicy, SinkPump
from banyan_kproxy.audit.errors import AuditConfigError
from banyan_kproxy.audit.event import encode_event
from banyan_kproxy.audit.metrics import AuditMetrics
from banyan_kproxy.audit.policy import PolicyError, describe, load_policy
from banyan_kproxy.audit.sinks import BanyanSink, LogFileSink, WebhookSink, load_webhook_target
from banyan_kproxy.audit.spool import SegmentStore, Spool, SpoolLocked, observe, segment_size_for
from banyan_kproxy.config import AuditConfig, Config
from banyan_kproxy.health import Metrics

__all__ = ["audit_services", "AuditService", "AuditConfigError", "MIN_SPOOL_BYTES"]

#: The smallest ``spool_max_bytes`` accepted.
MIN_SPOOL_BYTES = 64 * 1024
#: How long a failed spool recovery waits before trying again.
RECOVERY_RETRY = 5.0


def thread_executor(reactor: Any) -> Any:
    """
    Run blocking functions in the reactor's thread pool (``deferToThread``).
    """

    def run(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args, **kwargs)

    return run


class AuditService(Service):
    """
    Owns the spool, one `SinkPump` per sink, and the sinks.
    """

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        pumps: list[SinkPump],
        reactor: Any,
        stop_timeout: float = 10.0,
        install_sighup: bool = False,
    ) -> None:
        self.name = "audit"
        self.spool = spool
        self.pumps = pumps
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.install_sighup = install_sighup
        self._opened = False
        self._recovering: Deferred[Any] | None = None
        self._retry_call: Any = None
        self._previous_sighup: Any = None
        self._sighup_handler: Any = None
        self._pumps_started = False
        self._stop_after: list[Any] = []

    def stop_after(self, service: Any) -> None:
        """
        Begin stopping only once ``service`` (a listener feeding this pipeline, with
        ``when_stopped()``) has stopped and drained its requests: twistd stops
        every service at once, and the events of drained requests must not arrive
        after the spool is closed.
        """
        self._stop_after.append(service)

    @property
    def sinks(self) -> list[Any]:
        """
        The sinks, in pump order.
        """
        return [pump.sink for pump in self.pumps]

    def privilegedStartService(self) -> None:
        """
        Create and lock the spool directory; a failure stops the daemon with one line.
        """
        self._open()
        Service.privilegedStartService(self)

    def _open(self) -> None:
        if self._opened:
            return
        from banyan_kproxy.services import fail_startup

        try:
            self.spool.store.open()
        except SpoolLocked as e:
            raise fail_startup(f"audit: {e}", code=2)
        except OSError as e:
            raise fail_startup(
                f"audit: spool_dir {self.spool.store.directory} cannot be used: {e.strerror or e}", code=2
            )
        self._opened = True

    def startService(self) -> None:
        """
        Recover the spool (in a thread), then start delivering.
        """
        self._open()
        Service.startService(self)
        self._recover()
        if self.install_sighup:
            self._install_sighup()
        self.log.info(
            "Audit events to {sinks}, spooled in {directory}",
            sinks=", ".join(pump.name for pump in self.pumps),
            directory=self.spool.store.directory,
        )

    def _recover(self) -> None:
        self._retry_call = None
        d = self._recovering = self.spool.recover()

        def recovered(result: Any) -> None:
            self._recovering = None
            if not self.running:
                return
            self._pumps_started = True
            for pump in self.pumps:
                pump.start(self.spool.ack_offset(pump.name))
            self.log.info(
                "Audit spool {directory}: {bytes} bytes waiting for delivery",
                directory=self.spool.store.directory,
                bytes=self.spool.used_bytes,
            )

        def failed(failure: Any) -> None:
            self._recovering = None
            self.log.failure(
                "AUDIT SPOOL {directory} CANNOT BE READ; events are held in memory (and dropped "
                "when that is full); trying again in {delay}s",
                failure,
                directory=self.spool.store.directory,
                delay=RECOVERY_RETRY,
            )
            if self.running:
                self._retry_call = self.reactor.callLater(RECOVERY_RETRY, self._recover)

        d.addCallbacks(recovered, failed)

    def reopen(self) -> None:
        """
        Reopen every sink's files (SIGHUP, after logrotate).
        """
        for sink in self.sinks:
            try:
                sink.reopen()
            except Exception:  # noqa: BLE001 - one sink must not stop the others
                self.log.failure("Reopening audit sink {sink} failed", sink=sink.name)

    def _install_sighup(self) -> None:
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reopen)
            if callable(previous):
                previous(signum, frame)

        self._previous_sighup = previous
        self._sighup_handler = on_sighup
        signal.signal(signal.SIGHUP, on_sighup)

    def _restore_sighup(self) -> None:
        if self._sighup_handler is not None and signal.getsignal(signal.SIGHUP) is self._sighup_handler:
            signal.signal(
                signal.SIGHUP,
                self._previous_sighup if self._previous_sighup is not None else signal.SIG_DFL,
            )
        self._sighup_handler = None

    def stopService(self) -> Deferred[None]:
        """
        Commit what is waiting, give the sinks ``stop_timeout`` seconds, record the
        acknowledgements, close the spool.
        """
        Service.stopService(self)
        self._restore_sighup()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._stop_after:
            # Each listener's drain is bounded by its own drain_timeout.
            await gatherResults([service.when_stopped() for service in self._stop_after])
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        deadline = self.reactor.seconds() + self.stop_timeout
        try:
            if self._recovering is not None:
                recovering = observe(self._recovering)
                recovering.addTimeout(self.stop_timeout, self.reactor)
                try:
                    await recovering
                except Exception:  # noqa: BLE001 - already logged by the recovery
                    pass
            flushing = self.spool.flush()
            flushing.addTimeout(max(0.1, deadline - self.reactor.seconds()), self.reactor)
            try:
                await flushing
            except Exception:  # noqa: BLE001 - stopping goes on
                self.log.failure("Writing the last audit events to the spool failed")
            if self._pumps_started:
                remaining = max(0.1, deadline - self.reactor.seconds())
                await gatherResults([pump.drain(remaining) for pump in self.pumps])
            # Requests that ended while the sinks drained: into the spool with them.
            last = self.spool.flush()
            last.addTimeout(max(0.1, deadline - self.reactor.seconds()), self.reactor)
            try:
                await last
            except Exception:  # noqa: BLE001 - stopping goes on
                self.log.failure("Writing the last audit events to the spool failed")
        finally:
            for pump in self.pumps:
                pump.stop()
            if self._opened:
                try:
                    await self.spool.close()
                except Exception:  # noqa: BLE001 - stopping goes on
                    self.log.failure("Closing the audit spool failed")
                self._opened = False
            for sink in self.sinks:
                try:
                    await maybeDeferred(sink.close)
                except Exception:  # noqa: BLE001 - stopping goes on
                    self.log.failure("Closing audit sink {sink} failed", sink=sink.name)


def _network_policy(audit: AuditConfig) -> BatchPolicy:
    return BatchPolicy(
        max_size=audit.batch_max_size,
        max_wait=audit.batch_max_wait,
        buffer_size=audit.batch_buffer_size,
        throttle_qps=audit.batch_throttle_qps,
        throttle_burst=audit.batch_throttle_burst,
        initial_backoff=audit.initial_backoff,
        max_in_flight=max(1, audit.batch_throttle_burst),
        max_batch_bytes=audit.truncate_max_batch_size if audit.truncate_enabled else None,
    )


def _log_policy(audit: AuditConfig) -> BatchPolicy:
    return BatchPolicy(
        max_size=max(audit.batch_max_size, 1000),
        max_wait=0.0,
        buffer_size=audit.batch_buffer_size,
        throttle_qps=None,
        initial_backoff=1.0,
        max_backoff=30.0,
        max_in_flight=1,
        max_batch_bytes=None,
    )


def _http_client(reactor: Any, tls: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from banyan_kproxy.proxy.upstream import quiet_pool

    if tls is None:
        agent = Agent(reactor, connectTimeout=10, pool=quiet_pool(reactor))
    else:
        agent = Agent(reactor, contextFactory=tls, connectTimeout=10, pool=quiet_pool(reactor))
    return HTTPClient(agent)


def audit_services(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    executor: Any = None,
    http_clients: dict[str, Any] | None = None,
    install_sighup: bool = True,
) -> tuple[Auditor | NullAuditor, list[IService]]:
    """
    The auditor for the proxy and the services to run, from ``[audit]`` and ``[banyan]``.

    Without ``[audit]``: a `NullAuditor` and no services.  ``executor`` runs blocking
    file work (default: the reactor's thread pool); ``http_clients`` may replace the
    ``webhook`` / ``banyan`` HTTP clients (tests).

    @raise AuditConfigError: a bad policy, webhook kubeconfig or setting; the
        message is one line naming the file (and the rule).
    """
    audit = config.audit
    if audit is None:
        return NullAuditor(), []
    http_clients = http_clients or {}
    executor = executor if executor is not None else thread_executor(reactor)
    try:
        policy = load_policy(audit.policy_file)
    except PolicyError as e:
        raise AuditConfigError(f"audit policy_file {e}") from None
    if audit.spool_max_bytes < MIN_SPOOL_BYTES:
        raise AuditConfigError(
            f"{config.path}: [audit] spool_max_bytes: {audit.spool_max_bytes} is too small "
            f"(at least {MIN_SPOOL_BYTES} bytes)"
        )
    sinks: list[tuple[Any, BatchPolicy]] = []
    if audit.webhook_config_file:
        target = load_webhook_target(audit.webhook_config_file)
        http = http_clients.get("webhook") or _http_client(reactor, target.tls)
        sinks.append((WebhookSink(target, http, reactor), _network_policy(audit)))
    if audit.log_file:
        sinks.append((LogFileSink(audit.log_file, executor), _log_policy(audit)))
    if config.banyan is not None:
        from banyan_kproxy.tls import TLSConfigError, https_policy

        http = http_clients.get("banyan")
        if http is None:
            try:
                http = _http_client(reactor, https_policy(None))
            except TLSConfigError as e:
                raise AuditConfigError(f"{config.path}: [banyan]: {e}") from None
        sinks.append((BanyanSink(config.banyan, http, reactor), _network_policy(audit)))
    if not sinks:
        raise AuditConfigError(
            f"{config.path}: [audit]: no sink: set webhook_config_file or log_file, "
            "or add a [banyan] section (events would only pile up in the spool)"
        )
    audit_metrics = AuditMetrics.create(metrics)
    max_event = audit.truncate_max_event_size if audit.truncate_enabled else None
    store = SegmentStore(audit.spool_dir, segment_size_for(audit.spool_max_bytes))
    spool = Spool(
        store=store,
        executor=executor,
        clock=reactor,
        max_bytes=audit.spool_max_bytes,
        max_pending=audit.batch_buffer_size,
        encode=functools.partial(encode_event, max_size=max_event),
        metrics=audit_metrics,
        write_errors=metrics.counter(
            "kproxy_audit_spool_write_errors_total",
            "Writes to the audit spool the disk refused (group commits and acknowledgements), "
            "by error: ENOSPC, EIO, EDQUOT, ...",
            ("error",),
        ),
        write_failing=metrics.gauge(
            "kproxy_audit_spool_write_failing",
            "1 while the audit spool cannot be written and audit events wait in memory.",
        ),
    )
    pumps = []
    for sink, batching in sinks:
        pump = SinkPump(sink, batching, spool, reactor, audit_metrics)
        spool.subscribe(pump)
        pumps.append(pump)
    service = AuditService(
        spool,
        pumps,
        reactor,
        install_sighup=install_sighup and any(isinstance(s, LogFileSink) for s, _ in sinks),
    )
    auditor = Auditor(
        policy=policy,
        accept=spool.accept,
        metrics=audit_metrics,
        body_limit=audit.truncate_max_event_size,
        reopen_sinks=service.reopen,
    )
    Logger().info(
        "Audit policy {source}: {summary}", source=policy.source, summary=describe(policy.rules)
    )
    return auditor, [service]
