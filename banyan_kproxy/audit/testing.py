"""
Test doubles for the audit pipeline, for this project's tests and anyone else's:
executors that run blocking work inline or on demand, a sink kept in memory, and
``twisted.web`` resources standing in for an audit webhook receiver and for the
Banyan REST API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from banyan_kproxy.audit.sinks import IAuditSink

__all__ = [
    "sync_executor",
    "ManualExecutor",
    "MemorySink",
    "WebhookReceiver",
    "BanyanAPIStandIn",
    "event_key",
]


def sync_executor(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run "blocking" work inline, for tests on a memory reactor.
    """
    return maybeDeferred(function, *args, **kwargs)


@attr.s(auto_attribs=True)
class ManualExecutor:
    """
    Holds blocking work until the test runs it, to look at the state in between.
    """

    calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = attr.Factory(list)

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((function, args, d))
        return d

    def run_one(self) -> None:
        """
        Run the oldest waiting call and fire its Deferred.
        """
        function, args, d = self.calls.pop(0)
        maybeDeferred(function, *args).chainDeferred(d)

    def run_all(self, limit: int = 1000) -> None:
        """
        Run waiting calls (and the calls they cause) until none is left.
        """
        for _ in range(limit):
            if not self.calls:
                return
            self.run_one()
        raise AssertionError("executor calls keep coming")


def event_key(event: dict[str, Any]) -> tuple[str, str]:
    """
    What identifies an audit event across redeliveries: its auditID and stage.
    """
    return (event["auditID"], event["stage"])


@implementer(IAuditSink)
@attr.s(auto_attribs=True, eq=False)
class MemorySink:
    """
    A sink that keeps batches in memory.  With ``manual`` each ``send`` waits for the
    test to call `succeed_next` or `fail_next`; otherwise it succeeds at once, unless
    ``failing`` is set.
    """

    name: str = "memory"
    manual: bool = False
    failing: bool = False
    batches: list[list[dict[str, Any]]] = attr.Factory(list)
    attempts: list[list[dict[str, Any]]] = attr.Factory(list)
    waiting: list[tuple[list[dict[str, Any]], Deferred[None]]] = attr.Factory(list)
    reopened: int = 0
    closed: bool = False

    def send(self, events: list[bytes]) -> Deferred[None]:
        """
        Record an attempt; succeed, fail or wait as configured.
        """
        batch = [json.loads(e) for e in events]
        self.attempts.append(batch)
        if self.manual:
            d: Deferred[None] = Deferred()
            self.waiting.append((batch, d))
            return d
        if self.failing:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError("receiver down"))
        self.batches.append(batch)
        return succeed(None)

    def succeed_next(self) -> list[dict[str, Any]]:
        """
        Acknowledge the oldest waiting batch.
        """
        batch, d = self.waiting.pop(0)
        self.batches.append(batch)
        d.callback(None)
        return batch

    def fail_next(self, error: Exception | None = None) -> list[dict[str, Any]]:
        """
        Fail the oldest waiting batch.
        """
        batch, d = self.waiting.pop(0)
        d.errback(error or ConnectionRefusedError("receiver down"))
        return batch

    @property
    def events(self) -> list[dict[str, Any]]:
        """
        Every acknowledged event, in delivery order.
        """
        return [e for batch in self.batches for e in batch]

    def reopen(self) -> None:
        """
        Count reopen requests.
        """
        self.reopened += 1

    def close(self) -> None:
        """
        Note the close.
        """
        self.closed = True


class WebhookReceiver(Resource):
    """
    An audit webhook receiver: records every ``EventList`` POSTed to it, with the
    time it arrived on ``clock``.  While ``status`` is not 200 it answers that
    status and keeps nothing.
    """

    isLeaf = True

    def __init__(self, clock: Any = None, status: int = 200) -> None:
        super().__init__()
        self.clock = clock
        self.status = status
        self.batches: list[list[dict[str, Any]]] = []
        self.times: list[float] = []
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]]]] = []
        self.refused = 0
        self.arrived: list[Deferred[None]] = []

    def render_POST(self, request: Request) -> bytes:
        """
        Keep the batch (or refuse it while down).
        """
        body = request.content.read()
        headers = {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((body, headers))
        if self.status != 200:
            self.refused += 1
            request.setResponseCode(self.status)
            return b'{"error":"down"}'
        document = json.loads(body)
        assert document["kind"] == "EventList" and document["apiVersion"] == "audit.k8s.io/v1"
        self.batches.append(document["items"])
        self.times.append(self.clock.seconds() if self.clock is not None else 0.0)
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            d.callback(None)
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    def next_batch(self) -> Deferred[None]:
        """
        Fires when the next batch is kept.
        """
        d: Deferred[None] = Deferred()
        self.arrived.append(d)
        return d

    @property
    def events(self) -> list[dict[str, Any]]:
        """
        Every kept event, in arrival order (repeats included).
        """
        return [e for batch in self.batches for e in batch]

    def unique(self) -> dict[tuple[str, str], dict[str, Any]]:
        """
        The kept events by (auditID, stage); a repeat must be identical to the first.
        """
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for event in self.events:
            key = event_key(event)
            if key in seen and seen[key] != event:
                raise AssertionError(f"event {key} was delivered twice with different content")
            seen.setdefault(key, event)
        return seen


class BanyanAPIStandIn(Resource):
    """
    The parts of the Banyan REST API the audit sink uses: ``POST
    /api/v1/refresh_token`` (Bearer refresh token in, ``{"Message": access token}``
    out) and the events path (Bearer access token).  `expire` invalidates the
    access tokens handed out so far.
    """

    isLeaf = True

    def __init__(self, refresh_token: str, events_path: str = "/api/v1/kube_audit_events") -> None:
        super().__init__()
        self.refresh_token = refresh_token
        self.events_path = events_path
        self.valid: set[str] = set()
        self.issued = 0
        self.posts: list[dict[str, Any]] = []
        self.unauthorized = 0

    def expire(self) -> None:
        """
        Make every access token issued so far invalid.
        """
        self.valid.clear()

    def _bearer(self, request: Request) -> str:
        value = (request.getHeader(b"authorization") or b"").decode("ascii", "replace")
        return value[7:] if value.startswith("Bearer ") else ""

    def render_POST(self, request: Request) -> bytes:
        """
        Exchange a refresh token, or take a batch of events.
        """
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/api/v1/refresh_token":
            if self._bearer(request) != self.refresh_token:
                request.setResponseCode(401)
                return b'{"Message":"invalid refresh token"}'
            self.issued += 1
            token = f"access-{self.issued}"
            self.valid.add(token)
            return json.dumps({"Message": token}).encode()
        if request.path == self.events_path.encode():
            if self._bearer(request) not in self.valid:
                self.unauthorized += 1
                request.setResponseCode(401)
                return b'{"Message":"token expired"}'
            self.posts.append(json.loads(request.content.read()))
            return b"{}"
        request.setResponseCode(404)
        return b"{}"


def load_driver(argv: list[str]) -> None:
    """
    A child process that runs the audit service alone and feeds it requests at a
    steady rate: the process-level tests kill it with SIGKILL mid-stream.

    ``argv[0]`` is JSON: ``audit`` (`AuditConfig` keyword arguments), ``run`` (a
    prefix for the audit IDs, which are ``<run>-<000000>`` in order), ``rate``
    (events a second; 0 for none) and ``count`` (stop after that many; 0 for no
    limit).  It prints ``spooled <n>`` whenever the number of accepted events grows:
    since events are committed in the order they were generated, the first ``n``
    IDs are then on disk.
    """
    import sys

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    from banyan_kproxy.audit.service import audit_services
    from banyan_kproxy.config import AuditConfig, Config
    from banyan_kproxy.health import Metrics
    from banyan_kproxy.identity import Identity

    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    settings = json.loads(argv[0])
    config = Config("load-driver.ini", audit=AuditConfig(**settings["audit"]))
    metrics = Metrics()
    auditor, services = audit_services(config, reactor, metrics, install_sighup=False)
    (service,) = services
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    run, rate, count = settings["run"], settings.get("rate", 0), settings.get("count", 0)
    user = Identity("banyan:load@example.com", ("banyan:load", "system:authenticated"))
    state = {"generated": 0, "reported": -1}
    tick = 0.01

    def generate() -> None:
        due = int(rate * tick) or 1
        for _ in range(due):
            n = state["generated"]
            if count and n >= count:
                return
            now = reactor.seconds()
            record = auditor.begin(
                audit_id=f"{run}-{n:06d}", method="GET", uri=f"/api/v1/namespaces/load/pods/p-{n}",
                source_ips=["127.0.0.1"], user_agent="audit-load-driver", received_at=now, user=user,
            )
            record.response_complete(200, now)
            state["generated"] = n + 1

    def report() -> None:
        spooled = int(service.spool.metrics.spooled._only.get())
        if spooled != state["reported"]:
            state["reported"] = spooled
            sys.stdout.write(f"spooled {spooled}\n")
            sys.stdout.flush()

    if rate:
        LoopingCall(generate).start(tick)
    LoopingCall(report).start(0.005)
    sys.stdout.write("started\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    import sys

    load_driver(sys.argv[1:])
