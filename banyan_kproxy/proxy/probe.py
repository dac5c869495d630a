"""
The health of what the proxy depends on, for ``/ready`` and ``/metrics``: the
Kubernetes API (`UpstreamHealth`) and the OIDC issuer (`IssuerHealth`).

`UpstreamHealth` learns whether the apiserver answers in two ways.  A periodic
``GET /readyz`` with the proxy's own credential, every ``[upstream] probe_interval``
and each waiting at most `PROBE_TIMEOUT`; and the data path: the upstream agent is
wrapped so that a request whose connection is refused, times out or whose host name
does not resolve marks the apiserver unreachable at once, and any response marks it
reachable again.  A load balancer polling ``/ready`` then takes a replica out as soon
as its apiserver is gone and puts it back as soon as it answers, without waiting
for the next probe.

kube-apiserver serves ``/readyz`` to every authenticated user (the built-in
``system:public-info-viewer`` ClusterRole), so the proxy's RBAC needs nothing more.
It answers 200 ``ok`` when ready and 500 listing the failed ``[-]`` checks when not,
for instance while it shuts down.

`IssuerHealth` reads the verifier's key-refresh state.  An issuer that cannot be
reached does not make the proxy unready while keys it fetched before are loaded:
tokens signed with those keys keep working, and taking every replica out of the
load balancer because the identity provider blipped would turn that blip into an
outage.  ``/ready`` stays 200 with a warning line, and the metrics show it.
"""

from __future__ import annotations

import time
from typing import Any

import attr
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.protocol import Protocol, connectionDone
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from banyan_kproxy.health import Metrics, ReadinessWarning
from banyan_kproxy.proxy.upstream import CredentialError, Upstream

__all__ = ["PROBE_TIMEOUT", "UpstreamHealth", "IssuerHealth"]

#: Longest wait for one ``GET /readyz`` (connection, TLS and answer), seconds.
PROBE_TIMEOUT = 5.0

#: The failed checks named in a not-ready answer, at most.
_MAX_CHECKS = 3

# What is known about the apiserver.
_UNKNOWN = "unknown"
_UP = "up"
_UNREACHABLE = "unreachable"  # no connection, or no answer
_NOT_READY = "not ready"  # it answered /readyz, but not with ok


def _reason(error: BaseException) -> str:
    """
    A short reason for a failure to reach the apiserver, for ``/ready`` and the log.
    """
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectTimeoutError | TCPTimedOutError):
        return "connection timed out"
    if isinstance(error, ResponseFailed):
        return "; ".join(_reason(f.value) for f in error.reasons) or "no answer"
    text = " ".join((str(error) or type(error).__name__).split())
    return text.rstrip(".")[:300]


def _failed_checks(body: bytes) -> str:
    """
    The failed ``[-]`` checks of a kube-apiserver ``/readyz`` answer, else its first line.
    """
    lines = body.decode("utf-8", "replace").splitlines()
    failed = [line[3:].strip() for line in lines if line.startswith("[-]")]
    if failed:
        more = len(failed) - _MAX_CHECKS
        return ", ".join(failed[:_MAX_CHECKS]) + (f" and {more} more" if more > 0 else "")
    return (lines[0].strip() if lines else "")[:200]


def duration(seconds: float) -> str:
    """
    ``seconds`` as ``45s``, ``3m12s``, ``2h5m`` or ``3d4h``.
    """
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@implementer(IAgent)
class _ObservedAgent:
    """
    An agent that tells `UpstreamHealth` what each request found: any response
    means reachable, a failed connection means unreachable.
    """

    def __init__(self, agent: Any, health: UpstreamHealth) -> None:
        self._agent = agent
        self._health = health

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        """
        The wrapped agent's request, observed.
        """
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, response: IResponse) -> IResponse:
        self._health.reachable()
        return response

    def _failed(self, failure: Failure) -> Failure:
        # Only what says the apiserver cannot be reached: not a cancellation (the
        # client went away), not a response header timeout, not a broken stream.
        if failure.check(ConnectError, DNSLookupError):
            self._health.unreachable(_reason(failure.value))
        return failure


@attr.s(auto_attribs=True, eq=False)
class UpstreamHealth:
    """
    Whether the Kubernetes API answers: probed every ``interval`` seconds (0: not
    probed, only requests tell) and told by the data path once `observe_requests`
    has wrapped the upstream agent.

    Start it with `start`, stop it with `stop`; `problem` is the ``/ready`` line
    while the apiserver cannot be used.
    """

    upstream: Upstream
    clock: IReactorTime
    interval: float
    timeout: float = PROBE_TIMEOUT
    #: ``GET /readyz`` probes that failed (no answer, refused credential, not ready).
    probe_failures: int = attr.ib(default=0, init=False)
    _state: str = attr.ib(default=_UNKNOWN, init=False)
    _why: str = attr.ib(default="", init=False)
    _since: float | None = attr.ib(default=None, init=False)
    _running: bool = attr.ib(default=False, init=False)
    _timer: IDelayedCall | None = attr.ib(default=None, init=False)
    _in_flight: Deferred[None] | None = attr.ib(default=None, init=False)
    log = Logger()

    @property
    def server(self) -> str:
        """
        The apiserver's URL, as configured.
        """
        return self.upstream.config.server

    def observe_requests(self) -> None:
        """
        Wrap the upstream's agent so that every request reports what it found.
        """
        self.upstream.agent = _ObservedAgent(self.upstream.agent, self)

    def register_metrics(self, metrics: Metrics) -> None:
        """
        ``kproxy_upstream_up`` and ``kproxy_upstream_probe_failures_total``.
        """
        metrics.gauge(
            "kproxy_upstream_up",
            "1 while the Kubernetes API answers (per /readyz probes and requests), else 0.",
            function=lambda: 0 if self.problem() else 1,
        )
        metrics.counter(
            "kproxy_upstream_probe_failures_total",
            "GET /readyz probes of the Kubernetes API that failed: no answer, the "
            "proxy's credential refused, or not ready.",
            function=lambda: self.probe_failures,
        )

    # -- what is known --------------------------------------------------------

    def problem(self) -> str | None:
        """
        The ``/ready`` line while the apiserver cannot be used, else ``None``.
        """
        state = self._state
        if state == _UP:
            return None
        if state == _UNKNOWN:
            if self.interval <= 0:
                return None
            return f"upstream: the Kubernetes API at {self.server} has not been checked yet"
        return f"upstream: the Kubernetes API at {self.server} is {state}: {self._why}"

    def reachable(self) -> None:
        """
        Something answered: unreachable no more.  (A not-ready answer to the probe
        stands until a probe finds it ready.)
        """
        if self._state == _UNKNOWN or self._state == _UNREACHABLE:
            self._set(_UP, "")

    def unreachable(self, why: str) -> None:
        """
        A connection to the apiserver failed for ``why``.
        """
        self._set(_UNREACHABLE, why)

    def _set(self, state: str, why: str) -> None:
        before = self._state
        self._state, self._why = state, why
        now = self.clock.seconds()
        if state == _UP:
            if before in (_UNREACHABLE, _NOT_READY) and self._since is not None:
                self.log.info(
                    "The Kubernetes API at {server} answers again, after {down}",
                    server=self.server,
                    down=duration(now - self._since),
                )
            self._since = None
        elif before not in (_UNREACHABLE, _NOT_READY):
            self._since = now
            self.log.warn(
                "The Kubernetes API at {server} is {state}: {why}; /ready answers 503 "
                "until it answers again",
                server=self.server,
                state=state,
                why=why,
            )

    # -- probing ----------------------------------------------------------------

    def start(self) -> None:
        """
        Probe now, then every ``interval`` seconds after each probe ends (never two
        at once); nothing when ``interval`` is 0.
        """
        if self._running or self.interval <= 0:
            return
        self._running = True
        self._tick()

    def stop(self) -> None:
        """
        Stop probing: cancel the next probe and the one in flight.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            self._in_flight.cancel()

    def _tick(self) -> None:
        self._timer = None
        if not self._running:
            return
        checking = self._in_flight = self.check()
        checking.addBoth(self._checked)

    def _checked(self, _: object) -> None:
        self._in_flight = None
        if self._running:
            self._timer = self.clock.callLater(self.interval, self._tick)

    def check(self) -> Deferred[None]:
        """
        Probe once: ``GET /readyz``, waiting at most ``timeout`` seconds.  The
        Deferred never fails.
        """
        probing = Deferred.fromCoroutine(self._probe())
        # Whatever error the cancelled request ends with, report the timeout.
        probing.addTimeout(
            self.timeout,
            self.clock,
            onTimeoutCancel=lambda result, timeout: Failure(TimeoutError()),
        )
        return probing.addErrback(self._probe_failed)

    async def _probe(self) -> None:
        headers = Headers({b"Accept": [b"text/plain"], b"User-Agent": [b"banyan-kproxy/probe"]})
        response = await self.upstream.request(b"GET", b"/readyz", headers)
        body = await _read_body(response)
        if 200 <= response.code < 300:
            self._set(_UP, "")
            return
        if response.code == 401:
            why = "GET /readyz answered 401: the proxy's own credential was refused"
        elif response.code >= 500:
            checks = _failed_checks(body)
            why = f"GET /readyz answered {response.code}" + (f" ({checks})" if checks else "")
        else:
            # Reachable and authenticated; /readyz may be forbidden by a trimmed
            # system:public-info-viewer, or missing on an old server.
            self._set(_UP, "")
            return
        self.probe_failures += 1
        self._set(_NOT_READY, why)

    def _probe_failed(self, failure: Failure) -> None:
        if not self._running:
            return  # stopped (the probe in flight was cancelled)
        self.probe_failures += 1
        error = failure.value
        if failure.check(TimeoutError):
            self._set(_UNREACHABLE, f"GET /readyz got no answer within {self.timeout:g}s")
        elif failure.check(CredentialError):
            self._set(_NOT_READY, str(error))
        else:
            if not failure.check(ConnectError, DNSLookupError, ResponseFailed):
                self.log.debug("Probing {server} failed: {failure}", server=self.server, failure=failure)
            self._set(_UNREACHABLE, _reason(error))


#: The most of a ``/readyz`` body the probe keeps (its list of failed checks).
PROBE_BODY_LIMIT = 64 * 1024


class _BodyReader(Protocol):
    """
    Collects up to `PROBE_BODY_LIMIT` bytes of a response body.

    Unlike ``twisted.web.client.readBody``, a cancelled read (the probe's timeout)
    does not later try to fire its Deferred a second time when the aborted
    connection reports its loss.
    """

    def __init__(self, done: Deferred[bytes]) -> None:
        self._done = done
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < PROBE_BODY_LIMIT:
            self._chunks.append(data[: PROBE_BODY_LIMIT - self._size])
            self._size += len(self._chunks[-1])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def _read_body(response: Any) -> Deferred[bytes]:
    """
    The body of ``response`` (at most `PROBE_BODY_LIMIT` bytes of it); cancelling
    aborts the connection.
    """
    reader: _BodyReader

    def cancel(d: Deferred[bytes]) -> None:
        transport = getattr(reader, "transport", None)
        if transport is not None:
            transport.stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(done)
    response.deliverBody(reader)
    return done


@attr.s(auto_attribs=True, eq=False)
class IssuerHealth:
    """
    The OIDC issuer as the verifier sees it: a ``/ready`` problem until keys are
    loaded, a warning while they cannot be refreshed, and metrics.
    """

    verifier: Any  # banyan_kproxy.identity.OIDCVerifier
    clock: IReactorTime

    def findings(self) -> list[str]:
        """
        ``/ready`` lines: a problem without keys, a `ReadinessWarning` with stale ones.
        """
        v = self.verifier
        if not v.ready:
            return [
                "oidc: signing keys not loaded" + (f" ({v.last_error})" if v.last_error else "")
            ]
        if v.failing_since is None:
            return []
        age = self.clock.seconds() - (v.keys_loaded_at or self.clock.seconds())
        return [
            ReadinessWarning(
                f"oidc: keys could not be refreshed since {_timestamp(v.failing_since)}: "
                f"{v.last_error}; serving with keys fetched {duration(age)} ago"
            )
        ]

    def register_metrics(self, metrics: Metrics) -> None:
        """
        ``kproxy_oidc_issuer_up``, ``kproxy_oidc_keys_age_seconds`` and
        ``kproxy_oidc_refresh_failures_total``.
        """
        v = self.verifier
        metrics.gauge(
            "kproxy_oidc_issuer_up",
            "1 while the issuer's last discovery and key fetch succeeded, else 0.",
            function=lambda: 1 if v.ready and v.failing_since is None else 0,
        )
        metrics.gauge(
            "kproxy_oidc_keys_age_seconds",
            "Seconds since the signing keys in use were fetched (absent until they are).",
            function=lambda: (
                None if v.keys_loaded_at is None else self.clock.seconds() - v.keys_loaded_at
            ),
        )
        metrics.counter(
            "kproxy_oidc_refresh_failures_total",
            "Discovery or key fetches from the issuer that failed.",
            function=lambda: v.fetch_failures,
        )
