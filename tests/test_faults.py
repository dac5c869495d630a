"""
Process-level fault tests: the real daemon (``twistd -n banyan-kproxy``) while the
Kubernetes API goes away, restarts under an open watch, the OIDC issuer goes away or
rotates its key, and the serving certificate is replaced under load; and, in memory,
the rules by which the proxy's health component (``proxy/probe.py``) judges them.

What the clients see is what is asserted: status codes and Kubernetes ``Status``
bodies, ``/ready`` and ``/metrics``, the bytes of a watch, what ``kubectl`` prints.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed, readBody
from twisted.web.http_headers import Headers

from banyan_kproxy.config import UpstreamConfig
from banyan_kproxy.health import Metrics, ReadinessWarning
from banyan_kproxy.proxy.probe import IssuerHealth, UpstreamHealth, duration
from banyan_kproxy.proxy.upstream import Upstream
from banyan_kproxy.testing.stack import PROXY_SERVICE_ACCOUNT, READER_ROLE, LoopbackStack
from banyan_kproxy.tls import https_policy

from .test_kubectl import kubectl_binary

UNAVAILABLE = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "the Kubernetes API is unavailable",
    "reason": "ServiceUnavailable",
    "code": 503,
}


def sample(metrics: str, series: str) -> float | None:
    """
    The value of one series (``name`` or ``name{labels}``) in a /metrics page.
    """
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


class _Body(Protocol):
    """
    Collects a streamed response body and how it ended.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.ended.callback(None)

    def events(self) -> list[dict[str, Any]]:
        """
        The watch events received (one JSON document per line).
        """
        return [json.loads(line) for line in bytes(self.data).splitlines() if line.strip()]


class _Process(ProcessProtocol):
    """
    A child process's output and exit code.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


class FaultTestCase(TestCase):
    """
    A loopback stack per test, with the test's settings; helpers to reach it.
    """

    timeout = 60
    #: Keys for the stack's [proxy], [oidc] and [upstream] sections.
    settings: dict[str, dict[str, str]] = {}

    def setUp(self) -> Deferred[None]:
        self.stack = LoopbackStack(
            reactor, os.path.abspath(self.mktemp()), settings=self.settings
        )
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent: Any = None
        self.addCleanup(lambda: ensureDeferred(self.stack.stop()))

        async def start() -> None:
            await self.stack.start()
            self.agent = Agent(reactor, contextFactory=https_policy(self.stack.ca_file), pool=self.pool)
            self.token = self.stack.token("myuser@example.com", [READER_ROLE])

        return ensureDeferred(start())

    def headers(self, token: str | None = None) -> Headers:
        return Headers({b"Authorization": [f"Bearer {token or self.token}".encode()]})

    async def request(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        """
        One GET through the proxy (a fresh connection); its status and body.
        """
        pending = self.agent.request(
            b"GET", (self.stack.proxy_url + path).encode(), self.headers(token)
        )
        pending.addTimeout(15, reactor)
        response = await pending
        return response.code, await readBody(response)

    async def health(self, path: str) -> tuple[int, str]:
        response = await treq.get(self.stack.health_url + path, persistent=False, timeout=5)
        return response.code, await treq.text_content(response)

    async def metrics(self) -> str:
        code, text = await self.health("/metrics")
        self.assertEqual(code, 200)
        return text

    async def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
        """
        Poll ``condition`` (a function or coroutine function) every 50 ms until it
        holds or ``timeout`` passes.
        """
        deadline = reactor.seconds() + timeout
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            # The daemon is a real process on the real clock: poll it, bounded above.
            await deferLater(reactor, 0.05, lambda: None)

    async def ready_is(self, code: int, text: str = "", exactly: str | None = None) -> bool:
        """
        Whether /ready answers ``code`` with ``text`` in its body (or ``exactly`` it).
        """
        got, body = await self.health("/ready")
        return got == code and text in body and (exactly is None or body == exactly)

    def kubectl(self, *args: str) -> _Process:
        """
        Start kubectl as the reader through the proxy; it is stopped in cleanup.
        """
        binary = kubectl_binary(None)
        kubeconfig = self.stack.write_kubeconfig("kubeconfig", {"reader": self.token})
        env = {"HOME": self.home, "KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "")}
        process = _Process()
        transport = reactor.spawnProcess(process, binary, [binary, *args], env=env)

        async def stop() -> None:
            if not process.ended.called:
                transport.signalProcess("KILL")
                await process.ended

        self.addCleanup(lambda: ensureDeferred(stop()))
        return process

    async def watch(self, path: str) -> _Body:
        """
        Open a watch through the proxy; its body is collected as it streams.
        """
        pending = self.agent.request(
            b"GET", (self.stack.proxy_url + path).encode(), self.headers()
        )
        pending.addTimeout(15, reactor)
        response = await pending
        self.assertEqual(response.code, 200)
        body = _Body()
        response.deliverBody(body)
        return body


class ApiserverDownTests(FaultTestCase):
    """
    The apiserver goes away and comes back.
    """

    settings = {"upstream": {"probe_interval": "250ms"}}

    def test_down_and_back(self) -> Deferred[None]:
        """
        The probe is a GET /readyz with the proxy's own credential.  With the
        apiserver's port closed, /ready turns 503 naming the apiserver and why (found
        by the probe, before any request), kproxy_upstream_up is 0, and a request gets
        a 503 Kubernetes Status; once it listens again /ready is 200 and requests
        succeed.
        """

        async def run() -> None:
            server = self.stack.standin_listening.url
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods"))[0], 200)
            self.assertEqual(await self.health("/ready"), (200, "ok\n"))
            self.assertEqual(sample(await self.metrics(), "kproxy_upstream_up"), 1)
            # The probe: GET /readyz with the proxy's own credential, nothing else.
            probes = self.stack.standin.health_checks
            self.assertEqual(
                {(r.method, r.path, r.user, r.code) for r in probes},
                {("GET", "/readyz", PROXY_SERVICE_ACCOUNT.name, 200)},
            )
            self.assertNotIn("/readyz", {r.path for r in self.stack.standin.requests})

            await self.stack.stop_apiserver()
            await self.wait_for(lambda: self.ready_is(503), "/ready to turn 503")
            self.assertEqual(
                await self.health("/ready"),
                (503, f"upstream: the Kubernetes API at {server} is unreachable: connection refused\n"),
            )
            metrics = await self.metrics()
            self.assertEqual(sample(metrics, "kproxy_upstream_up"), 0)
            self.assertGreaterEqual(sample(metrics, "kproxy_upstream_probe_failures_total") or 0, 1)

            code, body = await self.request("/api/v1/namespaces/default/pods")
            self.assertEqual((code, json.loads(body)), (503, UNAVAILABLE))

            await self.stack.restart_apiserver()
            await self.wait_for(lambda: self.ready_is(200), "/ready to turn 200 again")
            self.assertEqual(await self.health("/ready"), (200, "ok\n"))
            self.assertEqual(sample(await self.metrics(), "kproxy_upstream_up"), 1)
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods"))[0], 200)
            self.assertIn(f"The Kubernetes API at {server} answers again", self.stack.daemon_output)

        return ensureDeferred(run())


class RequestsTellReadinessTests(FaultTestCase):
    """
    Without the probe, what requests see moves /ready at once.
    """

    settings = {"upstream": {"probe_interval": "0"}}

    def test_refused_request_marks_down(self) -> Deferred[None]:
        """
        With probing off, /ready is 200 until a request finds the apiserver's port
        closed; from that request on it is 503, and the first request that gets an
        answer after the apiserver is back makes it 200 again.
        """

        async def run() -> None:
            server = self.stack.standin_listening.url
            await self.stack.stop_apiserver()
            # Nothing has tried the apiserver since: nothing is known yet.
            self.assertEqual(await self.health("/ready"), (200, "ok\n"))
            code, body = await self.request("/api/v1/namespaces/default/pods")
            self.assertEqual((code, json.loads(body)), (503, UNAVAILABLE))
            self.assertEqual(
                await self.health("/ready"),
                (503, f"upstream: the Kubernetes API at {server} is unreachable: connection refused\n"),
            )
            await self.stack.restart_apiserver()
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods"))[0], 200)
            self.assertEqual(await self.health("/ready"), (200, "ok\n"))

        return ensureDeferred(run())


class WatchAcrossRestartTests(FaultTestCase):
    """
    Watches open through the proxy while the apiserver restarts.
    """

    settings = {"upstream": {"probe_interval": "250ms"}}

    async def open_watches(self) -> tuple[str, _Body, _Process]:
        """
        A raw HTTP watch and ``kubectl get pods -w``, both past their first event;
        the resourceVersion of the last event seen.
        """
        start = self.stack.standin.resource_version
        self.stack.standin.add_pod("before-1")
        # From just before before-1, so that the watch starts with an event.
        raw = await self.watch(f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={start}")
        kubectl = await self.kubectl_watch()
        await self.wait_for(lambda: b"before-1" in kubectl.output, "kubectl to list before-1")
        self.stack.standin.add_pod("during-1")
        await self.wait_for(lambda: b"during-1" in raw.data, "the raw watch to see during-1")
        await self.wait_for(lambda: b"during-1" in kubectl.output, "kubectl to see during-1")
        last_rv = raw.events()[-1]["object"]["metadata"]["resourceVersion"]
        return last_rv, raw, kubectl

    async def kubectl_watch(self) -> _Process:
        """
        ``kubectl get pods -w``, once its watch has reached the apiserver.
        """
        def watches() -> int:
            return sum("watch" in r.query for r in self.stack.standin.requests)

        before = watches()
        kubectl = self.kubectl("--request-timeout=0", "get", "pods", "-w")
        await self.wait_for(lambda: watches() > before, "kubectl's watch to reach the apiserver")
        return kubectl

    def test_graceful_restart(self) -> Deferred[None]:
        """
        When the apiserver restarts gracefully (ending its watches), the watch through
        the proxy ends cleanly: the chunked body is terminated, every line is a whole
        event, kubectl get -w exits 0 without an error (it does not re-watch).  A
        re-watch from the last resourceVersion gets a 503 Status while the apiserver is
        down and, once it is back, the events since then and new ones; kubectl get -w
        run again shows them too.
        """

        async def run() -> None:
            last_rv, raw, kubectl = await self.open_watches()
            await self.stack.stop_apiserver(graceful=True)
            raw.ended.addTimeout(10, reactor)
            await raw.ended
            reason = raw.reason
            assert reason is not None
            self.assertTrue(reason.check(ResponseDone), reason)
            self.assertTrue(raw.data.endswith(b"\n"))
            self.assertEqual(
                [(e["type"], e["object"]["metadata"]["name"]) for e in raw.events()],
                [("ADDED", "before-1"), ("ADDED", "during-1")],
            )
            kubectl.ended.addTimeout(10, reactor)
            self.assertEqual(await kubectl.ended, 0, kubectl.output)
            lines = kubectl.output.decode().splitlines()
            self.assertEqual([line.split()[0] for line in lines], ["NAME", "before-1", "during-1"])

            # A reflector re-watches from the last resourceVersion it saw.
            rewatch = f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={last_rv}"
            code, body = await self.request(rewatch)
            self.assertEqual((code, json.loads(body)), (503, UNAVAILABLE))
            self.stack.standin.add_pod("after-1")
            await self.stack.restart_apiserver()
            again = await self.watch(rewatch)
            await self.wait_for(lambda: b"after-1" in again.data, "the re-watch to see after-1")
            self.stack.standin.add_pod("after-2")
            await self.wait_for(lambda: b"after-2" in again.data, "the re-watch to see after-2")
            self.assertEqual(
                [(e["type"], e["object"]["metadata"]["name"]) for e in again.events()],
                [("ADDED", "after-1"), ("ADDED", "after-2")],
            )

            kubectl = await self.kubectl_watch()
            await self.wait_for(lambda: b"after-2" in kubectl.output, "kubectl to list after-2")
            self.stack.standin.add_pod("after-3")
            await self.wait_for(lambda: b"after-3" in kubectl.output, "kubectl to see after-3")

        return ensureDeferred(run())

    def test_crash(self) -> Deferred[None]:
        """
        When the apiserver's connections drop without an ending (a crash), the proxy
        does not pass the cut stream off as a whole one: the client's connection is
        broken off, promptly; kubectl get -w then ends without hanging and exits 0,
        and /ready reports the apiserver unreachable until it is back.
        """

        async def run() -> None:
            last_rv, raw, kubectl = await self.open_watches()
            await self.stack.stop_apiserver(graceful=False)
            raw.ended.addTimeout(10, reactor)
            await raw.ended
            reason = raw.reason
            assert reason is not None
            self.assertFalse(reason.check(ResponseDone), "a cut stream ended as if whole")
            self.assertEqual(
                [(e["type"], e["object"]["metadata"]["name"]) for e in raw.events()],
                [("ADDED", "before-1"), ("ADDED", "during-1")],
            )
            kubectl.ended.addTimeout(10, reactor)
            self.assertEqual(await kubectl.ended, 0, kubectl.output)
            lines = kubectl.output.decode().splitlines()
            self.assertEqual([line.split()[0] for line in lines], ["NAME", "before-1", "during-1"])
            await self.wait_for(lambda: self.ready_is(503, "unreachable"), "/ready to turn 503")
            self.assertIn(
                "Upstream response for GET /api/v1/namespaces/default/pods broke off",
                self.stack.daemon_output,
            )
            await self.stack.restart_apiserver()
            await self.wait_for(lambda: self.ready_is(200), "/ready to turn 200 again")
            self.stack.standin.add_pod("after-1")
            again = await self.watch(
                f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={last_rv}"
            )
            self.stack.standin.add_pod("after-2")
            await self.wait_for(lambda: b"after-2" in again.data, "the re-watch to see after-2")
            self.assertEqual(
                [(e["type"], e["object"]["metadata"]["name"]) for e in again.events()],
                [("ADDED", "after-1"), ("ADDED", "after-2")],
            )

        return ensureDeferred(run())


class QuietWatchTests(FaultTestCase):
    """
    A watch with nothing to report yet.
    """

    def test_headers_at_once(self) -> Deferred[None]:
        """
        A watch with no event yet gets its 200 and headers at once, as kube-apiserver
        sends them: client-go's Watch() returns only once the headers are in, and a
        client with a response-header timeout would give up on a quiet watch.
        """

        async def run() -> None:
            rv = self.stack.standin.resource_version
            pending = self.agent.request(
                b"GET",
                f"{self.stack.proxy_url}/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}"
                .encode(),
                self.headers(),
            )
            pending.addTimeout(5, reactor)
            response = await pending
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
            body = _Body()
            response.deliverBody(body)
            self.stack.standin.add_pod("first")
            await self.wait_for(lambda: b"first" in body.data, "the first event")

        return ensureDeferred(run())


class IssuerDownTests(FaultTestCase):
    """
    The OIDC issuer goes away while the proxy has its keys.
    """

    settings = {"oidc": {"jwks_refresh_interval": "1s"}}

    def test_cached_keys_keep_working(self) -> Deferred[None]:
        """
        With the issuer unreachable, a token seen before and a new one signed with the
        loaded key are both accepted; /ready stays 200 but warns, the metrics show
        the failing refreshes; when the issuer is back the warning goes.
        """

        async def run() -> None:
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods"))[0], 200)
            metrics = await self.metrics()
            self.assertEqual(sample(metrics, "kproxy_oidc_issuer_up"), 1)
            self.assertEqual(sample(metrics, "kproxy_oidc_refresh_failures_total"), 0)

            await self.stack.stop_issuer()
            await self.wait_for(lambda: self.ready_is(200, "warning: oidc"), "the /ready warning")
            code, text = await self.health("/ready")
            lines = text.splitlines()
            self.assertEqual(lines[0], "ok")
            self.assertEqual(len(lines), 2, text)
            self.assertRegex(
                lines[1],
                r"^warning: oidc: keys could not be refreshed since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: "
                r"fetching discovery document at https://127\.0\.0\.1:\d+/v2/\.well-known/"
                r"openid-configuration failed: .*[Cc]onnection was refused.*; "
                r"serving with keys fetched \d+s ago$",
            )
            metrics = await self.metrics()
            self.assertEqual(sample(metrics, "kproxy_oidc_issuer_up"), 0)
            self.assertGreaterEqual(sample(metrics, "kproxy_oidc_refresh_failures_total") or 0, 1)
            self.assertGreater(sample(metrics, "kproxy_oidc_keys_age_seconds") or 0, 0)

            self.assertEqual((await self.request("/api/v1/namespaces/default/pods"))[0], 200)
            fresh = self.stack.token("other@example.com", [READER_ROLE])
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods", fresh))[0], 200)

            await self.stack.restart_issuer()
            await self.wait_for(lambda: self.ready_is(200, exactly="ok\n"), "/ready without the warning")
            self.assertEqual(sample(await self.metrics(), "kproxy_oidc_issuer_up"), 1)

        return ensureDeferred(run())


class KeyRotationTests(FaultTestCase):
    """
    The issuer starts signing with a new key.
    """

    settings = {"oidc": {"jwks_min_refetch_interval": "0s"}}

    def test_new_kid_after_one_fetch(self) -> Deferred[None]:
        """
        A token with a new kid is accepted after exactly one JWKS fetch (and no new
        discovery); further tokens with that kid, and tokens of the old key, need none.
        """

        async def run() -> None:
            issuer = self.stack.issuer
            old = self.token
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods", old))[0], 200)
            jwks, discovery = issuer.jwks_fetches, issuer.discovery_fetches
            kid = issuer.rotate()
            new = self.stack.token("myuser@example.com", [READER_ROLE])
            self.assertIn(kid, self.stack.issuer.jwks()["keys"][-1]["kid"])
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods", new))[0], 200)
            self.assertEqual((issuer.jwks_fetches, issuer.discovery_fetches), (jwks + 1, discovery))
            other = self.stack.token("other@example.com", [READER_ROLE])
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods", other))[0], 200)
            self.assertEqual((await self.request("/api/v1/namespaces/default/pods", old))[0], 200)
            self.assertEqual(issuer.jwks_fetches, jwks + 1)
            self.assertIn(kid, self.stack.daemon_output)

        return ensureDeferred(run())


class CertificateRotationUnderLoadTests(FaultTestCase):
    """
    The serving certificate is replaced while clients keep sending requests.
    """

    clients = 8

    def test_no_failed_request(self) -> Deferred[None]:
        """
        While eight clients loop requests (half on fresh connections, half on kept
        ones), the certificate and key files are replaced and SIGHUP sent: no request
        fails, requests keep succeeding after the reload, and a new connection is
        served the new certificate.
        """

        async def run() -> None:
            kept = Agent(
                reactor,
                contextFactory=https_policy(self.stack.ca_file),
                pool=HTTPConnectionPool(reactor, persistent=True),
            )
            self.addCleanup(kept._pool.closeCachedConnections)
            url = (self.stack.proxy_url + "/api/v1/namespaces/default/pods").encode()
            done: list[int] = []
            failures: list[str] = []
            running = True

            async def client(agent: Any) -> None:
                while running:
                    try:
                        pending = agent.request(b"GET", url, self.headers())
                        pending.addTimeout(15, reactor)
                        response = await pending
                        await readBody(response)
                        if response.code == 200:
                            done.append(1)
                        else:
                            failures.append(f"HTTP {response.code}")
                    except Exception as e:  # noqa: BLE001 - every failure is recorded
                        failures.append(repr(e))

            loops = [
                ensureDeferred(client(self.agent if i % 2 else kept)) for i in range(self.clients)
            ]
            try:
                await self.wait_for(lambda: len(done) >= 50, "50 requests before the rotation")
                rotated = self.stack.ca.issue(
                    "rotated.example", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
                )
                staging = os.path.join(self.stack.directory, "new")
                os.makedirs(staging)
                cert, key = rotated.write(staging, "proxy")
                # As a deployment tool replaces them: each file by a rename.
                os.replace(key, os.path.join(self.stack.directory, "proxy.key"))
                os.replace(cert, os.path.join(self.stack.directory, "proxy.crt"))
                os.kill(self.stack.daemon_pid, signal.SIGHUP)
                await self.wait_for(
                    lambda: "Reloaded TLS certificate CN=rotated.example" in self.stack.daemon_output,
                    "the reload",
                )
                before = len(done)
                await self.wait_for(lambda: len(done) >= before + 50, "50 requests after the reload")
            finally:
                running = False
                await gatherResults(loops)
            self.assertEqual(failures, [])
            self.rotation = (before, len(done))

            out, _, _ = await getProcessOutputAndValue(
                "sh",
                ("-c", 'exec openssl s_client -connect "$1" -alpn h2,http/1.1 -CAfile "$2" '
                 "</dev/null", "sh", f"127.0.0.1:{self.stack.proxy_port}", self.stack.ca_file),
                env=dict(os.environ), reactor=reactor,
            )
            text = out.decode()
            self.assertIn("Verify return code: 0 (ok)", text)
            subject = next(line for line in text.splitlines() if line.startswith("subject="))
            self.assertIn("rotated.example", subject)

        return ensureDeferred(run())


# -- the health rules, in memory ---------------------------------------------------------


class _Response:
    """
    An upstream response with a whole body.
    """

    phrase = b"Status"

    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self.headers = Headers()
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _HeldResponse(_Response):
    """
    A 200 whose body starts and then stalls; stopping it aborts ``transport``.
    """

    def __init__(self, transport: StringTransport) -> None:
        super().__init__(200)
        self.transport = transport
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport.stopProducing = self.transport.loseConnection  # type: ignore[method-assign]
        protocol.makeConnection(self.transport)
        protocol.dataReceived(b"[+]ping ok\n")


class _Agent:
    """
    An agent whose requests the test answers.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, Deferred[Any]]] = []
        self.cancelled: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(uri))
        self.pending.append((uri, d))
        return d


class UpstreamHealthTests(SynchronousTestCase):
    """
    `UpstreamHealth`: what probes and requests make of the apiserver.
    """

    server = "https://10.0.0.1:6443"

    def make(self, interval: float = 5.0) -> UpstreamHealth:
        self.clock = MemoryReactorClock()
        self.agent = _Agent()
        self.upstream = Upstream(UpstreamConfig(self.server), self.agent, None)
        health = UpstreamHealth(self.upstream, self.clock, interval)
        health.observe_requests()
        self.metrics = Metrics()
        health.register_metrics(self.metrics)
        return health

    def answer(self, code: int, body: bytes = b"ok") -> bytes:
        uri, d = self.agent.pending.pop(0)
        d.callback(_Response(code, body))
        return uri

    def refuse(self) -> None:
        _, d = self.agent.pending.pop(0)
        d.errback(ConnectionRefusedError())

    def series(self) -> dict[str, float]:
        return {
            name: float(value)
            for name, _, value in (
                line.rpartition(" ") for line in self.metrics.render().decode().splitlines()
            )
            if not name.startswith("#")
        }

    def test_probe(self) -> None:
        """
        The first probe goes out at start: until it is answered /ready says the
        apiserver has not been checked; a 200 from ``/readyz`` makes it ready; the
        next probe follows ``interval`` seconds after.
        """
        health = self.make()
        health.start()
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} has not been checked yet",
        )
        self.assertEqual(self.answer(200), f"{self.server}/readyz".encode())
        self.assertIsNone(health.problem())
        self.assertEqual(
            self.series(),
            {"kproxy_upstream_up": 1, "kproxy_upstream_probe_failures_total": 0},
        )
        self.clock.advance(4.9)
        self.assertEqual(self.agent.pending, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.agent.pending), 1)

    def test_probe_refused(self) -> None:
        """
        A refused probe makes /ready name the apiserver and the reason, and counts;
        the next probe that is answered undoes it.
        """
        health = self.make()
        health.start()
        self.refuse()
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} is unreachable: connection refused",
        )
        self.assertEqual(
            self.series(),
            {"kproxy_upstream_up": 0, "kproxy_upstream_probe_failures_total": 1},
        )
        self.clock.advance(5)
        self.answer(200)
        self.assertIsNone(health.problem())

    def test_probe_not_ready(self) -> None:
        """
        A 500 from ``/readyz`` names its failed checks; a 401 says the proxy's
        credential was refused; a 403 (``/readyz`` forbidden) still counts as up.
        """
        health = self.make()
        health.start()
        self.answer(
            500,
            b"[+]ping ok\n[-]etcd failed: reason withheld\n[-]shutdown failed: reason withheld\n"
            b"readyz check failed\n",
        )
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} is not ready: GET /readyz answered 500 "
            "(etcd failed: reason withheld, shutdown failed: reason withheld)",
        )
        self.clock.advance(5)
        self.answer(401, b'{"kind":"Status"}')
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} is not ready: GET /readyz answered "
            "401: the proxy's own credential was refused",
        )
        self.clock.advance(5)
        self.answer(403, b'{"kind":"Status"}')
        self.assertIsNone(health.problem())
        self.assertEqual(health.probe_failures, 2)

    def test_probe_timeout(self) -> None:
        """
        A probe without an answer is given up after ``timeout`` seconds: the apiserver
        is unreachable; probing goes on.
        """
        health = self.make()
        health.start()
        self.clock.advance(5)
        self.assertEqual(self.agent.cancelled, [f"{self.server}/readyz".encode()])
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} is unreachable: GET /readyz got no "
            "answer within 5s",
        )
        self.clock.advance(5)
        self.assertEqual(len(self.agent.pending), 2)

    def test_probe_timeout_in_body(self) -> None:
        """
        A ``/readyz`` whose headers came but whose body stalls is given up after
        ``timeout`` seconds too: its connection is aborted, and the loss that follows
        is not reported as a second answer (``readBody`` would log AlreadyCalledError).
        """
        health = self.make()
        health.start()
        transport = StringTransport()
        held = _HeldResponse(transport)
        _, d = self.agent.pending.pop(0)
        d.callback(held)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        held.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionDone())])))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(
            health.problem(),
            f"upstream: the Kubernetes API at {self.server} is unreachable: GET /readyz got no "
            "answer within 5s",
        )
        self.clock.advance(5)
        self.answer(200)
        self.assertIsNone(health.problem())

    def test_requests_tell(self) -> None:
        """
        Without probes, a request whose connection is refused makes the apiserver
        unreachable at once (the request still fails as before); a cancelled request
        says nothing; the next answered request makes it reachable.
        """
        health = self.make(interval=0)
        health.start()
        self.assertEqual(self.agent.pending, [])
        self.assertIsNone(health.problem())
        cancelled = self.upstream.request(b"GET", b"/api", Headers())
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.agent.pending.pop(0)
        self.assertIsNone(health.problem())
        refused = self.upstream.request(b"GET", b"/api", Headers())
        self.refuse()
        self.failureResultOf(refused, ConnectionRefusedError)
        self.assertIn("is unreachable: connection refused", health.problem() or "")
        self.assertEqual(self.series()["kproxy_upstream_up"], 0)
        answered = self.upstream.request(b"GET", b"/api", Headers())
        self.answer(200)
        self.assertEqual(self.successResultOf(answered).code, 200)
        self.assertIsNone(health.problem())

    def test_answered_request_keeps_not_ready(self) -> None:
        """
        A not-ready ``/readyz`` stands until a probe finds it ready: an answered
        request only proves the apiserver is reachable.
        """
        health = self.make()
        health.start()
        self.answer(500, b"[-]etcd failed: reason withheld\n")
        self.upstream.request(b"GET", b"/api", Headers())
        self.answer(200)
        self.assertIn("is not ready", health.problem() or "")
        self.clock.advance(5)
        self.answer(200)
        self.assertIsNone(health.problem())

    def test_stop(self) -> None:
        """
        Stopping cancels the probe in flight without counting it as a failure and
        schedules nothing more.
        """
        health = self.make()
        health.start()
        health.stop()
        self.assertEqual(self.agent.cancelled, [f"{self.server}/readyz".encode()])
        self.assertEqual(health.probe_failures, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IssuerHealthTests(SynchronousTestCase):
    """
    `IssuerHealth`: the verifier's key state as /ready lines and metrics.
    """

    def make(self, **state: Any) -> IssuerHealth:
        self.clock = MemoryReactorClock()
        self.clock.advance(1200)
        values: dict[str, Any] = {
            "ready": True,
            "last_error": None,
            "failing_since": None,
            "keys_loaded_at": 1000.0,
            "fetch_failures": 0,
        }
        values.update(state)
        health = IssuerHealth(SimpleNamespace(**values), self.clock)
        self.metrics = Metrics()
        health.register_metrics(self.metrics)
        return health

    def test_healthy(self) -> None:
        """
        Keys loaded and the last fetch fine: nothing to say; the issuer is up.
        """
        health = self.make()
        self.assertEqual(health.findings(), [])
        self.assertIn(b"kproxy_oidc_issuer_up 1\n", self.metrics.render())
        self.assertIn(b"kproxy_oidc_keys_age_seconds 200.0\n", self.metrics.render())

    def test_no_keys(self) -> None:
        """
        Without keys, /ready fails with the reason; the age is not reported.
        """
        health = self.make(ready=False, last_error="boom", keys_loaded_at=None, fetch_failures=2)
        findings = health.findings()
        self.assertEqual(findings, ["oidc: signing keys not loaded (boom)"])
        self.assertNotIsInstance(findings[0], ReadinessWarning)
        rendered = self.metrics.render()
        self.assertIn(b"kproxy_oidc_issuer_up 0\n", rendered)
        self.assertIn(b"kproxy_oidc_refresh_failures_total 2\n", rendered)
        self.assertNotIn(b"\nkproxy_oidc_keys_age_seconds ", rendered)

    def test_stale_keys(self) -> None:
        """
        Keys loaded but the refreshes failing: a warning (not a problem) saying since
        when, why, and how old the keys in use are.
        """
        health = self.make(last_error="boom", failing_since=1100.0, fetch_failures=3)
        findings = health.findings()
        self.assertEqual(
            findings,
            ["oidc: keys could not be refreshed since 1970-01-01T00:18:20Z: boom; "
             "serving with keys fetched 3m20s ago"],
        )
        self.assertIsInstance(findings[0], ReadinessWarning)
        self.assertIn(b"kproxy_oidc_issuer_up 0\n", self.metrics.render())

    def test_duration(self) -> None:
        """
        Ages read as a person would say them.
        """
        self.assertEqual(
            [duration(s) for s in (0, 45, 192, 7500, 273600)],
            ["0s", "45s", "3m12s", "2h5m", "3d4h"],
        )
