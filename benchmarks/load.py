"""
Load and leak check: many concurrent connections through the real daemon, mixing
small authenticated GETs, long watches and exec tunnels, with zero errors allowed
and the daemon's open descriptors and memory checked afterwards.  A program, not a
timed test: it prints a report (``--json FILE`` also writes it) and exits non-zero
when a check fails; ``tests/test_load.py`` runs a short form of it.

What runs where (the machine has 2 cores):

- This process: a `LoopbackStack` (throwaway CA, the development OIDC issuer, the
  Kubernetes API stand-in) and the phase control: an event emitter that adds and
  deletes pods in ``default`` (one event per tick), and the measurements.
- The daemon: ``twistd -n banyan-kproxy`` in a child process, as operators run it.
- The clients: ``--workers`` child processes (``load.py --worker CONFIG``), each
  running its share of the connections on its own reactor.  The load generator is
  kept out of this process so that the stand-in answering the daemon and the
  clients do not share one reactor and one core: a starved client reactor would
  read its responses late and report timeouts that are its own.  The clients are
  also paced (each GET connection waits about ``--get-interval`` seconds between
  requests, tunnels pause between echo rounds), so the generator does not saturate
  the machine; the report gives each process's CPU time so that can be checked.

The mix, per connection: about 70 % keep-alive connections looping small GETs
(each user cycles through requests whose status is known in advance: 200 for pods,
lists, logs and ``/version``, 403 for what RBAC forbids, 401 for a token with the
wrong audience); about 20 % watches (a LIST, then a watch from the list's
resourceVersion with a random ``timeoutSeconds``, re-watched from the last event
seen when the stand-in ends it, as an informer does); about 10 % exec tunnels
(``cat`` over WebSocket ``v5.channel.k8s.io``, with the token in the
``Authorization`` header or in the ``Sec-WebSocket-Protocol`` entry, and over
SPDY/3.1; random bytes echoed back and compared byte for byte; every fifth attempt
by a reader, which the apiserver refuses with 403), each tunnel re-opened when it
ends.  Eight users (six readers, two admins) share the connections.

Errors are counted exactly, by kind: ``connect`` (TCP or TLS failed), ``reset`` (a
connection broke during a request, stream or tunnel), ``timeout`` (an operation
took longer than ``--op-timeout``), ``status`` (a status other than the expected
one), ``body`` (a response body that is not what was asked for), ``watch-gap`` (a
watch event missing, repeated or out of order: the emitter is the only writer
during a phase, so the pod events' resourceVersions are consecutive), ``watch-missing``
(a watch that had not received the last event when the phase stopped),
``exec-bytes`` (echoed bytes differ), ``exec-status`` (no ``Success`` status or no
clean close), ``daemon`` (its metrics disagree with what the clients saw) and
``worker`` (a client process failed).

Leak checks, on the daemon process:

- Descriptors.  The daemon's descriptors are sorted by kind (``/proc/PID/fd``
  joined with ``/proc/net/tcp``): listeners, client connections (to the proxy
  port), upstream connections (to the stand-in), issuer connections, health
  connections, other sockets, pipes and the like, and files by directory.  After
  each phase (the warm-up's is the baseline), once the clients are done, a bounded
  wait until the daemon is quiet: no client connection, the metrics below at 0,
  and every upstream socket accounted for -- the upstream ``HTTPConnectionPool``
  keeps idle persistent connections (at most ``[upstream] max_connections``, 256),
  so their number must equal the stand-in's open connections, each an idle HTTP/1.1
  channel (no request in progress, none upgraded), and be at most 256; a leaked
  tunnel or stream would show as an upgraded or busy one.  Then the stand-in and
  the issuer close their idle keep-alive connections, as a server's idle timeout
  does, and after a second bounded wait the daemon must hold exactly the baseline's
  descriptors, kind by kind, except for at most `PROBE_CONNECTIONS` (one) new idle
  upstream connection: its periodic ``GET /readyz`` probe opens it.
- Memory.  CPython does not give freed memory back, so RSS after the first phase
  is a high-water mark, not a leak measure.  The same phase runs twice (``--phases``)
  and the growth of VmRSS over a repeated phase must stay within ``--rss-margin-mib``
  (8 MiB; 4 MiB in the short form).  Measured on a shared 2-core VM: a repeated
  full phase grew by 1.5-2 MiB; 8 MiB over its 13,000-17,000 requests is about
  600 bytes per request, and the short form caught a leak of 2 KiB per request
  injected into the daemon.  Both growths (first phase over the baseline, each
  repeat over the one before) are reported.
- Metrics.  Afterwards ``/metrics`` must show ``kproxy_open_streams``,
  ``kproxy_open_tunnels`` and ``kproxy_requests_in_flight`` at 0, the
  ``kproxy_requests_total`` increase per status code must equal the responses the
  clients received, and ``kproxy_upstream_errors_total`` must not have grown
  (other than ``client_gone``).

Run: ``make load`` (500 connections, 60 s, two phases), or
``PYTHONPATH=. python benchmarks/load.py --connections 100 --duration 10``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import attr  # noqa: E402
from attr import frozen  # noqa: E402
from twisted.internet.defer import (  # noqa: E402
    CancelledError,
    Deferred,
    TimeoutError as DeferredTimeout,
    gatherResults,
)
from twisted.internet.protocol import ProcessProtocol, Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

#: The pod every request reads, its log text, and the namespace the emitter writes.
POD = "web-1"
NAMESPACE = "default"
POD_LOG = "".join(f"line {i}: the load pod's log\n" for i in range(20))
#: Pods the emitter keeps at most (so lists stay small).
LIVE_PODS = 8
#: The pool size of the daemon's upstream HTTPConnectionPool ([upstream] max_connections).
UPSTREAM_POOL = 256
#: Upstream connections the daemon may hold after the stand-in closed the idle ones:
#: its own ``GET /readyz`` probe ([upstream] probe_interval, 5 s) opens one again.
PROBE_CONNECTIONS = 1
USER_AGENT = b"banyan-kproxy-load/1"


@frozen
class Settings:
    """
    One load run: how many connections, for how long, and how they behave.
    """

    connections: int = 500
    duration: float = 60.0
    #: Phases at full load after the warm-up; the second and later check RSS growth.
    phases: int = 2
    workers: int = 2
    #: Shares of the connections that watch and that run exec tunnels (the rest GET).
    watch_share: float = 0.2
    exec_share: float = 0.1
    #: Mean seconds a GET connection waits between requests (uniform 0.5x-1.5x).
    get_interval: float = 1.0
    #: Seconds between two pod events of the emitter.
    event_interval: float = 0.2
    #: timeoutSeconds of each watch, drawn between these.
    watch_timeout: tuple[int, int] = (15, 45)
    #: Echo rounds per tunnel, the pause between them, and the largest message.
    exec_rounds: int = 6
    exec_pause: float = 0.3
    exec_max_bytes: int = 16384
    #: Seconds over which the connections are opened at the start of a phase.
    ramp: float = 5.0
    #: Longest any single operation (connect, request, echo round) may take.
    op_timeout: float = 30.0
    #: How long, after a phase, the clients have to finish and the daemon to settle.
    stop_timeout: float = 30.0
    settle_timeout: float = 30.0
    warmup_connections: int = 50
    warmup_duration: float = 4.0
    rss_margin_mib: float = 8.0
    #: Audit events to a JSON-lines log file (with the durable spool), as in production.
    audit: bool = True
    seed: int = 1

    @classmethod
    def short(cls) -> Settings:
        """
        The form CI runs: 100 connections, 8 s phases of about 2,000 requests,
        shorter watches and tunnels, and a 4 MiB RSS margin (measured: a repeated
        phase grew by 0.9-2.1 MiB without a leak, by 6.2 MiB with a leak of 2 KiB
        per request injected into the daemon).
        """
        return cls(
            connections=100, duration=8.0, get_interval=0.25, event_interval=0.1,
            watch_timeout=(2, 5), exec_rounds=4, exec_pause=0.2, ramp=1.0,
            warmup_connections=30, warmup_duration=2.0, rss_margin_mib=4.0,
        )


# -- the client side (worker processes) ---------------------------------------------------


class _Tally:
    """
    What one worker's clients did and what went wrong, counted exactly.
    """

    #: Error details kept verbatim (all are counted).
    SAMPLES = 50

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: list[str] = []
        self.watches: list[dict[str, int]] = []
        self.exec_bytes = 0

    def op(self, name: str, seconds: float) -> None:
        self.ops[name] += 1
        self.latency[name].append(round(seconds * 1000.0, 2))

    def code(self, code: int) -> None:
        """
        A response head from the daemon (what its ``kproxy_requests_total`` counts).
        """
        self.codes[str(code)] += 1

    def error(self, kind: str, client: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < self.SAMPLES:
            self.samples.append(f"{kind}: {client}: {detail}"[:400])

    def to_json(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops), "codes": dict(self.codes), "latency": dict(self.latency),
            "errors": dict(self.errors), "samples": self.samples, "watches": self.watches,
            "exec_bytes": self.exec_bytes,
        }


def _error_kind(failure: BaseException) -> str:
    if isinstance(failure, DeferredTimeout | CancelledError):
        return "timeout"
    return "reset"


def _describe(error: BaseException) -> str:
    from twisted.web.client import ResponseFailed

    if isinstance(error, ResponseFailed):
        return "; ".join(_describe(f.value) for f in error.reasons) or "response failed"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {' '.join(text.split())[:200]}"


class _ClientError(Exception):
    """
    A check failed; ``kind`` is the error kind it is counted under.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class _Worker:
    """
    One worker process: its clients, the stop signal and the tally.
    """

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        from twisted.internet import ssl

        self.reactor = reactor
        self.config = config
        self.port = int(config["proxy_port"])
        with open(config["ca_file"], "rb") as f:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        # kubectl offers ALPN, so these clients do too (DESIGN §4: answer it).
        self.tls = ssl.optionsForClientTLS(
            "127.0.0.1", trustRoot=trust, acceptableProtocols=[b"http/1.1"]
        )
        self.tally = _Tally()
        self.stopping = False
        self.final_rv = 0
        self._wakeups: list[Deferred[None]] = []
        self.on_stop: list[Callable[[], Any]] = []
        self.timeout = float(config["op_timeout"])

    # -- time

    def now(self) -> float:
        return self.reactor.seconds()

    def pause(self, seconds: float) -> Deferred[None]:
        """
        Sleep, waking early when the phase stops.
        """
        d: Deferred[None] = Deferred()
        if self.stopping:
            d.callback(None)
            return d
        call = self.reactor.callLater(seconds, lambda: d.called or d.callback(None))
        self._wakeups.append(d)

        def forget(result: object) -> object:
            if call.active():
                call.cancel()
            if d in self._wakeups:
                self._wakeups.remove(d)
            return result

        return d.addBoth(forget)

    def stop(self, final_rv: int) -> None:
        """
        The phase is over: finish what is in progress; watches wait for ``final_rv``.
        """
        self.stopping = True
        self.final_rv = final_rv
        for d in list(self._wakeups):
            if not d.called:
                d.callback(None)
        for hook in self.on_stop:
            hook()

    def timed(self, d: Deferred[Any], seconds: float | None = None) -> Deferred[Any]:
        return d.addTimeout(self.timeout if seconds is None else seconds, self.reactor)

    # -- connections

    def endpoint(self) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

        return wrapClientTLS(
            self.tls, TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=self.timeout)
        )

    def headers(self, token: str) -> Any:
        from twisted.web.http_headers import Headers

        return Headers({
            b"host": [b"127.0.0.1:%d" % self.port],
            b"authorization": [b"Bearer " + token.encode("ascii")],
            b"user-agent": [USER_AGENT],
            b"accept": [b"application/json"],
        })


class _HTTP:
    """
    One keep-alive HTTPS connection to the proxy (Twisted's HTTP/1.1 client protocol).
    """

    def __init__(self, worker: _Worker) -> None:
        from twisted.web._newclient import HTTP11ClientProtocol

        self.worker = worker
        self.protocol = HTTP11ClientProtocol()

    async def open(self) -> None:
        from twisted.internet.endpoints import connectProtocol

        await self.worker.timed(connectProtocol(self.worker.endpoint(), self.protocol))

    @property
    def usable(self) -> bool:
        return self.protocol.state == "QUIESCENT"

    def send(self, path: str, token: str) -> Deferred[Any]:
        from twisted.web._newclient import Request

        request = Request(b"GET", path.encode("ascii"), self.worker.headers(token), None, persistent=True)
        return self.protocol.request(request)

    async def get(self, path: str, token: str) -> tuple[int, bytes]:
        """
        One request and its whole body.
        """
        response = await self.worker.timed(self.send(path, token))
        self.worker.tally.code(response.code)
        body = await self.worker.timed(_read_body(response))
        return response.code, body

    def close(self) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.loseConnection()


class _Body(Protocol):
    """
    Collects a response body; ``done`` fires with it, or fails if it broke off.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


def _read_body(response: Any) -> Deferred[bytes]:
    body = _Body()
    response.deliverBody(body)
    return body.done


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise _ClientError("body", f"not JSON: {body[:80]!r}")


def _check_kind(kind: str, name: str | None = None) -> Callable[[bytes], None]:
    def check(body: bytes) -> None:
        obj = _json(body)
        if obj.get("kind") != kind:
            raise _ClientError("body", f"kind {obj.get('kind')!r}, wanted {kind}")
        if name is not None and (obj.get("metadata") or {}).get("name") != name:
            raise _ClientError("body", f"object {(obj.get('metadata') or {}).get('name')!r}")

    return check


def _check_status(code: int, reason: str) -> Callable[[bytes], None]:
    def check(body: bytes) -> None:
        obj = _json(body)
        if (obj.get("kind"), obj.get("code"), obj.get("reason")) != ("Status", code, reason):
            raise _ClientError("body", f"not a {code} {reason} Status: {body[:120]!r}")

    return check


def _check_version(body: bytes) -> None:
    if "gitVersion" not in _json(body):
        raise _ClientError("body", f"no gitVersion: {body[:80]!r}")


def _check_log(body: bytes) -> None:
    if body != POD_LOG.encode("utf-8"):
        raise _ClientError("body", f"log differs: {body[:80]!r}")


#: (operation, path, token role, expected status, body check) cycled by GET connections.
_READER_CYCLE: list[tuple[str, str, str, int, Callable[[bytes], None]]] = [
    ("get-pod", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}", "own", 200, _check_kind("Pod", POD)),
    ("list-pods", f"/api/v1/namespaces/{NAMESPACE}/pods", "own", 200, _check_kind("PodList")),
    ("forbidden", "/api/v1/namespaces/kube-system/pods", "own", 403, _check_status(403, "Forbidden")),
    ("version", "/version", "own", 200, _check_version),
    ("pod-log", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}/log", "own", 200, _check_log),
    ("bad-token", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}", "bad", 401,
     _check_status(401, "Unauthorized")),
]
_ADMIN_CYCLE: list[tuple[str, str, str, int, Callable[[bytes], None]]] = [
    ("list-system-pods", "/api/v1/namespaces/kube-system/pods", "own", 200, _check_kind("PodList")),
    ("get-pod", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}", "own", 200, _check_kind("Pod", POD)),
    ("list-namespaces", "/api/v1/namespaces", "own", 200, _check_kind("NamespaceList")),
    ("version", "/version", "own", 200, _check_version),
    ("pod-log", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}/log", "own", 200, _check_log),
    ("bad-token", f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}", "bad", 401,
     _check_status(401, "Unauthorized")),
]


class _Client:
    """
    What the three kinds of client share: identity, randomness, error accounting.
    """

    def __init__(self, worker: _Worker, spec: dict[str, Any]) -> None:
        self.worker = worker
        self.spec = spec
        self.name = f"{spec['kind']}-{spec['id']}"
        self.user = spec["user"]
        self.token = worker.config["tokens"][self.user]
        self.admin = self.user.startswith("admin")
        self.random = random.Random(int(worker.config["seed"]) * 100003 + int(spec["id"]))

    def fail(self, error: BaseException) -> None:
        if isinstance(error, _ClientError):
            self.worker.tally.error(error.kind, self.name, str(error))
        else:
            self.worker.tally.error(_error_kind(error), self.name, _describe(error))

    async def run(self) -> None:
        await self.worker.pause(float(self.spec["start_delay"]))
        try:
            await self.loop()
        except Exception as e:  # noqa: BLE001 - counted; the report shows it
            self.worker.tally.error("worker", self.name, f"client crashed: {_describe(e)}")

    async def loop(self) -> None:
        raise NotImplementedError()


class _GetClient(_Client):
    """
    A keep-alive connection looping small GETs, each with a known expected status.
    """

    async def loop(self) -> None:
        worker = self.worker
        cycle = _ADMIN_CYCLE if self.admin else _READER_CYCLE
        step = int(self.spec["id"])
        interval = float(worker.config["get_interval"])
        while not worker.stopping:
            connection = _HTTP(worker)
            try:
                await connection.open()
            except Exception as e:  # noqa: BLE001
                self.worker.tally.error("connect", self.name, _describe(e))
                await worker.pause(1.0)
                continue
            try:
                while not worker.stopping:
                    if not connection.usable:
                        raise _ClientError("reset", f"the proxy closed the connection ({connection.protocol.state})")
                    op, path, who, expected, check = cycle[step % len(cycle)]
                    step += 1
                    token = self.token if who == "own" else worker.config["bad_token"]
                    started = worker.now()
                    code, body = await connection.get(path, token)
                    if code != expected:
                        raise _ClientError("status", f"{op} {path}: {code}, wanted {expected}: {body[:120]!r}")
                    check(body)
                    worker.tally.op(op, worker.now() - started)
                    await worker.pause(interval * self.random.uniform(0.5, 1.5))
            except Exception as e:  # noqa: BLE001
                self.fail(e)
            finally:
                connection.close()


class _WatchReader(Protocol):
    """
    Reads a watch stream: one JSON event per line, resourceVersions consecutive.
    """

    def __init__(self, client: _WatchClient) -> None:
        self.client = client
        self.buffer = b""
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.client.event(line)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


class _WatchClient(_Client):
    """
    LIST, then watch from the list's resourceVersion; re-watch from the last event
    seen whenever the stand-in ends the watch (its ``timeoutSeconds``); after an
    error, count it and re-list, as an informer does.  When the phase stops, close
    the connection once the emitter's last event is in (or count it missing after
    ``stop_timeout``).
    """

    def __init__(self, worker: _Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.first_rv = 0
        self.last_rv = 0
        self.listed = False
        self.relist = False
        self.events = 0
        self.watches = 0
        self.cut = False
        self.finished = False
        # A request was sent and its response (head, or a list's body) not yet read.
        self.waiting = False
        self.connection: _HTTP | None = None
        self._give_up: Any = None
        worker.on_stop.append(self.phase_stopped)

    def event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            rv = int(event["object"]["metadata"]["resourceVersion"])
        except (ValueError, KeyError, TypeError):
            self.worker.tally.error("body", self.name, f"bad watch event {line[:120]!r}")
            self._relist()
            return
        if kind not in ("ADDED", "DELETED", "MODIFIED"):
            self.worker.tally.error("watch-gap", self.name, f"{kind} event: {line[:160]!r}")
            self._relist()
            return
        if rv != self.last_rv + 1:
            self.worker.tally.error(
                "watch-gap", self.name, f"event resourceVersion {rv} after {self.last_rv}"
            )
        self.last_rv = max(self.last_rv, rv)
        self.events += 1
        self.check_done()

    def _relist(self) -> None:
        self.relist = True
        if self.connection is not None:
            self.connection.close()

    def phase_stopped(self) -> None:
        """
        The phase stopped: cut now if caught up, else give the last events a while.
        """
        if self.finished:
            return
        if not self.check_done():
            self._give_up = self.worker.reactor.callLater(
                float(self.worker.config["stop_timeout"]), self.missing
            )

    def check_done(self) -> bool:
        """
        Whether the phase stopped and the last event is in; cut the connection then,
        unless a response head is on its way (the daemon has counted that response,
        so the client must see it too: `watch` and `step` check again after it).
        """
        if self.worker.stopping and self.listed and self.last_rv >= self.worker.final_rv:
            if not self.waiting:
                self.cut_now()
            return True
        return False

    def missing(self) -> None:
        self._give_up = None
        self.worker.tally.error(
            "watch-missing", self.name,
            f"last event {self.last_rv}, the emitter's last {self.worker.final_rv}",
        )
        self.cut_now()

    def cut_now(self) -> None:
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        self._give_up = None
        if not self.cut:
            self.cut = True
            if self.connection is not None:
                self.connection.close()

    async def loop(self) -> None:
        try:
            while not self.cut:
                try:
                    await self.step()
                except Exception as e:  # noqa: BLE001
                    if self.cut:
                        break
                    self.fail(e)
                    self.listed = self.relist = False
                    if self.connection is not None:
                        self.connection.close()
                        self.connection = None
                    await self.worker.pause(0.5)
        finally:
            self.finished = True
            self.cut_now()
            if self.connection is not None:
                self.connection.close()
            self.worker.tally.watches.append({
                "first_rv": self.first_rv, "last_rv": self.last_rv, "events": self.events,
                "watches": self.watches,
            })

    async def step(self) -> None:
        """
        Connect, list, or watch once, whichever comes next.
        """
        worker = self.worker
        if self.connection is None:
            self.connection = _HTTP(worker)
            try:
                await self.connection.open()
            except Exception as e:  # noqa: BLE001
                raise _ClientError("connect", _describe(e))
            return
        if not self.connection.usable:
            raise _ClientError("reset", f"the proxy closed the connection ({self.connection.protocol.state})")
        if not self.listed:
            started = worker.now()
            self.waiting = True
            try:
                code, body = await self.connection.get(f"/api/v1/namespaces/{NAMESPACE}/pods", self.token)
            finally:
                self.waiting = False
            if code != 200:
                raise _ClientError("status", f"list {code}: {body[:120]!r}")
            listed = _json(body)
            if POD not in [i["metadata"]["name"] for i in listed.get("items", [])]:
                raise _ClientError("body", f"{POD} missing from the list")
            self.last_rv = int(listed["metadata"]["resourceVersion"])
            self.first_rv = self.first_rv or self.last_rv
            self.listed = True
            worker.tally.op("list-for-watch", worker.now() - started)
            self.check_done()
            return
        low, high = worker.config["watch_timeout"]
        await self.watch(self.connection, self.random.randint(low, high))

    async def watch(self, connection: _HTTP, seconds: int) -> None:
        from twisted.web.client import ResponseDone

        worker = self.worker
        path = (f"/api/v1/namespaces/{NAMESPACE}/pods?watch=1&resourceVersion={self.last_rv}"
                f"&timeoutSeconds={seconds}")
        started = worker.now()
        self.waiting = True
        try:
            response = await worker.timed(connection.send(path, self.token))
        finally:
            self.waiting = False
        worker.tally.code(response.code)
        if response.code != 200:
            body = await worker.timed(_read_body(response))
            raise _ClientError("status", f"watch {response.code}: {body[:120]!r}")
        worker.tally.op("watch-start", worker.now() - started)
        self.watches += 1
        if self.check_done():
            return
        reader = _WatchReader(self)
        response.deliverBody(reader)
        # The stand-in ends the stream after ``seconds``; at the phase's end it is
        # cut once the last event is in.
        await worker.timed(reader.done, seconds + worker.timeout)
        if self.cut:
            return
        if self.relist:
            # A bad event was counted and the connection closed: start over.
            self.relist = self.listed = False
            self.connection = None
            return
        reason = reader.reason
        assert reason is not None
        if not reason.check(ResponseDone):
            raise _ClientError("reset", f"watch stream broke off: {_describe(reason.value)}")


class _RawUpgrade(Protocol):
    """
    An upgrade request on a raw TLS connection: the response head, then the bytes
    that follow it go to ``sink``.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head: Deferred[tuple[int, dict[bytes, list[bytes]]]] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._buffer = b""
        self._sink: Callable[[bytes], Any] | None = None
        self._after: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
            return
        if self.head.called:
            self._after.append(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > 65536:
                self.transport.abortConnection()
            return
        raw, rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        if rest:
            self._after.append(rest)
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        headers: dict[bytes, list[bytes]] = collections.defaultdict(list)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()].append(value.strip())
        try:
            code = int(parts[1])
        except (IndexError, ValueError):
            code = 0
        self.head.callback((code, headers))

    def sink(self, receive: Callable[[bytes], Any]) -> None:
        """
        Hand what follows the head (already received and to come) to ``receive``.
        """
        self._sink = receive
        pending, self._after = b"".join(self._after), []
        if pending:
            receive(pending)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.head.called:
            self.head.errback(reason)
        self.reason = reason
        self.lost.callback(None)


class _ExecClient(_Client):
    """
    ``cat`` tunnels, one after another: WebSocket v5 (two in three) or SPDY/3.1,
    random bytes echoed and compared; every fifth attempt by a reader (403).
    """

    def __init__(self, worker: _Worker, spec: dict[str, Any]) -> None:
        super().__init__(worker, spec)
        self.attempt = int(spec["id"])

    async def loop(self) -> None:
        worker = self.worker
        while not worker.stopping:
            self.attempt += 1
            started = worker.now()
            try:
                if self.attempt % 5 == 4:
                    await self.forbidden()
                    worker.tally.op("exec-forbidden", worker.now() - started)
                elif self.attempt % 3 == 2:
                    worker.tally.exec_bytes += await self.tunnel(spdy=True)
                    worker.tally.op("exec-spdy", worker.now() - started)
                else:
                    worker.tally.exec_bytes += await self.tunnel(spdy=False)
                    worker.tally.op("exec-websocket", worker.now() - started)
            except Exception as e:  # noqa: BLE001
                self.fail(e)
                await worker.pause(0.5)

    def _request(self, spdy: bool, token: str, in_protocol: bool) -> tuple[bytes, bytes]:
        key = base64.b64encode(os.urandom(16))
        path = (f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}/exec?command=cat&stdin=true&stdout=true"
                "&stderr=true").encode("ascii")
        lines = [
            (b"POST " if spdy else b"GET ") + path + b" HTTP/1.1",
            b"Host: 127.0.0.1:%d" % self.worker.port,
            b"User-Agent: " + USER_AGENT,
            b"Connection: Upgrade",
        ]
        if spdy:
            lines += [b"Upgrade: SPDY/3.1", b"X-Stream-Protocol-Version: v5.channel.k8s.io",
                      b"X-Stream-Protocol-Version: v4.channel.k8s.io", b"Content-Length: 0"]
        else:
            protocols = b"v5.channel.k8s.io, v4.channel.k8s.io"
            if in_protocol:
                encoded = base64.urlsafe_b64encode(token.encode("ascii")).rstrip(b"=")
                protocols += b", base64url.bearer.authorization.k8s.io." + encoded
            lines += [b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                      b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Protocol: " + protocols]
        if not in_protocol:
            lines.append(b"Authorization: Bearer " + token.encode("ascii"))
        return b"\r\n".join(lines) + b"\r\n\r\n", key

    async def _open(self, request: bytes) -> tuple[_RawUpgrade, int, dict[bytes, list[bytes]]]:
        from twisted.internet.endpoints import connectProtocol

        protocol = _RawUpgrade(request)
        try:
            await self.worker.timed(connectProtocol(self.worker.endpoint(), protocol))
        except Exception as e:  # noqa: BLE001
            raise _ClientError("connect", _describe(e))
        try:
            code, headers = await self.worker.timed(protocol.head)
        except Exception:
            protocol.transport.abortConnection()
            raise
        self.worker.tally.code(code)
        return protocol, code, headers

    async def forbidden(self) -> None:
        """
        A reader's exec: the apiserver's 403 comes back as an ordinary response.
        """
        readers = [u for u in self.worker.config["tokens"] if u.startswith("reader")]
        token = self.worker.config["tokens"][readers[self.attempt % len(readers)]]
        request, _ = self._request(spdy=False, token=token, in_protocol=False)
        protocol, code, headers = await self._open(request)
        try:
            body = bytearray()
            length = int((headers.get(b"content-length") or [b"-1"])[0])
            complete: Deferred[None] = Deferred()

            def receive(data: bytes) -> None:
                body.extend(data)
                if len(body) >= length and not complete.called:
                    complete.callback(None)

            protocol.sink(receive)
            if code != 403:
                raise _ClientError("status", f"reader exec: {code}, wanted 403")
            if length < 0:
                raise _ClientError("body", "reader exec: no Content-Length on the 403")
            if len(body) < length:
                await self.worker.timed(complete)
            _check_status(403, "Forbidden")(bytes(body[:length]))
        finally:
            protocol.transport.loseConnection()

    async def tunnel(self, spdy: bool) -> int:
        """
        One exec of ``cat``: echo rounds, then close stdin and expect ``Success``.
        """
        from banyan_kproxy.testing.websocket import accept_key

        worker = self.worker
        in_protocol = not spdy and self.attempt % 2 == 0
        request, key = self._request(spdy, self.token, in_protocol)
        protocol, code, headers = await self._open(request)
        try:
            if code != 101:
                raise _ClientError("status", f"exec: {code}, wanted 101")
            if spdy:
                if headers.get(b"x-stream-protocol-version") != [b"v5.channel.k8s.io"]:
                    raise _ClientError("body", f"SPDY protocol {headers.get(b'x-stream-protocol-version')}")
                session: _ExecSession = _SpdyExec(protocol)
            else:
                if headers.get(b"sec-websocket-accept") != [accept_key(key).encode("ascii")]:
                    raise _ClientError("body", "wrong Sec-WebSocket-Accept")
                if headers.get(b"sec-websocket-protocol") != [b"v5.channel.k8s.io"]:
                    raise _ClientError("body", f"WebSocket protocol {headers.get(b'sec-websocket-protocol')}")
                session = _WebSocketExec(protocol)
            sent = bytearray()
            for index in range(int(worker.config["exec_rounds"])):
                data = self.random.randbytes(self.random.randint(1, int(worker.config["exec_max_bytes"])))
                sent.extend(data)
                session.want = len(sent)
                session.send(data)
                if len(session.out) < len(sent):
                    session.echoed = Deferred()
                    await worker.timed(session.echoed)
                if bytes(session.out) != bytes(sent):
                    raise _ClientError("exec-bytes", f"round {index}: {len(session.out)} bytes back for "
                                       f"{len(sent)} sent, and they differ")
                if worker.stopping:
                    break
                await worker.pause(float(worker.config["exec_pause"]))
            session.close_stdin()
            status = await worker.timed(session.status)
            if status.get("status") != "Success":
                raise _ClientError("exec-status", f"status {status}")
            if session.stderr:
                raise _ClientError("exec-bytes", f"stderr {bytes(session.stderr[:80])!r}")
            session.finish()
            await worker.timed(protocol.lost)
            problem = session.closed_cleanly()
            if problem:
                raise _ClientError("exec-status", problem)
            return len(sent)
        except BaseException:
            protocol.transport.abortConnection()
            raise


class _ExecSession:
    """
    The client side of a ``cat`` exec after the 101.
    """

    def __init__(self, protocol: _RawUpgrade) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.stderr = bytearray()
        self.want = 0
        self.echoed: Deferred[None] | None = None
        self.status: Deferred[dict[str, Any]] = Deferred()

    def stdout(self, data: bytes) -> None:
        self.out.extend(data)
        if self.echoed is not None and len(self.out) >= self.want:
            waiter, self.echoed = self.echoed, None
            waiter.callback(None)

    def got_status(self, data: bytes) -> None:
        if self.status.called:
            return
        try:
            status = json.loads(data)
        except ValueError:
            status = {"unreadable": data[:80].decode("latin-1")}
        self.status.callback(status)

    def send(self, data: bytes) -> None:
        raise NotImplementedError()

    def close_stdin(self) -> None:
        raise NotImplementedError()

    def finish(self) -> None:
        """
        The status is in: end the session the way kubectl does.
        """

    def closed_cleanly(self) -> str:
        return ""


class _WebSocketExec(_ExecSession):
    """
    ``v5.channel.k8s.io``: a channel byte before each message; 255 0 closes stdin.
    """

    def __init__(self, protocol: _RawUpgrade) -> None:
        from banyan_kproxy.testing.websocket import WebSocketConnection

        super().__init__(protocol)
        self.close_code: int | None = None
        self.ws = WebSocketConnection(
            protocol.transport.write, on_message=self.message, on_close=self.closed, client=True
        )
        protocol.sink(self.ws.receive)

    def message(self, payload: bytes, binary: bool) -> None:
        if not payload:
            return
        channel, data = payload[0], payload[1:]
        if channel == 1:
            self.stdout(data)
        elif channel == 2:
            self.stderr.extend(data)
        elif channel == 3:
            self.got_status(data)

    def closed(self, code: int | None, reason: str) -> None:
        self.close_code = code
        if not self.status.called:
            self.status.errback(Failure(_ClientError("exec-status", f"closed ({code}) without a status")))
        # The closing handshake is complete: close the connection, as kubectl does.
        self.protocol.transport.loseConnection()

    def send(self, data: bytes) -> None:
        self.ws.send_message(b"\x00" + data)

    def close_stdin(self) -> None:
        self.ws.send_message(b"\xff\x00")

    def closed_cleanly(self) -> str:
        if self.close_code != 1000:
            return f"WebSocket closed with {self.close_code}, not 1000"
        return ""


class _SpdyExec(_ExecSession):
    """
    SPDY/3.1: one stream per channel; FIN on stdin ends ``cat``.
    """

    def __init__(self, protocol: _RawUpgrade) -> None:
        from banyan_kproxy.testing.spdy import SpdySession

        super().__init__(protocol)
        self.goaway = False
        self.error_data = bytearray()
        self.session = SpdySession(
            protocol.transport.write, client=True, on_goaway=self._goaway, on_error=self._error
        )
        error = self.session.open_stream({"streamtype": "error"})
        error.on_data = self.error_data.extend
        error.on_end = lambda: self.got_status(bytes(self.error_data))
        self.stdin = self.session.open_stream({"streamtype": "stdin"})
        stdout = self.session.open_stream({"streamtype": "stdout"})
        stdout.on_data = self.stdout
        stderr = self.session.open_stream({"streamtype": "stderr"})
        stderr.on_data = self.stderr.extend
        protocol.sink(self.session.receive)

    def _goaway(self, frame: Any) -> None:
        self.goaway = True

    def _error(self, message: str) -> None:
        if not self.status.called:
            self.status.errback(Failure(_ClientError("exec-status", f"SPDY error: {message}")))

    def send(self, data: bytes) -> None:
        self.stdin.write(data)

    def close_stdin(self) -> None:
        self.stdin.close()

    def finish(self) -> None:
        # kubectl closes the connection once the error stream has ended.
        self.protocol.transport.loseConnection()


def _raise_nofile(wanted: int) -> tuple[int, int]:
    """
    Raise this process's open-file limit to at least ``wanted`` where allowed
    (root may raise the hard limit); return the previous limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft, hard
    new_hard = hard
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        new_hard = wanted
    new_soft = wanted if new_hard == resource.RLIM_INFINITY else min(wanted, new_hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, new_hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return soft, hard


class _Control(Protocol):
    """
    The worker's standard I/O: ``go`` starts the clients, ``stop RV`` ends the
    phase; `say` sends a line back.  (StandardIO makes stdout non-blocking, so
    nothing else may write to it.)
    """

    def __init__(self, worker: _Worker, go: Deferred[None], stopped: Deferred[None]) -> None:
        self.worker = worker
        self.go = go
        self.stopped = stopped
        self.closed: Deferred[None] = Deferred()
        self.buffer = b""

    def say(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            words = line.split()
            if words[:1] == [b"go"] and not self.go.called:
                self.go.callback(None)
            elif words[:1] == [b"stop"] and not self.stopped.called:
                self.worker.stop(int(words[1]))
                self.stopped.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The orchestrator went away (or we are done): stop now.
        if not self.stopped.called:
            self.worker.stop(0)
            self.stopped.callback(None)
        self.closed.callback(None)


async def _worker_run(reactor: Any, config: dict[str, Any], result_path: str) -> None:
    from twisted.internet.stdio import StandardIO

    worker = _Worker(reactor, config)
    go: Deferred[None] = Deferred()
    stopped: Deferred[None] = Deferred()
    control = _Control(worker, go, stopped)
    StandardIO(control, reactor=reactor)
    kinds = {"get": _GetClient, "watch": _WatchClient, "exec": _ExecClient}
    clients = [kinds[spec["kind"]](worker, spec) for spec in config["clients"]]
    control.say("ready")
    await go
    started_cpu = os.times()
    runs = [Deferred.fromCoroutine(c.run()) for c in clients]
    await stopped
    # Every client finishes within its bounded waits; this is a last guard.
    finished = gatherResults(runs)
    try:
        await finished.addTimeout(float(config["stop_timeout"]) + 2 * worker.timeout, reactor)
    except DeferredTimeout:
        worker.tally.error("worker", "worker", "clients did not finish after the stop")
    ended_cpu = os.times()
    result = worker.tally.to_json()
    result["cpu_seconds"] = round(
        (ended_cpu.user - started_cpu.user) + (ended_cpu.system - started_cpu.system), 2
    )
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    control.say("result")
    # Closing flushes what is still buffered for stdout.
    control.transport.loseConnection()
    await control.closed


def worker_main(config_path: str) -> None:
    """
    Run one worker process (``load.py --worker CONFIG``); its result goes to
    ``CONFIG.result``.
    """
    from twisted.internet.task import react

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    _raise_nofile(len(config["clients"]) * 2 + 256)
    react(lambda reactor: Deferred.fromCoroutine(_worker_run(reactor, config, config_path + ".result")))


# -- the orchestrator: stack, phases, measurements -------------------------------------------


@frozen
class FdCensus:
    """
    A process's open descriptors by kind.
    """

    total: int
    listening: int
    clients: int
    upstream: int
    issuer: int
    health: int
    other_sockets: int
    #: Non-socket descriptors by target kind (``pipe``, ``anon_inode:[eventpoll]``, files).
    others: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {**attr.asdict(self, recurse=False), "others": dict(self.others)}


def _tcp_table() -> dict[str, tuple[int, int, str]]:
    """
    Socket inode -> (local port, remote port, state) for every TCP socket.
    """
    table: dict[str, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                    table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            continue
    return table


def fd_census(pid: int, proxy_port: int, health_port: int, standin_port: int, issuer_port: int) -> FdCensus:
    """
    Count ``pid``'s descriptors by what they are.
    """
    table = _tcp_table()
    counts = collections.Counter[str]()
    others = collections.Counter[str]()
    total = 0
    directory = f"/proc/{pid}/fd"
    for fd in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, fd))
        except OSError:
            continue  # closed while listing
        total += 1
        if not target.startswith("socket:["):
            if target.startswith("/"):
                # By directory: a spool segment that rotates keeps its count.
                kind = "files in " + os.path.dirname(target)
            else:
                kind = target.split(":[", 1)[0] if target.startswith(("pipe:", "socket:")) else target
            others[kind] += 1
            continue
        entry = table.get(target[8:-1])
        if entry is None:
            counts["other_sockets"] += 1
            continue
        local, remote, state = entry
        if state == "0A":
            counts["listening"] += 1
        elif local == proxy_port:
            counts["clients"] += 1
        elif local == health_port:
            counts["health"] += 1
        elif remote == standin_port:
            counts["upstream"] += 1
        elif remote == issuer_port:
            counts["issuer"] += 1
        else:
            counts["other_sockets"] += 1
    return FdCensus(
        total, counts["listening"], counts["clients"], counts["upstream"], counts["issuer"],
        counts["health"], counts["other_sockets"], tuple(sorted(others.items())),
    )


def vm_rss_kib(pid: int) -> int:
    """
    The process's resident set size (``VmRSS``), KiB.
    """
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time of a process so far.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_metrics(text: str) -> dict[str, float]:
    """
    Prometheus text format -> ``{"name{labels}": value}``.
    """
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def _by_code(metrics: dict[str, float]) -> collections.Counter[str]:
    counts = collections.Counter[str]()
    for name, value in metrics.items():
        if name.startswith("kproxy_requests_total{"):
            code = name.split('code="', 1)[1].split('"', 1)[0]
            counts[code] += int(value)
    return counts


def _upstream_errors(metrics: dict[str, float]) -> collections.Counter[str]:
    counts = collections.Counter[str]()
    for name, value in metrics.items():
        if name.startswith("kproxy_upstream_errors_total{"):
            kind = name.split('kind="', 1)[1].split('"', 1)[0]
            counts[kind] += int(value)
    return counts


class _Emitter:
    """
    Adds and deletes pods in the watched namespace, one event per tick, keeping at
    most `LIVE_PODS`; also drops the stand-in's request log (unbounded otherwise).
    """

    def __init__(self, standin: Any, clock: Any, interval: float) -> None:
        from twisted.internet.task import LoopingCall

        self.standin = standin
        self.live: collections.deque[str] = collections.deque()
        self.serial = 0
        self.events = 0
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self.interval = interval

    def tick(self) -> None:
        try:
            if len(self.live) >= LIVE_PODS:
                self.standin.delete_pod(self.live.popleft(), NAMESPACE)
            else:
                self.serial += 1
                name = f"load-{self.serial}"
                self.standin.add_pod(name, NAMESPACE, labels={"app": "load"})
                self.live.append(name)
            self.events += 1
        finally:
            self.standin.requests.clear()

    def start(self) -> None:
        self.loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()


class _WorkerProcess(ProcessProtocol):
    """
    One worker child: its ``ready`` and ``result`` lines (the result itself in a
    file), stderr to a file.
    """

    def __init__(self, stderr_path: str, result_path: str) -> None:
        self.result_path = result_path
        self.buffer = b""
        self.ready: Deferred[None] = Deferred()
        self.result: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[int | None] = Deferred()
        self.stderr = open(stderr_path, "ab")

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            what = line.strip()
            if what == b"ready" and not self.ready.called:
                self.ready.callback(None)
            elif what == b"result" and not self.result.called:
                with open(self.result_path, encoding="utf-8") as f:
                    self.result.callback(json.load(f))

    def errReceived(self, data: bytes) -> None:
        self.stderr.write(data)
        self.stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        self.stderr.close()
        code = getattr(reason.value, "exitCode", None)
        failure = RuntimeError(f"worker exited ({code}); see {self.stderr.name}")
        if not self.ready.called:
            self.ready.errback(failure)
        if not self.result.called:
            self.result.errback(failure)
        self.ended.callback(code)

    def send(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write(line.encode("ascii") + b"\n")


@frozen
class Users:
    """
    The tokens the clients use: readers, admins and one the proxy rejects.
    """

    tokens: dict[str, str]
    bad_token: str


def make_users(stack: Any, readers: int = 6, admins: int = 2) -> Users:
    """
    ID tokens from the stack's issuer (valid for an hour); the bad one has the
    wrong audience.
    """
    from banyan_kproxy.testing.stack import ADMIN_ROLE, READER_ROLE

    tokens = {f"reader-{i}": stack.token(f"reader-{i}@example.com", [READER_ROLE]) for i in range(readers)}
    tokens.update({f"admin-{i}": stack.token(f"admin-{i}@example.com", [ADMIN_ROLE]) for i in range(admins)})
    bad = stack.token("intruder@example.com", [ADMIN_ROLE], audience="someone-else")
    return Users(tokens, bad)


def plan(settings: Settings, connections: int, ramp: float, users: Iterable[str]) -> list[list[dict[str, Any]]]:
    """
    The client specs of each worker: kinds by share, ``users`` (``reader-*`` and
    ``admin-*``) round-robin, exec by admins, starts spread over ``ramp`` seconds.
    """
    exec_count = max(1, round(connections * settings.exec_share))
    watch_count = max(1, round(connections * settings.watch_share))
    kinds = ["exec"] * exec_count + ["watch"] * watch_count
    kinds += ["get"] * (connections - len(kinds))
    # Interleave the kinds so that every worker and every moment of the ramp gets a mix.
    order = sorted(range(connections), key=lambda i: (i * 7919) % connections)
    names = sorted(users)
    readers = [u for u in names if u.startswith("reader-")]
    admins = [u for u in names if u.startswith("admin-")]
    half = len(readers) // 2
    everyone = readers[:half] + admins[:1] + readers[half:] + admins[1:]
    workers: list[list[dict[str, Any]]] = [[] for _ in range(settings.workers)]
    for position, index in enumerate(order):
        kind = kinds[index]
        user = admins[index % len(admins)] if kind == "exec" else everyone[index % len(everyone)]
        workers[position % settings.workers].append({
            "id": index, "kind": kind, "user": user,
            "start_delay": round(ramp * position / max(1, connections), 3),
        })
    return workers


@attr.s(auto_attribs=True)
class PhaseReport:
    """
    What one phase did and what the daemon looked like after it settled.
    """

    name: str
    connections: int
    seconds: float
    ops: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    errors: dict[str, int]
    samples: list[str]
    watches: dict[str, Any]
    exec_bytes: int
    events_emitted: int
    responses_by_code: dict[str, int]
    daemon_by_code: dict[str, int]
    upstream_errors: dict[str, int]
    cpu_seconds: dict[str, float]
    #: The machine's 1-minute load average when the phase started and ended.
    load_average: tuple[float, float]
    settled_seconds: float
    #: The daemon's descriptors once quiet, with its idle upstream pool, and the
    #: stand-in's view of those connections.
    fds_pooled: FdCensus
    standin_connections: dict[str, int]
    gauges: dict[str, float]
    #: The descriptors after the idle pool was closed from the server side, and
    #: what was left open if the daemon did not drop it all in time.
    fds: FdCensus
    not_dropped: str | None
    rss_kib: int

    def to_json(self) -> dict[str, Any]:
        data = attr.asdict(self, recurse=False)
        data["fds"] = self.fds.to_json()
        data["fds_pooled"] = self.fds_pooled.to_json()
        return data

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def _merge(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    ops: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    latency: dict[str, list[float]] = collections.defaultdict(list)
    samples: list[str] = []
    watches: list[dict[str, int]] = []
    exec_bytes = 0
    cpu: list[float] = []
    for result in results:
        ops.update(result["ops"])
        codes.update(result["codes"])
        errors.update(result["errors"])
        for name, values in result["latency"].items():
            latency[name].extend(values)
        samples.extend(result["samples"])
        watches.extend(result["watches"])
        exec_bytes += result["exec_bytes"]
        cpu.append(result["cpu_seconds"])
    return {
        "ops": ops, "codes": codes, "errors": errors, "latency": latency, "samples": samples,
        "watches": watches, "exec_bytes": exec_bytes, "cpu": cpu,
    }


def _without_probe(census: FdCensus) -> FdCensus:
    """
    ``census`` without the upstream connection of the daemon's ``/readyz`` probe
    (`settle` has checked it is an idle keep-alive connection at the stand-in).
    """
    return attr.evolve(census, total=census.total - census.upstream, upstream=0)


def _channels(served: Any) -> Iterable[Any]:
    """
    The innermost protocols of a `Served` listener's connections (inside TLS).
    """
    for wrapper in list(served.factory.protocols):
        inner = getattr(wrapper, "wrappedProtocol", wrapper)  # TLS
        inner = getattr(inner, "wrappedProtocol", inner)
        yield getattr(inner, "_channel", inner)


def _close_idle(served: Any) -> None:
    """
    Close a listener's idle HTTP/1.1 keep-alive connections (TLS close included).
    """
    from twisted.web.http import HTTPChannel

    for channel in _channels(served):
        if isinstance(channel, HTTPChannel) and not channel.requests and channel.transport is not None:
            # The channel's own close unregisters it as the TLS transport's
            # producer, without which TLS never starts its shutdown.
            channel.loseConnection()


def _standin_connections(stack: Any) -> dict[str, int]:
    """
    The stand-in's open connections: idle HTTP channels, busy ones, upgraded ones.
    """
    from twisted.web.http import HTTPChannel

    counts = collections.Counter[str](idle=0, busy=0, upgraded=0)
    for channel in _channels(stack.standin_listening.served):
        if isinstance(channel, HTTPChannel):
            counts["busy" if channel.requests else "idle"] += 1
        else:
            counts["upgraded"] += 1
    return dict(counts)


class LoadRun:
    """
    The stack, the workers and the measurements of one run.
    """

    def __init__(self, reactor: Any, settings: Settings, directory: str,
                 say: Callable[[str], Any] = lambda line: None,
                 stack_options: dict[str, Any] | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.directory = directory
        self.say = say
        # More LoopbackStack arguments (e.g. ``twistd_command`` for an instrumented daemon).
        self.stack_options = dict(stack_options or {})
        self.stack: Any = None
        self.users: Users | None = None
        self.phases: list[PhaseReport] = []
        self.baseline: PhaseReport | None = None
        self.failures: list[str] = []
        self.emitter: Any = None

    def _audit_ini(self) -> str:
        if not self.settings.audit:
            return ""
        spool = os.path.join(self.directory, "audit-spool")
        log = os.path.join(self.directory, "audit.log")
        return f"\n[audit]\nlog_file = {log}\nspool_dir = {spool}\nbatch_max_wait = 1s\n"

    async def start(self) -> None:
        from banyan_kproxy.testing.stack import LoopbackStack

        os.makedirs(self.directory, exist_ok=True)
        self.stack = LoopbackStack(
            self.reactor, self.directory, extra_ini=self._audit_ini(), **self.stack_options
        )
        try:
            await self.stack.start()
        except BaseException:
            await self.stack.stop()
            raise
        self.stack.standin.add_pod(POD, NAMESPACE, logs=POD_LOG)
        self.users = make_users(self.stack)
        self.emitter = _Emitter(self.stack.standin, self.reactor, self.settings.event_interval)

    async def stop(self) -> None:
        if self.stack is not None:
            await self.stack.stop()

    @property
    def pid(self) -> int:
        pid = self.stack.daemon_pid
        assert pid is not None
        return pid

    def census(self) -> FdCensus:
        stack = self.stack
        return fd_census(
            self.pid, stack.proxy_port, stack.health_port,
            stack.standin_listening.port_number, stack.issuer_listening.port_number,
        )

    async def metrics(self) -> dict[str, float]:
        import treq

        response = await treq.get(
            self.stack.health_url + "/metrics", reactor=self.reactor, timeout=10, persistent=False
        )
        return parse_metrics(await treq.text_content(response))

    async def _sleep(self, seconds: float) -> None:
        from twisted.internet.task import deferLater

        await deferLater(self.reactor, seconds, lambda: None)

    async def phase(self, name: str, connections: int, seconds: float, ramp: float) -> PhaseReport:
        """
        Run the workers for ``seconds`` with the emitter on, stop them, let the
        daemon settle, and measure it.
        """
        settings, stack = self.settings, self.stack
        assert self.users is not None
        before = await self.metrics()
        emitter = self.emitter
        emitted = emitter.events
        workers: list[_WorkerProcess] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
        for index, clients in enumerate(plan(settings, connections, ramp, self.users.tokens)):
            config = {
                "proxy_port": stack.proxy_port, "ca_file": stack.ca_file, "seed": settings.seed + index,
                "clients": clients, "tokens": self.users.tokens, "bad_token": self.users.bad_token,
                "get_interval": settings.get_interval, "watch_timeout": list(settings.watch_timeout),
                "exec_rounds": settings.exec_rounds, "exec_pause": settings.exec_pause,
                "exec_max_bytes": settings.exec_max_bytes, "op_timeout": settings.op_timeout,
                "stop_timeout": settings.stop_timeout,
            }
            path = os.path.join(self.directory, f"{name.replace(' ', '-')}-worker-{index}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f)
            process = _WorkerProcess(os.path.join(self.directory, f"{name.replace(' ', '-')}-worker-{index}.stderr"),
                                     path + ".result")
            self.reactor.spawnProcess(
                process, sys.executable, [sys.executable, os.path.abspath(__file__), "--worker", path],
                env=env,
            )
            workers.append(process)
        results: list[dict[str, Any]] = []
        failures: list[str] = []
        try:
            await gatherResults([w.ready.addTimeout(60, self.reactor) for w in workers])
            daemon_cpu, own_cpu = cpu_seconds(self.pid), os.times()
            load_before = os.getloadavg()[0]
            first_rv = int(stack.standin.resource_version)
            started = self.reactor.seconds()
            emitter.start()
            for w in workers:
                w.send("go")
            await self._sleep(seconds)
            emitter.stop()
            final_rv = int(stack.standin.resource_version)
            for w in workers:
                w.send(f"stop {final_rv}")
            limit = settings.stop_timeout + 3 * settings.op_timeout
            for w in workers:
                try:
                    results.append(await w.result.addTimeout(limit, self.reactor))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"worker: {e}")
            ran = self.reactor.seconds() - started
        finally:
            emitter.stop()
            for w in workers:
                if not w.ended.called:
                    w.transport.closeStdin()
            for w in workers:
                try:
                    await w.ended.addTimeout(15, self.reactor)
                except Exception:  # noqa: BLE001
                    w.transport.signalProcess("KILL")
                    await w.ended
        load_after = os.getloadavg()[0]
        daemon_cpu = cpu_seconds(self.pid) - daemon_cpu
        own = os.times()
        own_cpu_used = (own.user - own_cpu.user) + (own.system - own_cpu.system)
        merged = _merge(results)
        self.say(f"{name}: load stopped after {ran:.1f}s; waiting for the daemon to settle")
        settled_at = self.reactor.seconds()
        pooled, standin, gauges, census, not_dropped = await self.settle()
        settled = self.reactor.seconds() - settled_at
        rss = vm_rss_kib(self.pid)
        after = await self.metrics()
        daemon_codes = _by_code(after) - _by_code(before)
        upstream = _upstream_errors(after) - _upstream_errors(before)
        errors = merged["errors"]
        samples = list(merged["samples"])
        for failure in failures:
            errors["worker"] += 1
            samples.append(failure)
        if dict(daemon_codes) != dict(merged["codes"]):
            errors["daemon"] += 1
            samples.append(f"daemon: kproxy_requests_total grew by {dict(daemon_codes)}, "
                           f"the clients saw {dict(merged['codes'])}")
        for kind, count in upstream.items():
            if kind != "client_gone" and count:
                errors["daemon"] += 1
                samples.append(f"daemon: kproxy_upstream_errors_total{{kind={kind}}} grew by {count}")
        watches = merged["watches"]
        events = [w["events"] for w in watches]
        report = PhaseReport(
            name=name, connections=connections, seconds=round(ran, 1),
            ops=dict(merged["ops"]),
            latency_ms={op: _percentiles(v) for op, v in sorted(merged["latency"].items())},
            errors={k: v for k, v in errors.items() if v}, samples=samples,
            watches={
                "count": len(watches), "events_min": min(events, default=0),
                "events_max": max(events, default=0), "events_total": sum(events),
                "rewatches": sum(w["watches"] for w in watches),
                "short": sum(1 for w in watches if w["last_rv"] < final_rv),
                "first_rv": first_rv, "final_rv": final_rv,
            },
            exec_bytes=merged["exec_bytes"], events_emitted=emitter.events - emitted,
            responses_by_code=dict(merged["codes"]), daemon_by_code=dict(daemon_codes),
            upstream_errors=dict(upstream),
            cpu_seconds={"daemon": round(daemon_cpu, 1), "stand-in + issuer": round(own_cpu_used, 1),
                         "clients": round(sum(merged["cpu"]), 1)},
            load_average=(load_before, load_after),
            settled_seconds=round(settled, 1), fds_pooled=pooled, standin_connections=standin,
            gauges=gauges, fds=census, not_dropped=not_dropped, rss_kib=rss,
        )
        self.say(f"{name}: {sum(report.ops.values())} operations, {report.error_count} errors, "
                 f"RSS {rss / 1024:.1f} MiB, fds {census.total} "
                 f"({pooled.upstream} pooled upstream connections closed)")
        return report

    def _quiet(self, census: FdCensus, standin: dict[str, int]) -> bool:
        return (census.clients == 0 and standin["busy"] == 0 and standin["upgraded"] == 0
                and census.upstream == standin["idle"])

    async def settle(self) -> tuple[FdCensus, dict[str, int], dict[str, float], FdCensus, str | None]:
        """
        Wait (bounded) until the daemon has no client connection and nothing in
        flight and the stand-in only idle HTTP connections (the daemon's pool), then
        close those idle connections from the server side, as an apiserver's idle
        timeout would, and wait (bounded) until the daemon has dropped them (all
        but `PROBE_CONNECTIONS`, idle at the stand-in).

        Returns the daemon's descriptors and the stand-in's connections when quiet,
        the gauges then, the descriptors once the pool has emptied, and what was
        left if it did not within the bound.
        """
        names = ("kproxy_open_streams", "kproxy_open_tunnels", "kproxy_requests_in_flight")
        deadline = self.reactor.seconds() + self.settings.settle_timeout
        while True:
            metrics = await self.metrics()
            gauges = {n: metrics.get(n, float("nan")) for n in names}
            census, standin = self.census(), _standin_connections(self.stack)
            if not any(gauges.values()) and self._quiet(census, standin):
                # Still so a moment later (a closing connection may be half-way).
                await self._sleep(0.3)
                census, standin = self.census(), _standin_connections(self.stack)
                if self._quiet(census, standin):
                    break
            if self.reactor.seconds() > deadline:
                break
            await self._sleep(0.2)
        pooled, pool = census, standin
        _close_idle(self.stack.standin_listening.served)
        _close_idle(self.stack.issuer_listening)
        # A bound of its own: the wait above may have used up the first one.
        deadline = self.reactor.seconds() + self.settings.settle_timeout
        while True:
            census = self.census()
            left = _standin_connections(self.stack)
            if (census.issuer == census.health == census.clients == 0
                    and census.upstream <= PROBE_CONNECTIONS and self._quiet(census, left)):
                return pooled, pool, gauges, census, None
            if self.reactor.seconds() > deadline:
                return pooled, pool, gauges, census, f"the daemon still has {census.to_json()}, the stand-in {left}"
            await self._sleep(0.1)

    def check(self) -> list[str]:
        """
        The leak and error verdicts: one line per failed check.
        """
        failures: list[str] = []
        base = self.baseline
        assert base is not None
        for report in [base, *self.phases]:
            if report.error_count:
                failures.append(f"{report.name}: {report.error_count} errors {report.errors}")
            if report.watches["short"]:
                failures.append(f"{report.name}: {report.watches['short']} watches missed the last event")
            for name, value in report.gauges.items():
                if value != 0:
                    failures.append(f"{report.name}: {name} is {value} after the load, not 0")
            pooled, pool = report.fds_pooled, report.standin_connections
            if pooled.clients:
                failures.append(f"{report.name}: {pooled.clients} client connections still open")
            if pooled.upstream != pool["idle"] or pool["busy"] or pool["upgraded"]:
                failures.append(f"{report.name}: {pooled.upstream} upstream sockets in the daemon, the "
                                f"stand-in has {pool}: more than the idle connection pool")
            if pooled.upstream > UPSTREAM_POOL:
                failures.append(f"{report.name}: {pooled.upstream} idle upstream connections, over the "
                                f"pool's {UPSTREAM_POOL}")
        for report in [base, *self.phases]:
            if report.not_dropped:
                failures.append(f"{report.name}: the servers closed their idle connections and "
                                f"{report.not_dropped}")
        for report in self.phases:
            if _without_probe(report.fds) != _without_probe(base.fds):
                failures.append(f"{report.name}: descriptors {report.fds.to_json()}, baseline "
                                f"{base.fds.to_json()}")
        margin = int(self.settings.rss_margin_mib * 1024)
        for previous, report in zip(self.phases, self.phases[1:], strict=False):
            growth = report.rss_kib - previous.rss_kib
            if growth > margin:
                failures.append(f"{report.name}: RSS grew by {growth} KiB over {previous.name} "
                                f"(margin {margin} KiB)")
        return failures

    async def run(self) -> dict[str, Any]:
        """
        Warm-up, baseline, the phases, the verdict.
        """
        settings = self.settings
        previous = _raise_nofile(2 * settings.connections + 1024)
        try:
            await self.start()
            try:
                self.baseline = await self.phase(
                    "warm-up", min(settings.warmup_connections, settings.connections),
                    settings.warmup_duration, min(settings.ramp, 1.0),
                )
                for index in range(settings.phases):
                    self.phases.append(await self.phase(
                        f"phase {index + 1}", settings.connections, settings.duration, settings.ramp
                    ))
            finally:
                await self.stop()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, previous)
        self.failures = self.check()
        return self.to_json()

    def to_json(self) -> dict[str, Any]:
        rss = [p.rss_kib for p in self.phases]
        return {
            "settings": attr.asdict(self.settings),
            "baseline": self.baseline.to_json() if self.baseline else None,
            "phases": [p.to_json() for p in self.phases],
            "rss_growth_kib": {
                "first phase over baseline": rss[0] - self.baseline.rss_kib if rss and self.baseline else None,
                "repeats": [b - a for a, b in zip(rss, rss[1:], strict=False)],
                "margin": int(self.settings.rss_margin_mib * 1024),
            },
            "failures": self.failures,
            "ok": not self.failures,
        }


def format_report(data: dict[str, Any]) -> str:
    """
    The report as text.
    """
    lines: list[str] = []
    s = data["settings"]
    lines.append(f"banyan-kproxy load: {s['connections']} connections x {s['duration']:.0f}s, "
                 f"{s['phases']} phases, {s['workers']} client processes, audit "
                 f"{'on' if s['audit'] else 'off'}")
    for phase in [data["baseline"], *data["phases"]]:
        if phase is None:
            continue
        lines.append("")
        lines.append(f"== {phase['name']}: {phase['connections']} connections, {phase['seconds']}s")
        total = sum(phase["ops"].values())
        lines.append(f"operations: {total} ({total / max(phase['seconds'], 0.1):.0f}/s)")
        for op, count in sorted(phase["ops"].items()):
            lat = phase["latency_ms"].get(op, {})
            lines.append(f"  {op:<18} {count:>8}   p50 {lat.get('p50', 0):>8.1f} ms   "
                         f"p99 {lat.get('p99', 0):>8.1f} ms   max {lat.get('max', 0):>8.1f} ms")
        w = phase["watches"]
        lines.append(f"watches: {w['count']}, events each {w['events_min']}-{w['events_max']} "
                     f"(emitted {phase['events_emitted']}), re-watches {w['rewatches']}, "
                     f"missed the last event: {w['short']}")
        lines.append(f"exec: {phase['exec_bytes']} bytes echoed byte for byte")
        lines.append(f"responses by code: clients {phase['responses_by_code']}, "
                     f"daemon {phase['daemon_by_code']}")
        lines.append(f"errors: {sum(phase['errors'].values())} {phase['errors'] or ''}")
        for sample in phase["samples"][:20]:
            lines.append(f"  {sample}")
        lines.append(f"CPU seconds: {phase['cpu_seconds']}; machine load average "
                     f"{phase['load_average'][0]:.1f} at the start, {phase['load_average'][1]:.1f} at the end")
        pooled, fds = phase["fds_pooled"], phase["fds"]
        lines.append(f"daemon once quiet ({phase['settled_seconds']}s): {pooled['total']} fds, of which "
                     f"{pooled['clients']} client connections and {pooled['upstream']} idle upstream "
                     f"connections (the stand-in: {phase['standin_connections']}); {phase['gauges']}")
        if phase["not_dropped"]:
            lines.append(f"daemon after the servers closed the idle connections: {phase['not_dropped']}")
        else:
            lines.append(f"daemon after the servers closed the idle connections: {fds['total']} fds "
                         f"(listening {fds['listening']}, sockets {fds['upstream'] + fds['issuer']}"
                         f" + {fds['other_sockets']}, others {fds['others']}); "
                         f"RSS {phase['rss_kib'] / 1024:.1f} MiB")
    growth = data["rss_growth_kib"]
    lines.append("")
    lines.append(f"RSS growth: first phase over the baseline {growth['first phase over baseline']} KiB; "
                 f"each repeat {growth['repeats']} KiB (margin {growth['margin']} KiB)")
    if data["ok"]:
        lines.append("OK: no errors; descriptors back to the baseline (the idle upstream pool accounted "
                     "for, then closed); no RSS growth over a repeated phase beyond the margin")
    else:
        lines.append("FAILED:")
        lines.extend(f"  {f}" for f in data["failures"])
    return "\n".join(lines)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds per phase")
    parser.add_argument("--phases", type=int, default=defaults.phases)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--get-interval", type=float, default=defaults.get_interval)
    parser.add_argument("--event-interval", type=float, default=defaults.event_interval)
    parser.add_argument("--rss-margin-mib", type=float, default=defaults.rss_margin_mib)
    parser.add_argument("--no-audit", action="store_true", help="run the daemon without [audit]")
    parser.add_argument("--short", action="store_true", help="the CI form (100 connections, 8 s)")
    parser.add_argument("--dir", help="working directory (default: a new temporary one)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the load and print the report; exit status 1 when a check failed.
    """
    args = _arguments(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    from twisted.internet.task import react

    if args.short:
        settings = Settings.short()
    else:
        settings = Settings(
            connections=args.connections, duration=args.duration, phases=args.phases,
            workers=args.workers, get_interval=args.get_interval,
            event_interval=args.event_interval, rss_margin_mib=args.rss_margin_mib,
        )
    settings = attr.evolve(settings, audit=not args.no_audit)
    # Absolute: the daemon runs in this directory and its configuration names files in it.
    directory = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="kproxy-load-"))

    async def run(reactor: Any) -> None:
        from twisted.logger import (
            FilteringLogObserver,
            LogLevel,
            LogLevelFilterPredicate,
            globalLogBeginner,
            textFileLogObserver,
        )

        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, "load.log"), "a", encoding="utf-8")
        globalLogBeginner.beginLoggingTo([FilteringLogObserver(
            textFileLogObserver(log), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
        )], redirectStandardIO=False)
        print(f"working directory {directory} (daemon.log, load.log, worker stderr)", flush=True)
        started = time.monotonic()
        runner = LoadRun(reactor, settings, directory, say=lambda line: print(line, flush=True))
        outcome = await runner.run()
        outcome["wall_seconds"] = round(time.monotonic() - started, 1)
        outcome["directory"] = directory
        print(format_report(outcome), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(outcome, f, indent=2)
        if not outcome["ok"]:
            raise SystemExit(1)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    return 0  # not reached: react exits


if __name__ == "__main__":
    sys.exit(main())
