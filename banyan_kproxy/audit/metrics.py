"""
The audit pipeline's series in the daemon's Prometheus registry.

Counters follow an event from generation to delivery: ``generated`` (built by the
proxy), ``spooled`` (accepted: written and fsync'd to the spool), ``sent`` (a sink
acknowledged it), ``retried`` (sent again after a failure), ``dropped`` (by reason;
every drop is also logged).  Gauges show what is held: ``buffered`` (in memory,
waiting for the spool or for a sink) and the spool's size.
"""

from __future__ import annotations

from typing import Any

import attr

from banyan_kproxy.health import Metrics

__all__ = ["AuditMetrics", "DROP_REASONS"]

#: Every ``reason`` label of ``kproxy_audit_events_dropped_total``.
DROP_REASONS = (
    "spool_full",  # the spool reached spool_max_bytes; the event was never accepted
    "backlog",  # more events waited for the disk than the buffer holds
    "spool_error",  # the disk refused writes (ENOSPC, EIO) longer than the held buffer lasted
    "too_large",  # over truncate_max_event_size even without request/response objects
    "unencodable",  # could not be turned into JSON (a bug; logged with the event's auditID)
    "stopped",  # arrived after the audit service stopped
    "corrupt",  # a spooled record failed its checksum when read back
    "internal_error",  # the proxy's audit call itself failed (a bug; logged)
)


@attr.s(auto_attribs=True, frozen=True)
class AuditMetrics:
    """
    Handles on the audit series; `create` registers them.
    """

    generated: Any
    spooled: Any
    sent: Any
    retried: Any
    dropped: Any
    truncated: Any
    buffered: Any
    spool_bytes: Any
    spool_full: Any
    sink_lag: Any

    @classmethod
    def create(cls, metrics: Metrics | None = None) -> AuditMetrics:
        """
        Register the audit series in ``metrics`` (a private registry when None).
        """
        metrics = metrics if metrics is not None else Metrics()
        return cls(
            generated=metrics.counter(
                "kproxy_audit_events_generated_total",
                "Audit events built for requests (every stage the policy keeps).",
            ),
            spooled=metrics.counter(
                "kproxy_audit_events_spooled_total",
                "Audit events accepted: written and fsync'd to the spool.",
            ),
            sent=metrics.counter(
                "kproxy_audit_events_sent_total",
                "Audit events a sink acknowledged, by sink.",
                ("sink",),
            ),
            retried=metrics.counter(
                "kproxy_audit_events_retried_total",
                "Audit events sent again after a failed attempt, by sink.",
                ("sink",),
            ),
            dropped=metrics.counter(
                "kproxy_audit_events_dropped_total",
                "Audit events lost, by reason (spool_full, backlog, too_large, ...).",
                ("reason",),
            ),
            truncated=metrics.counter(
                "kproxy_audit_events_truncated_total",
                "Audit events whose request/response objects were left out for size.",
            ),
            buffered=metrics.gauge(
                "kproxy_audit_events_buffered",
                "Audit events held in memory: waiting for the spool (queue=spool) or a sink.",
                ("queue",),
            ),
            spool_bytes=metrics.gauge(
                "kproxy_audit_spool_bytes",
                "Bytes of audit events in the spool not yet acknowledged by every sink.",
            ),
            spool_full=metrics.gauge(
                "kproxy_audit_spool_full",
                "1 while the spool is full and new audit events are being dropped.",
            ),
            sink_lag=metrics.gauge(
                "kproxy_audit_sink_lag_bytes",
                "Spooled bytes a sink has not acknowledged yet, by sink.",
                ("sink",),
            ),
        )

    def drop(self, reason: str, n: int = 1) -> None:
        """
        Count ``n`` events lost for ``reason``.
        """
        self.dropped.labels(reason=reason).inc(n)
